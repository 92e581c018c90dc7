"""Replay throughput, local vs Ray, on the same recordings; Ray scaling with 1 and 2 model actors.

Run: ``python -m pipeline.bench.ray --json out.json [--recordings 4 --frames 2500 --batch 64 --actors 1,2
--ray-address ADDR --rounds 2]`` (needs the optional extra ``ray``).

Recordings: random 28x28 scenes through the mono10 sensor, pixel scheme, a fixed public test key
(benchmarks protect nothing); the model is a randomly initialised compact net (throughput does not
depend on the weights). Baseline: ``pipeline.stream.run.replay_recording`` on each recording in turn, in
this process as ``privcam replay`` runs it (torch ends with one thread per core), and in a child process
limited to one thread (the per-core rate). Ray:
``pipeline.ray.replay.replay_on_ray`` with 1 CPU and 1 torch thread per actor, so the actor count is
the only thing that changes. Rounds are interleaved, best of each. Reported per Ray run: end-to-end
frames/s (actor start included), seconds to the first prediction and the steady rate after it, and
whether every prediction equals the local replay's. A local Ray started here runs its workers at
niceness 0 like this process (Ray's default, 15, would let other jobs on a shared machine starve
them). Also measured, for the scaling analysis: the
object store's put and get rate on this node, the bytes one frame costs in it, one model actor's
memory (resident set, parameters, gather tables) and the rate at which the driver takes in predictions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import save_checkpoint
from models.plain import build_model
from pipeline.resources import resolve
from pipeline.stream.recording import Recorder
from pipeline.stream.run import RunConfig, replay_recording
from sensor.config import SensorConfig
from sensor.keys import Key, new_session_nonce, write_key_file
from sensor.scene import render_photons
from sensor.sensor import Sensor

PROFILE = "configs/sensors/mono10.yaml"
HW = (28, 28)


def make_world(root: Path, recordings: int, frames: int, rotation: bool) -> tuple[str, str, list[str]]:
    """Key file, random-weight checkpoint and ``recordings`` files of ``frames`` protected frames each."""
    key = Key(bytes(range(32)))  # fixed public test key
    key_file = root / "bench.key"
    write_key_file(key_file, key)
    torch.manual_seed(0)
    arch = {"name": "compact", "in_channels": 1, "num_classes": 10}
    save_checkpoint(root / "m.pt", build_model(**arch), arch, {"scheme": "pixel"})
    cfg = SensorConfig.from_yaml(resolve(PROFILE))  # the shipped profile outside a checkout
    sensor, rng = Sensor(cfg, seed=0), np.random.default_rng(0)
    paths = []
    for r in range(recordings):
        path = root / f"rec{r:03d}.mcap"
        session = key.for_session(new_session_nonce())  # each recording is a capture session of its own
        with Recorder(path, cfg.to_dict(), "pixel", rotation, key.fingerprint, session=session.session,
                      store_labels=True) as rec:  # labelled: the bench reports accuracy beside throughput
            for i in range(r * frames, (r + 1) * frames):
                scene = render_photons(rng.integers(0, 256, HW, dtype=np.uint8), cfg)
                rec.write(sensor.capture(scene, session, frame_index=i, scheme="pixel", rotation=rotation,
                                         label=i % 10))
        paths.append(str(path))
    return str(key_file), str(root / "m.pt"), paths


def local_replay(paths: list[str], key_file: str, checkpoint: str, batch: int, out_dir: Path) -> dict:
    """Each recording in turn through the local pipeline, as ``privcam replay`` runs it; predictions kept."""
    frames, pipeline_s, lines = 0, 0.0, []
    t0 = time.perf_counter()
    for path in paths:
        out = out_dir / f"{Path(path).stem}.local.jsonl"
        cfg = RunConfig.from_dict({"key": {"file": key_file}, "pipeline": {"batch_size": batch},
                                   "model": {"checkpoint": checkpoint, "device": "cpu"},
                                   "output": {"predictions": str(out)}})
        summary = replay_recording(path, cfg, progress=False)
        frames += summary["frames"]
        pipeline_s += summary["wall_s"]
        lines += ['{"recording": ' + json.dumps(path) + ", " + line[1:] for line in out.read_text().splitlines()]
    wall = time.perf_counter() - t0
    return {"torch_threads": torch.get_num_threads(), "frames": frames, "wall_s": wall,
            "frames_per_s": frames / wall, "pipeline_frames_per_s": frames / pipeline_s, "lines": lines}


def local_replay_one_thread(paths: list[str], key_file: str, checkpoint: str, batch: int, out_dir: Path) -> dict:
    """:func:`local_replay` in a child process limited to one thread (OMP_NUM_THREADS=NUMBA_NUM_THREADS=1): the
    per-core rate. In-process this is not possible: building the keyed model resets torch to one thread per core."""
    code = ("import json, sys; from pathlib import Path; from pipeline.bench.ray import local_replay; "
            "a = json.loads(sys.argv[1]); r = local_replay(a[0], a[1], a[2], a[3], Path(a[4])); "
            "r.pop('lines'); print(json.dumps(r))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps([paths, key_file, checkpoint, batch, str(out_dir)])],
                          env=env, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def ray_replay(paths: list[str], key_file: str, checkpoint: str, batch: int, actors: int, out: Path,
               ray_address: str | None) -> dict:
    from pipeline.ray.cluster import cluster_cpus
    from pipeline.ray.datasource import READ_CPUS
    from pipeline.ray.replay import replay_on_ray

    total, node = cluster_cpus()
    cpus = min(1.0, node, math.floor((total - READ_CPUS) / actors * 100) / 100)  # 1 torch thread per actor
    summary = replay_on_ray(paths, key_file, checkpoint, str(out), batch_size=batch, actors=actors, mode="fused",
                            ray_address=ray_address, progress=False, device="cpu", cpus_per_actor=cpus)
    if summary["error"]:
        raise RuntimeError(f"Ray replay failed: {summary['error']}")
    first = summary["first_prediction_s"] or 0.0
    steady = (summary["frames"] - batch) / (summary["wall_s"] - first) if summary["wall_s"] > first else None
    return {"actors": actors, "cpus_per_actor": cpus, "frames": summary["frames"], "wall_s": summary["wall_s"],
            "frames_per_s": summary["frames_per_s"], "first_prediction_s": summary["first_prediction_s"],
            "steady_frames_per_s": steady, "lines": out.read_text().splitlines()}


def object_store_rates(megabytes: int = 64, repeat: int = 3) -> dict:
    """Same-node object store: ray.put from the driver, and a remote task's result fetched by the driver (GB/s)."""
    import ray

    data = np.random.default_rng(0).integers(0, 255, megabytes << 20, dtype=np.uint8)

    @ray.remote(num_cpus=0)
    def produce(n: int) -> np.ndarray:
        return np.ones(n, np.uint8)

    ray.get(produce.remote(1))  # warm a worker
    puts, gets = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ref = ray.put(data)
        puts.append(time.perf_counter() - t0)
        del ref
        ref = produce.remote(data.size)
        ray.wait([ref])
        t0 = time.perf_counter()
        got = ray.get(ref)
        got = np.array(got, copy=True)  # ray.get is zero-copy on one node; the copy makes it a transfer
        gets.append(time.perf_counter() - t0)
        del ref, got
    gb = data.size / 1e9
    return {"megabytes": megabytes, "put_GB_per_s": gb / min(puts), "get_and_copy_GB_per_s": gb / min(gets),
            "note": "one node: shared memory; across nodes the network between them bounds the transfer"}


