"""privcam's product layer: the ``privcam`` command (:mod:`pipeline.cli.main`), the streaming pipeline
(:mod:`pipeline.stream.engine`, :mod:`pipeline.stream.run`), the model stage (:mod:`pipeline.stream.classifier`),
recordings (:mod:`pipeline.stream.recording`), datasets, training and evaluation.
"""
