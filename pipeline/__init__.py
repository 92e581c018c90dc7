"""privcam's product layer: the ``privcam`` command (:mod:`pipeline.cli`), the streaming pipeline
(:mod:`pipeline.engine`, :mod:`pipeline.run`), the model stage (:mod:`pipeline.classifier`),
recordings (:mod:`pipeline.recording`), datasets, training and evaluation.
"""
