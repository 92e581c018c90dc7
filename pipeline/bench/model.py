"""Throughput and memory of keyed models against their plain twins, the keyed front end, table builds.

Run: ``privcam bench model --out model.json`` (options after ``--``), or
``python -m pipeline.bench.model --json out.json [--batch 64 --repeat 5 --threads 2]``;
``--quick`` runs every row on small settings (a smoke test, not a measurement).

Every time is a median over ``--repeat`` interleaved rounds (each round runs every case of a row
once, after a warm-up round), with ``time.perf_counter``; the minimum is kept too. Ratios are
against the plain model measured in the same rounds: ``*_time_over_plain`` is time per image
relative to plain (1.0 = plain speed, 2.0 = half its speed).

Rows:

* ``models``: compact (1x32x32), VGG16-BN, PreResNet-20 and -56 (3x32x32) at ``--batch``;
  PreResNet-20 at batch 1 on 3x480x640. Modes: ``plain``; ``fused`` (every conv and pool keyed,
  channels-last row gathers, no feature map in natural order); ``fast`` (first layer keyed, then
  the plain model); ``rotating`` (fused with per-frame input tables and the entry layer's
  per-frame output order; the frames' readout tables are given); and, for reference,
  ``plain_channels_last`` (the plain model on a channels-last input: the keyed layers keep maps
  channels-last, and oneDNN's channels-last kernels can be faster on a CPU; the ratios are against
  the plain model as it is usually run, channels-first). Per mode: images/s, time ratio,
  peak memory of one forward (bytes of live tensors, :func:`peak_memory`) and its ratio to plain;
  the time to build all tables (``keyed()``, median of 3 builds after a warm-up build).
* ``frontend``: a protected mono frame of 1920x1080 and 3000x4000 to the model's 32x32
  (INTER_AREA, non-integer factors): the plain front end on the plain frame
  (:func:`models.frontend.area_resize`), the keyed front end with its static table, and with a
  per-frame table (built from the frame's readout table, rotating output order); table build
  times; the frame's rotated readout table (numba, what the classifier builds per frame); and
  the keyed front end + compact model with rotation, per frame, with and without the readout table.
* ``keyed_pool``: a keyed 2x2 max-pool on a (64, 64, 32, 32) map (the reference implementation's
  Python loop is quoted at ~0.85 s; not re-measured).
* ``targets``: the issue's targets, each with the measured value.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.frontend import area_resize
from models.keyed import keyed
from models.keyed_layers import KeyedMaxPool2d
from models.plain import build_model
from models.tables import random_permutation_torch
from pipeline.bench.common import write_json
from sensor.keys import Key
from sensor.readout import readout_permutation

MODEL_CASES = [("compact", (1, 32, 32), None), ("vgg16_bn", (3, 32, 32), None),
               ("preresnet20", (3, 32, 32), None), ("preresnet56", (3, 32, 32), None),
               ("preresnet20", (3, 480, 640), 1)]
QUICK_MODEL_CASES = [("compact", (1, 32, 32), None), ("vgg16_bn", (3, 32, 32), None),
                     ("preresnet20", (3, 32, 32), None), ("preresnet56", (3, 32, 32), None),
                     ("preresnet20", (3, 48, 64), 1)]
FRONTEND_SIZES = [(1080, 1920), (3000, 4000)]
QUICK_FRONTEND_SIZES = [(108, 192), (300, 400)]
MODEL_HW = (32, 32)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated and still alive during ``fn()`` (what it holds at its worst).

    CUDA: ``torch.cuda.max_memory_allocated`` over the call (the caching allocator sees every
    tensor, workspaces included). CPU: torch's profiler with ``profile_memory=True``; every
    allocation (charged to the innermost op that made it, at that op's start) and every free is
    replayed in time order and the running total's maximum is returned. Scratch memory that an op
    allocates and frees inside itself without torch's allocator (oneDNN workspaces) is not seen.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


def interleaved(cases: dict[str, Callable[[], object]], repeat: int, device: torch.device
                ) -> dict[str, dict[str, float]]:
    """{case: {"median_s", "min_s"}}: one warm-up round, then ``repeat`` rounds of every case once."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeat):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(v), "min_s": min(v)} for name, v in times.items()}


