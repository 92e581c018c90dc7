"""Plain CIFAR-style classifiers, their keyed twins for permuted frames, and deformable convolution.

* :mod:`models.plain`: VGG16-BN, PreResNet-20/56/110, a compact net; :func:`build_model`.
* :mod:`models.keyed`: keyed conv/pool layers (gather tables) and :func:`keyed`, which turns a
  plain model into a twin that classifies protected (spatially permuted) frames exactly.
* :mod:`models.deform`: pure-torch ``deform_conv2d`` and :func:`table_to_offsets`.
"""

from .deform import DeformConv2d, deform_conv2d, table_to_offsets
from .keyed import MODES, KeyedNet, keyed
from .plain import MODEL_NAMES, build_model

__all__ = [
    "MODEL_NAMES",
    "MODES",
    "DeformConv2d",
    "KeyedNet",
    "build_model",
    "deform_conv2d",
    "keyed",
    "table_to_offsets",
]
