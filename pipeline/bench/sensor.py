"""The sensor stage at a real sensor's size: ADC, readout tables, readout, and the whole stage.

Run: ``privcam bench sensor --out sensor.json [-- --sizes 1080x1920,3000x4000 --repeat 5]``.

For each frame size (RGGB, the default 12-bit profile, a random natural-looking scene), in one run:

* ``memcpy``: ``np.copyto`` of the uint16 frame, the bandwidth baseline;
* ``adc_kernel``: :meth:`sensor.sensor.Sensor.expose` (photons -> DN, noise drawn inside the numba
  kernel); ``adc_numpy_baseline``: the same chain with numpy's own generator (Philox ``poisson``
  and ``standard_normal``, single-threaded) and numpy arithmetic, i.e. the pre-kernel implementation;
  the bit-exact Python reference of the kernel is a per-pixel loop for tests, timed on a 64 x 64
  crop only (``adc_python_reference_ns_per_pixel``); ``adc_kernel_flat_2000e`` and
  ``adc_kernel_flat_300e``: the kernel on flat frames of about 2000 and 300 mean electrons, the cost
  of its two paths (normal approximation from 1000 e-, PTRS below), which with the scene's share
  of pixels below 1000 e- (``share_below_normal_from``) explains ``adc_kernel``;
* per scheme: ``readout_static`` (the keyed readout with cached tables), ``tables_static`` (building
  one frame's tables: AES-256-CTR keystreams + Fisher-Yates + the kernels' layout), and
  ``readout_rotating`` (a fresh frame index each call: its tables, then its readout);
* ``stage_static`` / ``stage_rotating`` per scheme: expose + readout of one frame, in frames/s.

Each case is timed interleaved over ``--repeat`` rounds after a warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from pipeline.bench.common import write_json
from sensor.config import SensorConfig
from sensor.keys import Key, new_session_nonce
from sensor.noise import NORMAL_FROM
from sensor.readout import SCHEMES, readout_permutation
from sensor.scene import render_photons
from sensor.sensor import Sensor


def _interleaved(cases: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds of each case over ``repeat`` interleaved rounds, after one warm-up round."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB scene (uint8) with edges: blurred noise at several scales."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    for scale in (8, 32, 128):
        small = rng.uniform(0, 255, (max(1, height // scale), max(1, width // scale), 3)).astype(np.float32)
        img += cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR) / 3
    return np.clip(img, 0, 255).astype(np.uint8)


def adc_numpy_baseline(sensor: Sensor, photons: np.ndarray, frame_index: int) -> np.ndarray:
    """The ADC chain with numpy's generator and numpy arithmetic (the pre-kernel implementation)."""
    cfg = sensor.config
    mean_e = sensor.mean_electrons(photons)
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([sensor.seed, frame_index])))
    electrons = rng.poisson(mean_e).astype(np.float64)
    z = rng.standard_normal(mean_e.shape)
    gain = cfg.system_gain_dn_per_e
    v = np.minimum(electrons, cfg.full_well_e) * gain + cfg.read_noise_e * gain * z
    return np.clip(np.floor(v + 0.5) + cfg.black_level_dn, 0, cfg.max_dn).astype(np.uint16)