def _protect(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Slot grid of x (B, C, H, W) under perm (N,) or per frame (B, N)."""
    b, c, h, w = x.shape
    idx = perm.view(1, 1, -1) if perm.dim() == 1 else perm.unsqueeze(1)
    return torch.gather(x.reshape(b, c, h * w), 2, idx.expand(b, c, h * w)).view(b, c, h, w)


def _timed_build(fn: Callable[[], nn.Module], repeat: int = 3) -> tuple[nn.Module, float]:
    """(the built module, median build time of ``repeat`` builds after a warm-up build)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _model_row(name: str, shape: tuple[int, int, int], b: int, repeat: int, key: Key,
               device: torch.device) -> dict:
    c, h, w = shape
    n = h * w
    torch.manual_seed(0)
    model = build_model(name, c, 10).to(device).eval()
    perm = random_permutation_torch(key.subkey("bench/input"), n, device)
    frames = torch.stack([random_permutation_torch(key.subkey("bench/input", i), n, device) for i in range(b)])
    x = torch.randn(b, *shape, device=device)
    x_prot, x_rot = _protect(x, perm), _protect(x, frames)
    index = list(range(b))
    fused, build_fused = _timed_build(lambda: keyed(model, key, shape, perm, mode="fused").eval())
    fast, build_fast = _timed_build(lambda: keyed(model, key, shape, perm, mode="fast").eval())
    x_cl = x.contiguous(memory_format=torch.channels_last)
    cases = {"plain": lambda: model(x), "fused": lambda: fused(x_prot), "fast": lambda: fast(x_prot),
             "rotating": lambda: fused(x_rot, input_perm=frames, frame_index=index),
             "plain_channels_last": lambda: model(x_cl)}
    with torch.inference_mode():
        times = interleaved(cases, repeat, device)
        memory = {mode: peak_memory(fn, device) for mode, fn in cases.items()}
    row: dict[str, Any] = {"model": name, "input": list(shape), "batch": b,
                           "fused_build_s": build_fused, "fast_build_s": build_fast}
    plain_s = times["plain"]["median_s"]
    for mode in cases:
        t = times[mode]["median_s"]
        row[f"{mode}_images_per_s"] = b / t
        row[f"{mode}_median_s"] = t
        row[f"{mode}_min_s"] = times[mode]["min_s"]
        row[f"{mode}_time_over_plain"] = t / plain_s
        row[f"{mode}_peak_bytes"] = memory[mode]
        row[f"{mode}_peak_over_plain"] = memory[mode] / max(memory["plain"], 1)
    return row


def bench_models(batch: int, repeat: int, key: Key, device: torch.device, quick: bool) -> list[dict]:
    return [_model_row(name, shape, fixed_batch or batch, repeat, key, device)
            for name, shape, fixed_batch in (QUICK_MODEL_CASES if quick else MODEL_CASES)]


def _frontend_row(height: int, width: int, model: nn.Module, repeat: int, key: Key, device: torch.device
                  ) -> dict:
    n = height * width
    static = torch.from_numpy(readout_permutation(key, "pixel", height, width).plane_tables()).to(device)
    frame_index = 5

    def readout_table() -> torch.Tensor:  # what the classifier builds for each rotated frame
        table = readout_permutation(key, "pixel", height, width, frame_index).plane_tables()
        return torch.from_numpy(table).to(device).view(1, n)

    t0 = time.perf_counter()
    rotated = readout_table()
    readout_table_s = time.perf_counter() - t0
    x = torch.rand(1, 1, height, width, device=device)
    x_prot, x_rot = _protect(x, static), _protect(x, rotated)
    net, build_s = _timed_build(lambda: keyed(model, key, (1, height, width), static, mode="fused",
                                              model_hw=MODEL_HW).eval())
    front, orders = net.frontend, net.frame_orders

    def per_frame() -> torch.Tensor:
        with orders.active(orders.build([frame_index], device)):
            return front(x_rot, input_perm=rotated)

    cases = {"plain": lambda: area_resize(x, MODEL_HW), "keyed_static": lambda: front(x_prot),
             "keyed_per_frame": per_frame,
             "frontend_and_compact_rotating": lambda: net(x_rot, input_perm=rotated, frame_index=[frame_index]),
             "with_readout_table": lambda: net(x_rot, input_perm=readout_table(), frame_index=[frame_index])}
    with torch.inference_mode():
        times = interleaved(cases, repeat, device)
        memory = {mode: peak_memory(cases[mode], device) for mode in ("plain", "keyed_static", "keyed_per_frame")}
    row: dict[str, Any] = {"frame": [height, width], "model_input": list(MODEL_HW), "scheme": "pixel",
                           "kind": "binning" if front.binning else "area",
                           "keyed_build_s": build_s, "readout_table_per_frame_s": readout_table_s}
    for mode, t in times.items():
        row[f"{mode}_ms"] = 1e3 * t["median_s"]
        row[f"{mode}_min_ms"] = 1e3 * t["min_s"]
    for mode, peak in memory.items():
        row[f"{mode}_peak_bytes"] = peak
    row["frontend_and_compact_rotating_frames_per_s"] = 1 / times["frontend_and_compact_rotating"]["median_s"]
    row["with_readout_table_frames_per_s"] = 1 / times["with_readout_table"]["median_s"]
    return row


def bench_frontend(repeat: int, key: Key, device: torch.device, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    model = build_model("compact", 1, 10).to(device).eval()
    return [_frontend_row(h, w, model, repeat, key, device)
            for h, w in (QUICK_FRONTEND_SIZES if quick else FRONTEND_SIZES)]


@torch.inference_mode()
def bench_pool(key: Key, repeat: int, device: torch.device, quick: bool) -> dict:
    b = 8 if quick else 64
    pool = nn.MaxPool2d(2)
    perm_in = random_permutation_torch(key.subkey("bench/pool/in"), 32 * 32, device)
    perm_out = random_permutation_torch(key.subkey("bench/pool/out"), 16 * 16, device)
    keyed_pool = KeyedMaxPool2d(pool, (32, 32), in_perm=perm_in, out_perm=perm_out, device=device)
    x = torch.randn(b, 64, 32, 32, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    times = interleaved({"plain": lambda: pool(x), "keyed": lambda: keyed_pool(x_cl)}, repeat, device)
    plain_s, keyed_s = times["plain"]["median_s"], times["keyed"]["median_s"]
    return {"op": f"max_pool2d 2x2 on ({b}, 64, 32, 32)", "plain_s": plain_s, "keyed_s": keyed_s,
            "keyed_over_plain_time": keyed_s / plain_s, "reference_repo_quoted_s": 0.85}


def targets(result: dict) -> list[dict]:
    """The issue's targets against this run."""
    out = []

    def add(what: str, target: str, value: float, ok: bool) -> None:
        out.append({"what": what, "target": target, "measured": value, "met": bool(ok)})

    for r in result["models"]:
        tag = f"{r['model']} batch {r['batch']} {'x'.join(map(str, r['input']))}"
        big = r["input"][1] > 32
        if r["model"] != "compact":
            limit = 2.0 if big else 1.5
            add(f"{tag}: fused time / plain", f"<= {limit}", r["fused_time_over_plain"],
                r["fused_time_over_plain"] <= limit)
        add(f"{tag}: fast time / plain", "<= 1.10", r["fast_time_over_plain"], r["fast_time_over_plain"] <= 1.10)
        add(f"{tag}: fused peak memory / plain", "<= 2", r["fused_peak_over_plain"], r["fused_peak_over_plain"] <= 2)
        if r["model"] == "vgg16_bn":
            add(f"{tag}: all tables built (fused)", "<= 0.050 s", r["fused_build_s"], r["fused_build_s"] <= 0.05)
    for r in result["frontend"]:
        tag = f"front end {r['frame'][0]}x{r['frame'][1]} -> 32x32"
        if r["frame"] == [1080, 1920]:
            fps = r["frontend_and_compact_rotating_frames_per_s"]
            add(f"{tag} + compact, rotation (readout table given): frames/s", ">= 100", fps, fps >= 100)
            fps = r["with_readout_table_frames_per_s"]
            add(f"{tag} + compact, rotation (readout table built per frame): frames/s", ">= 100", fps, fps >= 100)
        if r["frame"] == [3000, 4000]:
            add(f"{tag} alone, static table: ms per frame", "<= 20", r["keyed_static_ms"], r["keyed_static_ms"] <= 20)
            add(f"{tag} alone, per-frame table: ms per frame", "<= 20", r["keyed_per_frame_ms"],
                r["keyed_per_frame_ms"] <= 20)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the tables live there too)")
    parser.add_argument("--quick", action="store_true", help="small settings: checks that every row runs")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeat < 1:
        parser.error("--batch and --repeat must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = min(args.batch, 4) if args.quick else args.batch
    repeat = 1 if args.quick else args.repeat
    key = Key(bytes(range(32)))  # a fixed public test key: benchmarks protect nothing
    result: dict[str, Any] = {
        "benchmark": "model", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor() or None, "device": str(device),
        "settings": {"batch": batch, "repeat": repeat, "quick": args.quick},
        "models": bench_models(batch, repeat, key, device, args.quick),
        "frontend": bench_frontend(repeat, key, device, args.quick),
        "keyed_pool": bench_pool(key, repeat, device, args.quick)}
    result["targets"] = targets(result)
    print(f"{'model':<12} {'input':>10} {'batch':>5} {'plain img/s':>11} {'fused':>7} {'fast':>7} {'rotating':>8} "
          f"{'plain CL':>8} {'fused mem':>9} {'build s':>8}   (time / plain)")
    for r in result["models"]:
        shape = "x".join(map(str, r["input"]))
        print(f"{r['model']:<12} {shape:>10} {r['batch']:>5} {r['plain_images_per_s']:>11.1f} "
              f"{r['fused_time_over_plain']:>7.2f} {r['fast_time_over_plain']:>7.2f} "
              f"{r['rotating_time_over_plain']:>8.2f} {r['plain_channels_last_time_over_plain']:>8.2f} "
              f"{r['fused_peak_over_plain']:>9.2f} {r['fused_build_s']:>8.3f}")
    for r in result["frontend"]:
        print(f"front end {r['frame'][0]}x{r['frame'][1]} -> 32x32 ({r['kind']}): plain {r['plain_ms']:.1f} ms, "
              f"keyed static {r['keyed_static_ms']:.1f} ms, per-frame {r['keyed_per_frame_ms']:.1f} ms, "
              f"+ compact rotating {r['frontend_and_compact_rotating_frames_per_s']:.1f} frames/s "
              f"({r['with_readout_table_frames_per_s']:.1f} with the readout table); build {r['keyed_build_s']:.3f} s")
    p = result["keyed_pool"]
    print(f"keyed max-pool: {p['keyed_s'] * 1e3:.1f} ms (plain {p['plain_s'] * 1e3:.1f} ms; "
          f"reference repo quoted {p['reference_repo_quoted_s'] * 1e3:.0f} ms)")
    for t in result["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'} {t['what']}: {t['measured']:.3f} (target {t['target']})")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