def actor_memory(key_file: str, checkpoint: str, threads: int = 1) -> dict:
    """Resident memory of one model actor before and after building the keyed model, and its tensor bytes."""
    import ray

    from pipeline.stream.classifier import FrameFormat

    def rss_mb() -> float | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return None

    @ray.remote(num_cpus=0)
    def measure(fmt: dict) -> dict:
        from pipeline.ray.replay import KeyedBatchPredictor

        before = rss_mb()
        predictor = KeyedBatchPredictor(key_file, checkpoint, "fused", "cpu", threads)
        model = predictor.classifier(FrameFormat(**fmt)).model
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return {"rss_before_model_mb": before, "rss_with_model_mb": rss_mb(), "parameter_bytes": params,
                "buffer_bytes_incl_gather_tables": buffers}

    cfg = SensorConfig.from_yaml(resolve(PROFILE))  # the shipped profile outside a checkout
    fmt = {"scheme": "pixel", "rotation": False, "height": HW[0], "width": HW[1], "black_level": cfg.black_level_dn,
           "max_dn": cfg.max_dn}
    return ray.get(measure.remote(fmt))


def driver_sink_rate(root: Path, batches: int = 400, batch: int = 64) -> dict:
    """Frames/s the driver can take in: prediction rows (pyarrow, shuffled batch order) -> reorder -> file."""
    import pyarrow as pa

    from pipeline.ray.datasource import PREDICTION_SCHEMA, RecordingHeader
    from pipeline.ray.replay import ReorderingSink
    from pipeline.stream.sinks import PredictionWriter

    header = RecordingHeader(0, "synthetic.mcap", None, "pixel", False, 16, 1023, None, 0)
    rows = [{"rec_index": 0, "batch_index": b, "frame_index": list(range(b * batch, (b + 1) * batch)),
             "label": [b % 10] * batch, "pred": [1] * batch, "confidence": [0.123456789] * batch, "note": None}
            for b in range(batches)]
    np.random.default_rng(0).shuffle(rows)
    report = {"kind": "report", "batches": batches, "fmt": None, "replay_report": None, "error": None}
    rows.append({"rec_index": 0, "batch_index": -1, "frame_index": None, "label": None, "pred": None,
                 "confidence": None, "note": json.dumps(report)})
    tables = [pa.Table.from_pylist(rows[i:i + 4], schema=PREDICTION_SCHEMA) for i in range(0, len(rows), 4)]
    rates = {}
    for suffix in (".jsonl", ".parquet"):
        writer = PredictionWriter(str(root / f"sink{suffix}"), None, False, lead="recording")
        sink = ReorderingSink([header], writer)
        t0 = time.perf_counter()
        for table in tables:
            for row in table.to_pylist():
                sink.add(row)
        writer.close()
        rates[f"{suffix[1:]}_frames_per_s"] = writer.count / (time.perf_counter() - t0)
    return rates


