"""privcam's product layer, by role:

* :mod:`pipeline.stream`: the streaming product (engine, sources, the keyed classifier stage,
  sinks, MCAP recordings, ``run``/``record``/``replay``);
* :mod:`pipeline.lab`: the research lab (protections, attacks, accuracy and privacy tables, training);
* :mod:`pipeline.ray`: the same jobs scaled out on Ray (optional extra ``ray``);
* :mod:`pipeline.cli`: the ``privcam`` command (all argparse), the demo and the figure;
* :mod:`pipeline.bench`: the throughput benchmarks behind ``privcam bench``.

The main names are importable from here: ``from pipeline import RunConfig, run_pipeline``.
"""

from importlib import import_module
from typing import Any

# Loaded on first use (PEP 562) so that ``privcam --help`` does not import torch.
_EXPORTS = {
    "Batch": "stream.engine", "Map": "stream.engine", "Pipeline": "stream.engine",
    "KeyedClassifier": "stream.classifier", "input_shape": "stream.inputs", "network_input": "stream.inputs",
    "Recorder": "stream.recording", "RecordingReader": "stream.recording", "PredictionWriter": "stream.sinks",
    "RunConfig": "stream.run", "record_frames": "stream.run", "replay_recording": "stream.run",
    "run_pipeline": "stream.run",
}

__all__ = [
    "Batch",
    "KeyedClassifier",
    "Map",
    "Pipeline",
    "PredictionWriter",
    "Recorder",
    "RecordingReader",
    "RunConfig",
    "input_shape",
    "network_input",
    "record_frames",
    "replay_recording",
    "run_pipeline",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
