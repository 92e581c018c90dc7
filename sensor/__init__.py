"""privcam's sensor emulator: the EMVA 1288 chain and the keyed ADC readout.

Start at :class:`Sensor` (``expose`` and ``capture``), configured by :class:`SensorConfig`; keys
are :mod:`sensor.keys`, the readout :mod:`sensor.readout` (tables in :mod:`sensor.readout_tables`,
kernels in :mod:`sensor.readout_kernels`). The package never imports torch: the torch twins of
its tables are in :mod:`models.tables`.
"""

from .config import SensorConfig
from .errors import ConfigError, KeyFileError, PrivcamError, RawFormatError
from .frame import FrameMeta, ProtectedFrame
from .keys import Key, load_key_file, write_key_file
from .rawio import RawFrame, RawMeta, read_raw, write_raw
from .readout import SCHEMES, ReadoutPermutation, Scheme, readout_permutation, readout_subkey
from .scene import render_photons
from .sensor import Sensor

__all__ = [
    "SCHEMES",
    "ConfigError",
    "FrameMeta",
    "Key",
    "KeyFileError",
    "PrivcamError",
    "ProtectedFrame",
    "RawFormatError",
    "RawFrame",
    "RawMeta",
    "ReadoutPermutation",
    "Scheme",
    "Sensor",
    "SensorConfig",
    "load_key_file",
    "read_raw",
    "readout_permutation",
    "readout_subkey",
    "render_photons",
    "write_key_file",
    "write_raw",
]
