"""The sensor emulator: EMVA 1288 camera model, physics in the order it happens.

    photons -> quantum efficiency (per CFA colour) x PRNU -> + dark electrons (temperature
    law) + DSNU -> shot noise (Poisson of signal and dark together: a sum of independent
    Poisson counts is Poisson) -> full-well clip -> conversion gain K (DN/e-) x analog gain
    -> read noise (Gaussian, given in e- rms) -> quantisation (round) -> black level
    -> clip to [0, 2**bit_depth - 1]

Reproducibility: the fixed-pattern maps (PRNU, DSNU) come from the configuration's
``fpn_seed`` (a property of the device), and the temporal noise of frame ``n`` is drawn inside
the ADC kernel from Philox4x32-10 keyed by ``(seed, n, pixel)`` alone (:mod:`sensor.noise`), so
a frame is the same on every call and every thread count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from .adc import electron_mean_nb, expose_nb, expose_ref
from .cfa import colour_index_map
from .config import SensorConfig
from .errors import PrivcamError
from .frame import FrameMeta, ProtectedFrame
from .frameauth import sign_frame
from .keys import Key
from .noise import check_seed
from .readout import ReadoutPermutation, Scheme, readout_permutation


def qe_map(config: SensorConfig, height: int, width: int) -> np.ndarray:
    """Quantum efficiency of each pixel from its CFA colour. Returns (H, W) float64."""
    if config.cfa == "mono":
        return np.full((height, width), config.quantum_efficiency["mono"])
    per_colour = np.array([config.quantum_efficiency[k] for k in ("R", "G", "B")])
    return per_colour[colour_index_map(config.cfa, height, width)]


def fixed_pattern(config: SensorConfig, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """PRNU gain map (mean 1) and DSNU offset map (e-) of the device. Each (H, W) float64."""
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([config.fpn_seed, 0xF1])))
    prnu = 1.0 + (config.prnu_percent / 100.0) * rng.standard_normal((height, width))
    dsnu_e = config.dsnu_e * rng.standard_normal((height, width))
    return np.clip(prnu, 0.0, None), dsnu_e


class Sensor:
    """A configured sensor with its fixed-pattern noise; ``expose`` digitises one frame and
    ``capture`` digitises it and reads it out in keyed order.

    Args:
        config: the sensor profile.
        seed: seed of the temporal noise; frame n's noise depends only on (seed, n).
    """

    def __init__(self, config: SensorConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = check_seed(seed)
        self._maps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._readouts: dict[tuple[str, str, int, int], ReadoutPermutation] = {}
        self._scratch = threading.local()  # each capturing thread's readout scratch (rotation: reused)

    def __repr__(self) -> str:
        return f"Sensor({self.config.name!r}, seed={self.seed})"

    def _maps_for(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(QE x PRNU, mean dark electrons incl. DSNU) for one frame size, computed once."""
        if (height, width) not in self._maps:
            cfg = self.config
            prnu, dsnu_e = fixed_pattern(cfg, height, width)
            dark_e = cfg.dark_current_at_temperature_e_per_s() * cfg.exposure_s
            self._maps[(height, width)] = (qe_map(cfg, height, width) * prnu,
                                           np.clip(dark_e + dsnu_e, 0.0, None))
        return self._maps[(height, width)]

    def mean_electrons(self, photons: np.ndarray) -> np.ndarray:
        """Expected electrons per pixel before shot noise. (H, W) float64 -> (H, W) float64."""
        photons = _check_photons(photons)
        qe_prnu, dark_e = self._maps_for(*photons.shape)
        return electron_mean_nb(photons, qe_prnu, dark_e)

    def expose(self, photons: np.ndarray, frame_index: int = 0) -> np.ndarray:
        """Digitise one frame (no readout permutation).

        Args:
            photons: (H, W) mean photons per pixel during the exposure.
            frame_index: frame counter n; the noise depends only on (seed, n).

        Returns:
            (H, W) uint16 digital numbers in [0, 2**bit_depth - 1].
        """
        photons, qe_prnu, dark_e, seed, n, *levels = self._expose_args(photons, frame_index)
        return expose_nb(photons, qe_prnu, dark_e, np.uint64(seed), np.uint64(n), *levels)

    def expose_reference(self, photons: np.ndarray, frame_index: int = 0) -> np.ndarray:
        """:meth:`expose` through the plain Python reference (slow; small frames, for the tests)."""
        return expose_ref(*self._expose_args(photons, frame_index))

    def _expose_args(self, photons: np.ndarray, frame_index: int) -> tuple:
        if isinstance(frame_index, bool) or not isinstance(frame_index, (int, np.integer)) or not (
                0 <= int(frame_index) < 1 << 64):
            raise ValueError(f"frame_index: expected an integer in [0, 2**64), got {frame_index!r}")
        photons = _check_photons(photons)
        if photons.size > 1 << 32:
            raise ValueError(f"photons: at most 2**32 pixels per frame, got {photons.shape}")
        cfg = self.config
        qe_prnu, dark_e = self._maps_for(*photons.shape)
        gain = cfg.system_gain_dn_per_e
        return (photons, qe_prnu, dark_e, self.seed, int(frame_index), float(cfg.full_well_e), gain,
                cfg.read_noise_e * gain, float(cfg.black_level_dn), float(cfg.max_dn))


    def readout(self, key: Key, scheme: Scheme, height: int, width: int,
                frame_index: int | None = None) -> ReadoutPermutation:
        """The keyed readout order of one frame; the static one (frame_index None) is built once."""
        if frame_index is not None:
            return readout_permutation(key, scheme, height, width, frame_index)
        cache_key = (key.fingerprint, key.session, scheme, height, width)
        if cache_key not in self._readouts:
            self._readouts[cache_key] = readout_permutation(key, scheme, height, width)
        return self._readouts[cache_key]

    def capture(self, photons: np.ndarray, key: Key, frame_index: int | None = None, scheme: Scheme = "pixel",
                rotation: bool = False, label: int | None = None,
                capture_time_ns: int | None = None,
                on_readout: Callable[[int, ReadoutPermutation], None] | None = None) -> ProtectedFrame:
        """Expose, then read the frame out in the key's order and tag it: what a protected camera emits.

        Args:
            photons: (H, W) mean photons per pixel.
            key: the session key (:meth:`sensor.keys.Key.for_session`); a master key is accepted for
                static readout only. Only its public fingerprint and session nonce reach the frame.
            frame_index: frame counter n: the noise seed and, with ``rotation``, the readout order.
                Required with rotation (default 0 otherwise).
            scheme: one of :data:`sensor.readout.SCHEMES`: "pixel", "quad" (2x2 CFA cells move whole)
                or "plane" (each CFA plane alone).
            rotation: a fresh permutation per frame (session key, n) instead of one static permutation.
            on_readout: with rotation, called as ``on_readout(n, order)`` with the frame's readout order
                once the frame is read out (a live run hands it to its classifier:
                :mod:`pipeline.stream.handoff`).

        Returns:
            ProtectedFrame with (H, W) uint16 data in keyed slot order and its MAC
            (:mod:`sensor.frameauth`).
        """
        if rotation:
            check_unique_rotation(key, frame_index)
        frame_index = 0 if frame_index is None else frame_index
        plain = self.expose(photons, frame_index)
        h, w = plain.shape
        order = self.readout(key, scheme, h, w, frame_index if rotation else None)
        meta = FrameMeta(frame_index=int(frame_index), scheme=scheme, rotation=bool(rotation),
                         key_fingerprint=key.fingerprint, bit_depth=self.config.bit_depth, cfa=self.config.cfa,
                         height=h, width=w, capture_time_ns=time.time_ns() if capture_time_ns is None
                         else int(capture_time_ns), label=None if label is None else int(label),
                         session=key.session)
        frame = sign_frame(key, ProtectedFrame(order.forward(plain, out=plain, scratch=self._scratch_for(plain.size)),
                                               meta))
        if rotation and on_readout is not None:
            on_readout(int(frame_index), order)
        return frame

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_scratch"]  # per-thread buffers stay with their threads
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._scratch = threading.local()

    def _scratch_for(self, size: int) -> np.ndarray:
        """This thread's readout scratch, at least ``size`` uint16 (grown when a larger frame comes)."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.size < size:
            buf = self._scratch.buf = np.empty(size, np.uint16)
        return buf


def check_unique_rotation(key: Key, frame_index: int | None) -> None:
    """Refuse rotation whose frame orders could repeat: it needs a session key and an explicit index."""
    if key.session_nonce is None:
        raise PrivcamError("rotation: frame orders must come from a session key (key.for_session("
                           "sensor.keys.new_session_nonce())), or frame n of every run would share one order")
    if frame_index is None:
        raise PrivcamError("rotation: expected an explicit frame_index, unique within the session")


def _check_photons(photons: np.ndarray) -> np.ndarray:
    photons = np.asarray(photons)
    if photons.ndim != 2:
        raise ValueError(f"photons: expected an (H, W) array, got shape {photons.shape}")
    if not np.issubdtype(photons.dtype, np.number) or np.iscomplexobj(photons):
        raise ValueError(f"photons: expected real numbers, got {photons.dtype}")
    photons = np.ascontiguousarray(photons, dtype=np.float64)
    if not np.isfinite(photons).all() or (photons < 0).any():
        raise ValueError("photons: expected finite, non-negative photon counts")
    return photons