def measure(height: int, width: int, repeat: int) -> dict[str, Any]:
    """All cases for one frame size."""
    cfg = SensorConfig()  # the default profile: 12-bit RGGB
    sensor = Sensor(cfg, seed=0)
    key = Key.generate().for_session(new_session_nonce())  # rotation needs a session key
    photons = render_photons(scene(height, width), cfg)
    plain = sensor.expose(photons, 0)
    dst, out = np.empty_like(plain), np.empty_like(plain)
    counter = iter(range(1, 1 << 40))
    mean_qe = float(sensor.mean_electrons(np.ones((height, width))).mean())  # electrons per photon
    flat = {e: np.full((height, width), e / mean_qe) for e in (2000, 300)}
    cases: dict[str, Callable[[], object]] = {
        "memcpy": lambda: np.copyto(dst, plain),
        "adc_kernel": lambda: sensor.expose(photons, 1),
        "adc_kernel_flat_2000e": lambda: sensor.expose(flat[2000], 1),
        "adc_kernel_flat_300e": lambda: sensor.expose(flat[300], 1),
        "adc_numpy_baseline": lambda: adc_numpy_baseline(sensor, photons, 1),
    }
    for scheme in SCHEMES:
        static = readout_permutation(key, scheme, height, width)
        static.kernel_tables()
        cases[f"readout_static/{scheme}"] = lambda p=static: p.forward(plain, out=out)
        cases[f"tables_static/{scheme}"] = lambda s=scheme: readout_permutation(key, s, height, width).kernel_tables()
        cases[f"readout_rotating/{scheme}"] = lambda s=scheme: readout_permutation(
            key, s, height, width, next(counter)).forward(plain, out=out)
        cases[f"stage_static/{scheme}"] = lambda p=static: p.forward(sensor.expose(photons, 2), out=out)
        cases[f"stage_rotating/{scheme}"] = lambda s=scheme: sensor.capture(
            photons, key, next(counter), scheme=s, rotation=True)
    secs = _interleaved(cases, repeat)
    crop = photons[:64, :64]
    t0 = time.perf_counter()
    sensor.expose_reference(crop, 1)
    ref_ns = (time.perf_counter() - t0) / crop.size * 1e9
    pixels, memcpy = height * width, secs["memcpy"]
    rows = [{"name": name, "ms": round(s * 1e3, 3), "mpix_per_s": round(pixels / s / 1e6, 1),
             "frames_per_s": round(1 / s, 2), "ratio_to_memcpy": round(memcpy / s, 4)} for name, s in secs.items()]
    return {"height": height, "width": width, "cfa": cfg.cfa, "bit_depth": cfg.bit_depth,
            "mean_electrons": round(float(sensor.mean_electrons(photons).mean()), 1),
            "share_below_normal_from": round(float((sensor.mean_electrons(photons) < NORMAL_FROM).mean()), 3),
            "adc_kernel_vs_numpy_baseline": round(secs["adc_numpy_baseline"] / secs["adc_kernel"], 2),
            "adc_python_reference_ns_per_pixel": round(ref_ns, 1), "results": rows}


def run(sizes: list[tuple[int, int]], repeat: int) -> dict[str, Any]:
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "numba_threads": numba.get_num_threads(), "load_average": list(os.getloadavg())},
            "repeat": repeat, "sizes": [measure(h, w, repeat) for h, w in sizes]}


def print_table(report: dict[str, Any]) -> None:
    for size in report["sizes"]:
        print(f"{size['height']}x{size['width']} {size['cfa']} {size['bit_depth']}-bit, mean "
              f"{size['mean_electrons']} e-; ADC kernel {size['adc_kernel_vs_numpy_baseline']}x the numpy "
              f"baseline; Python reference {size['adc_python_reference_ns_per_pixel']} ns/pixel; "
              f"{size['share_below_normal_from']:.0%} of pixels below {NORMAL_FROM:g} e- (PTRS)")
        print(f"  {'case':28s} {'ms':>9s} {'Mpix/s':>9s} {'frames/s':>9s} {'x memcpy':>9s}")
        for r in size["results"]:
            print(f"  {r['name']:28s} {r['ms']:9.2f} {r['mpix_per_s']:9.1f} {r['frames_per_s']:9.2f} "
                  f"{r['ratio_to_memcpy']:9.4f}")


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    if not (h.isdigit() and w.isdigit()) or int(h) < 2 or int(w) < 2 or int(h) % 2 or int(w) % 2:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH with even sides >= 2, got {text!r}")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--sizes", default="1080x1920,3000x4000",
                        help="comma list of HEIGHTxWIDTH (default 1080x1920,3000x4000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    report = run([_size(s) for s in args.sizes.split(",")], args.repeat)
    print_table(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
