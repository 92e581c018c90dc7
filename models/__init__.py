"""Plain CIFAR-style classifiers, their keyed twins for permuted frames, and deformable convolution.

* :mod:`models.plain`: VGG16-BN, PreResNet-20/56/110, a compact net; :func:`build_model`.
* :mod:`models.keyed`: :func:`keyed`, which turns a plain model into a twin that classifies
  protected (spatially permuted) frames exactly; its ops are in :mod:`models.keyed_ops` (gather
  tables, keyed conv/pool functions) and its layers in :mod:`models.keyed_layers`.
* :mod:`models.tables`: torch twins of the sensor's permutation tables, on any device.
* :mod:`models.deform`: pure-torch ``deform_conv2d``; :func:`table_to_offsets` expresses a keyed
  layer's table as deformable offsets.
* :mod:`models.checkpoint`: weights with a manifest (never the key or its tables).
"""

from .checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from .deform import DeformConv2d, deform_conv2d
from .keyed import MODES, KeyedNet, keyed
from .keyed_ops import table_to_offsets
from .plain import MODEL_NAMES, build_model
from .tables import plane_tables_torch, random_permutation_torch

__all__ = [
    "MODEL_NAMES",
    "MODES",
    "CheckpointError",
    "DeformConv2d",
    "KeyedNet",
    "build_model",
    "deform_conv2d",
    "keyed",
    "load_checkpoint",
    "plane_tables_torch",
    "random_permutation_torch",
    "read_manifest",
    "save_checkpoint",
    "table_to_offsets",
]
