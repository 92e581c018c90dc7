"""Shipped configuration files, installed as package data: ``sensors/`` (sensor profiles),
``pipeline/`` (the run/record/replay config) and ``train/`` (training configs).

Look them up with :func:`pipeline.resources.config_path`, which also accepts a user's own file.
"""
