"""Benchmarks of privcam (run as modules, e.g. ``python -m pipeline.bench.readout``)."""