def run(args: argparse.Namespace, root: Path) -> dict:
    from pipeline.ray.cluster import ensure_ray, ray_info

    key_file, checkpoint, paths = make_world(root, args.recordings, args.frames, args.rotation)
    frame_bytes = HW[0] * HW[1] * 2
    if not args.ray_address:  # Ray starts workers at niceness 15: on a shared machine that alone would slow them
        os.environ.setdefault("RAY_worker_niceness", "0")  # against the local replay (niceness 0)
    started = ensure_ray(args.ray_address, num_cpus=args.num_cpus)
    try:
        actor_counts = [int(a) for a in args.actors.split(",")]
        local_runs, local1_runs, ray_runs = [], [], {a: [] for a in actor_counts}
        for r in range(args.rounds):
            local_runs.append(local_replay(paths, key_file, checkpoint, args.batch, root))
            local1_runs.append(local_replay_one_thread(paths, key_file, checkpoint, args.batch, root))
            for a in actor_counts:
                ray_runs[a].append(ray_replay(paths, key_file, checkpoint, args.batch, a, root / f"ray{a}_{r}.jsonl",
                                              args.ray_address))
        result = summarise(local_runs, local1_runs, ray_runs, args, frame_bytes)
        result["object_store"] = object_store_rates()
        result["actor_memory"] = actor_memory(key_file, checkpoint)
        result["driver_sink"] = driver_sink_rate(root)
        result["ray"] = ray_info(args.ray_address)
        return result
    finally:
        if started:
            import ray

            ray.shutdown()


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["frames_per_s"])


def summarise(local_runs: list[dict], local1_runs: list[dict], ray_runs: dict[int, list[dict]],
              args: argparse.Namespace, frame_bytes: int) -> dict:
    local, local1 = _best(local_runs), _best(local1_runs)
    want = local["lines"]
    rows = []
    for runs in ray_runs.values():
        best = _best(runs)
        rows.append({k: v for k, v in best.items() if k != "lines"}
                    | {"identical_to_local": all(r["lines"] == want for r in runs),
                       "over_local": best["frames_per_s"] / local["frames_per_s"],
                       "steady_over_local": (best["steady_frames_per_s"] or 0) / local["frames_per_s"]})
    by = {r["actors"]: r for r in rows}
    scaling = None
    if 1 in by and 2 in by:
        scaling = {"end_to_end_2_over_1": by[2]["frames_per_s"] / by[1]["frames_per_s"],
                   "steady_2_over_1": (by[2]["steady_frames_per_s"] or 0) / (by[1]["steady_frames_per_s"] or 1)}
    return {"benchmark": "ray", "recordings": args.recordings, "frames_per_recording": args.frames,
            "batch": args.batch, "rotation": args.rotation, "rounds": args.rounds, "case": "mono10 28x28 pixel",
            "bytes_per_frame_in_object_store": frame_bytes + 200, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__,
            "local": {k: v for k, v in local.items() if k != "lines"},
            "local_1_thread": {k: v for k, v in local1.items() if k != "lines"},
            "ray_runs": rows, "scaling": scaling}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--recordings", type=int, default=4)
    parser.add_argument("--frames", type=int, default=2500, help="frames per recording")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rotation", action="store_true", help="per-frame key rotation")
    parser.add_argument("--ray-address", dest="ray_address", help="existing cluster (ray.init(address=...))")
    parser.add_argument("--num-cpus", dest="num_cpus", type=int, help="CPUs of a local Ray (default: all)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="privcam-bench-ray-") as tmp:
        result = run(args, Path(tmp))
    loc = result["local"]
    print(f"local replay ({loc['torch_threads']} threads)   {loc['frames_per_s']:9.1f} frames/s  "
          f"(1 thread {result['local_1_thread']['frames_per_s']:.1f})")
    for r in result["ray_runs"]:
        print(f"ray replay, {r['actors']} actor(s)      {r['frames_per_s']:9.1f} frames/s end to end, "
              f"{r['steady_frames_per_s'] or 0:9.1f} steady, first prediction after {r['first_prediction_s']} s, "
              f"identical: {r['identical_to_local']}")
    if result["scaling"]:
        print(f"2 actors / 1 actor: x{result['scaling']['end_to_end_2_over_1']:.2f} end to end, "
              f"x{result['scaling']['steady_2_over_1']:.2f} steady")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
