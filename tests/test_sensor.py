"""Physics of the emulator: photon transfer, dark signal, saturation, shot noise, reproducibility."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from sensor.adc import electron_mean_nb, electron_mean_ref, expose_nb, expose_ref
from sensor.config import SensorConfig
from sensor.keys import Key
from sensor.ptc import default_exposures_s, photon_transfer
from sensor.sensor import Sensor

SHAPE = (256, 256)


def flat(level: float, shape=SHAPE) -> np.ndarray:
    return np.full(shape, float(level))


@pytest.mark.parametrize("profile, analog_gain", [("configs/sensors/default.yaml", 1.0),
                                                  ("configs/sensors/mono10.yaml", 4.0)])
def test_photon_transfer_recovers_gain_and_read_noise(profile, analog_gain):
    """EMVA 1288 photon transfer: flat-field pairs at a dozen exposures; slope = K.

    The mono profile's dark noise (0.375 DN) is below the quantiser's resolution at unity gain,
    so, as EMVA 1288 prescribes, it is measured at a higher analog gain (checked below).
    """
    cfg = SensorConfig.from_yaml(profile).replace(analog_gain=analog_gain)
    result = photon_transfer(cfg, default_exposures_s(cfg, 12), SHAPE, seed=7)
    assert max(result.mean_dn) < (cfg.max_dn - cfg.black_level_dn) * 0.95, "must stay below saturation"
    assert result.gain_dn_per_e == pytest.approx(cfg.system_gain_dn_per_e, rel=0.05)
    assert result.read_noise_e == pytest.approx(cfg.read_noise_e, rel=0.05)
    assert not result.quantisation_limited


def test_photon_transfer_flags_quantisation_limited_read_noise():
    cfg = SensorConfig.from_yaml("configs/sensors/mono10.yaml")
    result = photon_transfer(cfg, np.linspace(0.001, 0.004, 3), (128, 128), seed=1)
    assert result.quantisation_limited


@pytest.mark.parametrize("profile", ["configs/sensors/default.yaml", "configs/sensors/mono10.yaml"])
def test_dark_signal_grows_with_exposure_and_temperature(profile):
    cfg = SensorConfig.from_yaml(profile).replace(dsnu_e=0.0, dark_current_e_per_s=400.0,
                                                  temperature_c=25.0, dark_reference_temperature_c=25.0)
    k = cfg.system_gain_dn_per_e

    def dark_dn(c: SensorConfig) -> float:
        return Sensor(c, seed=5).expose(np.zeros(SHAPE), 0).mean() - c.black_level_dn

    short, long = dark_dn(cfg.replace(exposure_s=0.5)), dark_dn(cfg.replace(exposure_s=1.0))
    assert short == pytest.approx(k * 400 * 0.5, rel=0.03)
    assert long == pytest.approx(k * 400 * 1.0, rel=0.03)
    hot = cfg.replace(exposure_s=0.5, temperature_c=25.0 + cfg.dark_doubling_temperature_c)
    assert dark_dn(hot) == pytest.approx(2 * short, rel=0.03)


def test_saturation_clips_at_full_well_then_at_max_dn():
    cfg = SensorConfig().replace(read_noise_e=0.0, prnu_percent=0.0, dsnu_e=0.0)
    frame = Sensor(cfg).expose(flat(1e6, (32, 32)))
    full_well_dn = np.floor(cfg.full_well_e * cfg.system_gain_dn_per_e + 0.5) + cfg.black_level_dn
    assert full_well_dn < cfg.max_dn
    assert (frame == full_well_dn).all()
    hot = cfg.replace(analog_gain=4.0)
    assert (Sensor(hot).expose(flat(1e6, (32, 32))) == hot.max_dn).all()
    mono = SensorConfig.from_yaml("configs/sensors/mono10.yaml").replace(analog_gain=8.0)
    out = Sensor(mono).expose(flat(1e6, (16, 16)))
    assert out.max() == 1023 and (out == 1023).all()


def test_poisson_variance_equals_mean_in_electrons():
    cfg = SensorConfig().replace(read_noise_e=0.0, prnu_percent=0.0, dsnu_e=0.0,
                                 dark_current_e_per_s=0.0, conversion_gain_dn_per_e=1.0,
                                 quantum_efficiency={"R": 1.0, "G": 1.0, "B": 1.0}, black_level_dn=0)
    for mean_e in (4.0, 50.0, 900.0):
        electrons = Sensor(cfg, seed=11).expose(flat(mean_e), 0).astype(np.float64)
        assert electrons.mean() == pytest.approx(mean_e, rel=0.01)
        assert electrons.var() == pytest.approx(electrons.mean(), rel=0.03)


def test_noise_depends_only_on_seed_and_frame_index():
    cfg = SensorConfig()
    photons = np.random.default_rng(0).uniform(0, 8000, (64, 80))
    a = Sensor(cfg, seed=1).expose(photons, 5)
    assert np.array_equal(a, Sensor(cfg, seed=1).expose(photons, 5))
    assert not np.array_equal(a, Sensor(cfg, seed=1).expose(photons, 6))
    assert not np.array_equal(a, Sensor(cfg, seed=2).expose(photons, 5))
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = Sensor(cfg, seed=1).expose(photons, 5)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(a, single)


def test_fixed_pattern_is_a_property_of_the_device():
    cfg = SensorConfig().replace(prnu_percent=5.0, dsnu_e=5.0)
    m1, m2 = Sensor(cfg, seed=1)._maps_for(32, 32), Sensor(cfg, seed=99)._maps_for(32, 32)
    assert all(np.array_equal(x, y) for x, y in zip(m1, m2, strict=True))
    other = Sensor(cfg.replace(fpn_seed=7), seed=1)._maps_for(32, 32)
    assert not np.array_equal(m1[0], other[0])
    assert np.std(m1[0] / Sensor(cfg)._maps_for(32, 32)[0].mean()) > 0.01


def test_adc_kernels_match_numpy_references_bit_for_bit():
    rng = np.random.default_rng(42)
    photons = rng.uniform(0, 2e4, (13, 17))
    photons[0, :8] = [0.0, 0.004, 0.3, 12.0, 900.0, 1e5, 2e6, 5.0]  # every branch of the shot-noise draw
    qe = rng.uniform(0.3, 0.7, photons.shape)
    dark = rng.uniform(0, 5, photons.shape)
    assert np.array_equal(electron_mean_nb(photons, qe, dark), electron_mean_ref(photons, qe, dark))
    cases = [(6000.0, 0.4, 1.2, 64.0, 4095.0), (1e9, 3.7, 0.0, 0.0, 1023.0), (500.0, 0.1, 9.0, 5.0, 255.0)]
    for seed, frame in ((0, 0), (7, 3), (2**64 - 1, 2**40 + 5)):
        for args in cases:
            got = expose_nb(photons, qe, dark, np.uint64(seed), np.uint64(frame), *args)
            want = expose_ref(photons, qe, dark, seed, frame, *args)
            assert got.dtype == want.dtype == np.uint16
            assert np.array_equal(got, want), (seed, frame, args)


def test_adc_kernel_equals_reference_on_every_path_of_its_rows():
    """The row kernel's vectorised loop (ziggurat fast path, normal approximation, PTRS's first trial)
    and its per-pixel finish (slow ziggurat paths, PTRS past its first trial, inversion) against the
    reference, over means from 1e-3 to 1e6 electrons: thousands of pixels of every kind."""
    photons = np.geomspace(1e-3, 1e6, 3 * 1024).reshape(3, 1024)
    photons[1] = np.random.default_rng(0).permutation(np.linspace(10.0, 1000.0, 1024))  # PTRS's range
    qe, dark = np.ones_like(photons), np.zeros_like(photons)
    args = (3e4, 0.25, 2.0, 64.0, 65535.0)
    got = expose_nb(photons, qe, dark, np.uint64(11), np.uint64(4), *args)
    assert np.array_equal(got, expose_ref(photons, qe, dark, 11, 4, *args))


def test_expose_matches_its_reference_and_depends_only_on_seed_and_frame():
    sensor = Sensor(SensorConfig(), seed=5)
    photons = np.random.default_rng(1).uniform(0, 3e4, (10, 14))
    a = sensor.expose(photons, 9)
    assert np.array_equal(a, sensor.expose_reference(photons, 9))
    assert np.array_equal(a, Sensor(SensorConfig(), seed=5).expose(photons, 9))
    assert not np.array_equal(a, sensor.expose(photons, 10))
    assert not np.array_equal(a, Sensor(SensorConfig(), seed=6).expose(photons, 9))
    with pytest.raises(ValueError, match="seed"):
        Sensor(SensorConfig(), seed=-1)
    with pytest.raises(ValueError, match="frame_index"):
        sensor.expose(photons, -1)


def test_expose_rejects_bad_photons():
    sensor = Sensor(SensorConfig())
    with pytest.raises(ValueError, match="photons"):
        sensor.expose(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        sensor.expose(np.full((4, 4), -1.0))
    with pytest.raises(ValueError, match="frame_index"):
        sensor.expose(np.zeros((4, 4)), frame_index=-1)


def test_capture_emits_a_keyed_readout_with_public_metadata():
    from sensor.frameauth import verify_frame
    from sensor.keys import Key

    key = Key(bytes(range(32))).for_session(bytes(range(16)))
    cfg = SensorConfig()
    sensor = Sensor(cfg, seed=4)
    photons = np.random.default_rng(1).uniform(0, 8000, (32, 48))
    plain = sensor.expose(photons, 9)
    for scheme in ("pixel", "quad", "plane"):
        for rotation in (False, True):
            frame = sensor.capture(photons, key, frame_index=9, scheme=scheme, rotation=rotation, label=3)
            meta = frame.meta
            assert (meta.frame_index, meta.scheme, meta.rotation, meta.label) == (9, scheme, rotation, 3)
            assert (meta.bit_depth, meta.cfa, meta.height, meta.width) == (12, "RGGB", 32, 48)
            assert meta.key_fingerprint == key.fingerprint and meta.session == bytes(range(16)).hex()
            assert verify_frame(key, frame) and len(meta.mac) == 64
            assert not np.array_equal(frame.data, plain)
            order = sensor.readout(key, scheme, 32, 48, 9 if rotation else None)
            assert np.array_equal(order.inverse(frame.data), plain)
            assert bytes(range(32)).hex() not in repr(frame) + repr(meta) + repr(order)
    static_a = sensor.capture(photons, key, 1, scheme="pixel").data
    static_b = sensor.capture(photons, key, 2, scheme="pixel").data
    order = sensor.readout(key, "pixel", 32, 48)
    assert np.array_equal(order.inverse(static_a), sensor.expose(photons, 1))
    assert np.array_equal(order.inverse(static_b), sensor.expose(photons, 2)), "static key: one order for all"


def test_rotation_needs_a_session_key_and_an_explicit_frame_index():
    """Frame n's order must never repeat across runs: a master key, or a missing index, is refused."""
    from sensor.errors import PrivcamError
    from sensor.keys import Key, new_session_nonce

    master = Key(bytes(range(32)))
    sensor = Sensor(SensorConfig(), seed=4)
    photons = np.full((8, 12), 300.0)
    with pytest.raises(PrivcamError, match="session key"):
        sensor.capture(photons, master, frame_index=3, rotation=True)
    with pytest.raises(PrivcamError, match="explicit frame_index"):
        sensor.capture(photons, master.for_session(new_session_nonce()), rotation=True)
    a = sensor.capture(photons, master.for_session(bytes(16)), frame_index=3, rotation=True)
    b = sensor.capture(photons, master.for_session(bytes(15) + b"\x01"), frame_index=3, rotation=True)
    assert not np.array_equal(a.data, b.data), "frame 3 of two sessions must be read out in different orders"
    assert master.for_session(bytes(16)).subkey("readout/pixel/frame", 3) != master.subkey("readout/pixel/frame", 3)


def test_rotating_captures_reuse_one_scratch_and_equal_their_permutations():
    """Each rotating frame has its own permutation; the sensor reads them all out through one
    per-thread scratch (grown for a larger frame) and each frame is what its permutation gives."""
    from sensor.readout import readout_permutation

    sensor = Sensor(SensorConfig(), seed=2)
    key = Key(bytes(range(32))).for_session(bytes(16))
    for n, (h, w) in enumerate([(8, 12), (8, 12), (16, 20), (8, 12)]):
        photons = np.random.default_rng(n).uniform(0, 3e3, (h, w))
        for scheme in ("pixel", "quad", "plane"):
            got = sensor.capture(photons, key, n, scheme=scheme, rotation=True).data
            want = readout_permutation(key, scheme, h, w, n).forward(sensor.expose(photons, n))
            assert np.array_equal(got, want), (n, scheme)
    assert sensor._scratch.buf.size == 16 * 20
    with pytest.raises(ValueError, match="scratch"):
        readout_permutation(key, "pixel", 8, 12).forward(np.zeros((8, 12), np.uint16), scratch=np.zeros(5, np.uint16))
