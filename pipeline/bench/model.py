"""Throughput of keyed models against their plain twins, and the cost of building the tables.

Run: ``python -m pipeline.bench.model --json out.json [--batch 64 --repeat 5]``

Per architecture (compact on 1x28x28, VGG16-BN and PreResNet-20 on 3x32x32): images/s of the
plain model, the keyed twin in fused mode (every feature map permuted) and in fast mode (first
layer keyed only), with ratios against plain measured in the same run; the keyed twin's build
time (all gather tables, vectorised); and a keyed 2x2 max-pool on a (64, 64, 32, 32) map, the
operation the reference implementation runs in a Python loop (quoted at ~0.85 s per batch of 64
on a 2-core CPU, and ~2 s to build VGG16's offsets; those two numbers are the reference's, not
re-measured here).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from models.keyed import keyed
from models.keyed_layers import KeyedMaxPool2d
from models.plain import build_model
from models.tables import random_permutation_torch
from pipeline.bench.common import median_seconds, write_json
from sensor.keys import Key

CASES = [("compact", (1, 28, 28)), ("vgg16_bn", (3, 32, 32)), ("preresnet20", (3, 32, 32))]


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


@torch.inference_mode()
def bench_models(batch: int, repeat: int, key: Key) -> list[dict]:
    rows = []
    for name, shape in CASES:
        torch.manual_seed(0)
        model = build_model(name, shape[0], 10).eval()
        perm = random_permutation_torch(key.seed("bench/input"), shape[1] * shape[2])
        x = torch.randn(batch, *shape)
        t0 = time.perf_counter()
        fused = keyed(model, key, shape, perm, mode="fused").eval()
        build_s = time.perf_counter() - t0
        fast = keyed(model, key, shape, perm, mode="fast").eval()
        plain_s = median_seconds(lambda m=model, x=x: m(x), repeat)
        fused_s = median_seconds(lambda m=fused, x=x: m(x), repeat)
        fast_s = median_seconds(lambda m=fast, x=x: m(x), repeat)
        rows.append({"model": name, "input": list(shape), "batch": batch,
                     "plain_images_per_s": batch / plain_s, "fused_images_per_s": batch / fused_s,
                     "fast_images_per_s": batch / fast_s, "fused_over_plain": plain_s / fused_s,
                     "fast_over_plain": plain_s / fast_s, "keyed_build_s": build_s})
    return rows


@torch.inference_mode()
def bench_pool(key: Key, repeat: int) -> dict:
    pool = nn.MaxPool2d(2)
    perm_in = random_permutation_torch(key.seed("bench/pool/in"), 32 * 32)
    perm_out = random_permutation_torch(key.seed("bench/pool/out"), 16 * 16)
    keyed_pool = KeyedMaxPool2d(pool, (32, 32), in_perm=perm_in, out_perm=perm_out)
    x = torch.randn(64, 64, 32, 32)
    plain_s = median_seconds(lambda: pool(x), repeat)
    keyed_s = median_seconds(lambda: keyed_pool(x), repeat)
    return {"op": "max_pool2d 2x2 on (64, 64, 32, 32)", "plain_s": plain_s, "keyed_s": keyed_s,
            "keyed_over_plain_time": keyed_s / plain_s, "reference_repo_quoted_s": 0.85}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    key = Key(bytes(range(32)))  # a fixed public test key: benchmarks protect nothing
    result = {"benchmark": "model", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "processor": platform.processor() or None,
              "models": bench_models(args.batch, args.repeat, key), "keyed_pool": bench_pool(key, args.repeat)}
    print(f"{'model':<12} {'plain img/s':>12} {'fused img/s':>12} {'fast img/s':>12} {'fused/plain':>12} "
          f"{'build s':>8}")
    for r in result["models"]:
        print(f"{r['model']:<12} {r['plain_images_per_s']:>12.1f} {r['fused_images_per_s']:>12.1f} "
              f"{r['fast_images_per_s']:>12.1f} {r['fused_over_plain']:>12.3f} {r['keyed_build_s']:>8.3f}")
    p = result["keyed_pool"]
    print(f"keyed max-pool batch 64: {p['keyed_s'] * 1e3:.1f} ms (plain {p['plain_s'] * 1e3:.1f} ms; "
          f"reference repo quoted {p['reference_repo_quoted_s'] * 1e3:.0f} ms)")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
