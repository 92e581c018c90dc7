"""The ``privcam`` command line. Each subcommand is a small function returning a summary dict;
``--json`` prints that dict on stdout for machines, otherwise a short human summary is shown.

Errors are one line on stderr: exit status 2 for a bad input (a PrivcamError, a bad option), 1 for a
failure of the machine (disk full, out of memory), 130 for Ctrl-C or SIGTERM (handled alike: outputs are
finalised, an existing output is never replaced by an interrupted run), 3 for a replay that finished but
skipped frames failing authentication (tampered, spliced, duplicated or without a MAC; see
:mod:`pipeline.stream.authcheck`): the other frames' predictions are written, and a warning names the
frames. Every numeric option has a range (checked by argparse, the error names the option), and every
output path is checked before any work (:func:`check_outputs`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sensor.config import SensorConfig
from sensor.errors import OutputPathError, PrivcamError
from sensor.rawio import EXTENSIONS as RAW_OUTPUT_SUFFIXES
from sensor.readout import SCHEMES

from ..memory import keep_freed_memory
from ..resources import COLOUR_PROFILE, DEFAULT_CHECKPOINT, MONO_PROFILE, RUN_CONFIG, resolve
from . import data_cmd
from .images import write_png
from .options import COUNT, EPOCHS, FRAME_INDEX, SEED, WORKERS, check_outputs, float_range, int_range

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
RAW_SUFFIXES = {".npy", ".raw", ".bin", ".dng", ".png", ".tif", ".tiff"}


class CliError(PrivcamError):
    """A bad command-line input; printed as one line, exit status 2."""


def load_sensor_config(path: str | None) -> SensorConfig:
    """The named YAML profile, or the built-in default (equal to configs/sensors/default.yaml)."""
    if path is None:
        return SensorConfig.from_yaml(resolve(COLOUR_PROFILE))
    return SensorConfig.from_yaml(resolve(path))


def read_scene_or_raw(path: Path) -> tuple[str, np.ndarray, Any]:
    """Classify INPUT: an 8-bit image is a scene, a 16-bit image or raw file is a raw frame.

    Returns ("scene", (H, W[, 3]) uint8 RGB, None) or ("raw", (H, W) uint16, RawMeta). Images are read
    through :func:`sensor.safeio.read_image` (regular files only, declared size checked first).
    """
    import cv2

    from sensor.rawio import read_raw
    from sensor.safeio import read_image

    if not path.exists():
        raise CliError(f"{path}: input not found")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        image = read_image(path, "unchanged", "an 8-bit image or a 16-bit raw PNG/TIFF")
        if image.dtype == np.uint8:
            if image.ndim == 3:
                image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
            return "scene", image, None
    if suffix in RAW_SUFFIXES:
        frame = read_raw(path)
        return "raw", frame.data, frame.meta
    if suffix in IMAGE_SUFFIXES:
        raise CliError(f"{path}: expected an 8-bit image or a 16-bit raw frame, got a {image.dtype} image")
    raise CliError(f"{path}: unknown input type '{suffix}', expected an 8-bit image "
                   f"({', '.join(sorted(IMAGE_SUFFIXES))}) or a raw frame "
                   f"({', '.join(sorted(RAW_SUFFIXES))})")


def cmd_capture(args: argparse.Namespace) -> dict[str, Any]:
    from sensor.rawio import RawMeta, sidecar_path, write_raw
    from sensor.scene import raw_to_photons, raw_to_srgb, render_photons
    from sensor.sensor import Sensor

    out = Path(args.out)
    sidecar = None if out.suffix.lower() == ".dng" else str(sidecar_path(out))
    check_outputs([(args.out, "--out", RAW_OUTPUT_SUFFIXES), (sidecar, "--out (its .yaml sidecar)", None),
                   (args.preview, "--preview", (".png",))], [args.input, args.sensor and resolve(args.sensor)])
    config = load_sensor_config(args.sensor)
    if args.exposure_s is not None:
        config = config.replace(exposure_s=args.exposure_s)
    kind, data, meta = read_scene_or_raw(Path(args.input))
    photons = render_photons(data, config) if kind == "scene" else raw_to_photons(data, meta, config)
    sensor = Sensor(config, seed=args.seed)
    if args.key:
        from ..stream.run import open_session

        key = open_session(args.key)  # a capture is a session of its own: a fresh public nonce
        frame = sensor.capture(photons, key, frame_index=args.frame_index, scheme=args.scheme,
                               rotation=args.rotation).data
    else:
        frame = sensor.expose(photons, frame_index=args.frame_index)
    out_meta = RawMeta(width=frame.shape[1], height=frame.shape[0], bit_depth=config.bit_depth,
                       cfa=config.cfa, black_level=config.black_level_dn, white_level=config.max_dn)
    write_raw(args.out, frame, out_meta)
    summary: dict[str, Any] = {
        "input": str(args.input), "input_kind": kind, "out": str(args.out), "sensor": config.name,
        "shape": list(frame.shape), "bit_depth": config.bit_depth, "cfa": config.cfa,
        "frame_index": args.frame_index, "seed": args.seed,
        "mean_dn": float(frame.mean()), "saturated_fraction": float((frame == config.max_dn).mean()),
        "protected": bool(args.key),
    }
    if args.key:
        summary.update(scheme=args.scheme, rotation=args.rotation, key_fingerprint=key.fingerprint,
                       session=key.session)
    if args.preview:
        preview = raw_to_srgb(frame, config)
        write_png(Path(args.preview), preview)
        summary["preview"] = str(args.preview)
    return summary


def cmd_ptc(args: argparse.Namespace) -> dict[str, Any]:
    from sensor.ptc import default_exposures_s, photon_transfer

    config = load_sensor_config(args.sensor)
    if args.analog_gain is not None:
        config = config.replace(analog_gain=args.analog_gain)
    result = photon_transfer(config, default_exposures_s(config, args.points), (args.size, args.size),
                             seed=args.seed)
    return {"sensor": config.name, "configured_gain_dn_per_e": config.system_gain_dn_per_e,
            "configured_read_noise_e": config.read_noise_e, **result.to_dict()}


def cmd_keygen(args: argparse.Namespace) -> dict[str, Any]:
    from sensor.keys import load_key_file, parse_nonce, write_key_file

    if (args.session_of is None) != (args.nonce is None):
        raise PrivcamError("--session-of and --nonce go together: the master key file and the recording's session "
                         "nonce (32 hex digits; privcam replay --json shows it as \"session\")")
    if not Path(args.out).exists():  # an existing file is refused by write_key_file itself
        check_outputs([(args.out, "--out", None)])
    if args.session_of is None:
        key = write_key_file(args.out)
        return {"key_file": str(args.out), "fingerprint": key.fingerprint, "mode": "0600"}
    master = load_key_file(args.session_of)
    key = write_key_file(args.out, master.for_session(parse_nonce(args.nonce, "--nonce")))
    return {"key_file": str(args.out), "fingerprint": key.fingerprint, "session": key.session, "mode": "0600",
            "opens": f"the frames of session {key.session} only"}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .demo import run_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out}: expected a folder for the demo's files, got a file")
    if not out.exists():
        check_outputs([(str(out / "camera.key"), "--out", None)])
    return run_demo(out, args.limit, progress=not args.quiet, frame_size=args.frame_size and tuple(args.frame_size))




def load_run_config(args: argparse.Namespace):
    """configs/pipeline YAML, then --set overrides, then the convenience flags."""
    from sensor.configio import apply_overrides, read_yaml

    from ..stream.run import RunConfig

    path = resolve(args.config or RUN_CONFIG)
    data = read_yaml(path)
    sets = list(args.set or [])
    for flag, dotted in (("key", "key.file"), ("scheme", "key.scheme"), ("limit", "source.limit"),
                         ("dataset", "source.dataset"), ("data", "source.data"), ("checkpoint", "model.checkpoint"),
                         ("mode", "model.mode"), ("predictions", "output.predictions"),
                         ("batch_size", "pipeline.batch_size")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{dotted}={value}")
    if getattr(args, "rotation", False):
        sets.append("key.rotation=true")
    if getattr(args, "store_labels", False):
        sets.append("output.store_labels=true")
        print("privcam: warning: --store-labels writes each frame's class label into the recording; labelled "
              "protected frames are the training data of the learning attacks (use for evaluation only)",
              file=sys.stderr)
    return RunConfig.from_dict(apply_overrides(data, sets), str(path))


def add_run_options(p: argparse.ArgumentParser, model: bool = True, source: bool = True) -> None:
    p.add_argument("--config", help="pipeline YAML (default: configs/pipeline/default.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set pipeline.batch_size=128 (repeatable)")
    p.add_argument("--key", help="key file (privcam keygen)")
    if source:
        p.add_argument("--dataset", help="fashion-mnist | mnist | cifar10 | folder")
        p.add_argument("--data", help="dataset path")
        p.add_argument("--limit", type=COUNT, help="number of items from the split (>= 1)")
        p.add_argument("--scheme", choices=SCHEMES, help="readout permutation scheme")
        p.add_argument("--rotation", action="store_true", help="a fresh permutation per frame")
    if model:
        p.add_argument("--checkpoint", help="plain model checkpoint (.pt with its .json manifest)")
        p.add_argument("--mode", help="keyed network mode: fused (no feature map in natural order) or fast (only the "
                       "first layer keyed); checked against models.keyed.MODES")
        p.add_argument("--predictions", help="write predictions here (.jsonl or .csv)")
        p.add_argument("--batch-size", type=int_range(1, 1 << 16), dest="batch_size", help="frames per model batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_label_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-labels", dest="store_labels", action="store_true",
                   help="write each frame's class label into the recording (evaluation only: labelled protected "
                        "frames are exactly what the learning attacks train on; off by default)")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", action="store_true", help="run on Ray (pip install 'privcam[ray]')")
    p.add_argument("--actors", type=WORKERS, default=2, help="with --ray: model actors (default 2)")
    p.add_argument("--ray-address", help="with --ray: an existing cluster (ray.init(address=...)), e.g. auto")


def _finish(summary: dict[str, Any]) -> dict[str, Any]:
    """A run that stopped on an error exits non-zero after reporting what it processed."""
    if summary.get("error"):
        summary["exit_status"] = 1
    if summary.get("interrupted"):
        summary["exit_status"] = 130
    return summary


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from ..stream.run import run_pipeline

    cfg = load_run_config(args)
    if args.record:
        from dataclasses import replace

        cfg = replace(cfg, output=replace(cfg.output, record=args.record))
    if args.ray:
        from ..ray.cameras import run_cameras_on_ray

        return _finish(run_cameras_on_ray(cfg, cameras=args.cameras, actors=args.actors,
                                          ray_address=args.ray_address, progress=not args.quiet))
    return _finish(run_pipeline(cfg, progress=not args.quiet))


def cmd_record(args: argparse.Namespace) -> dict[str, Any]:
    from ..stream.run import record_frames

    return _finish(record_frames(load_run_config(args), args.out, progress=not args.quiet))


def cmd_replay(args: argparse.Namespace) -> dict[str, Any]:
    from ..stream.run import replay_recording

    cfg = load_run_config(args)
    if args.ray:
        from ..ray.replay import replay_on_ray
        from ..stream.sinks import OUTPUT_SUFFIXES

        check_outputs([(cfg.output.predictions, "--predictions", OUTPUT_SUFFIXES)],
                      [*args.recording, cfg.key.file, resolve(cfg.model.checkpoint)])
        summary = replay_on_ray(args.recording, cfg.key.file or "", cfg.model.checkpoint, out=args.predictions,
                                batch_size=cfg.pipeline.batch_size, actors=args.actors, mode=cfg.model.mode,
                                ray_address=args.ray_address, progress=not args.quiet, device=cfg.model.device)
    elif len(args.recording) != 1:
        raise CliError("replay: several recordings need --ray (or replay them one at a time)")
    else:
        summary = replay_recording(args.recording[0], cfg, progress=not args.quiet)
    report = summary.get("replay_report", {})
    if report.get("problems"):
        lost = report["frames_lost"]
        if report.get("lost_is_lower_bound"):
            lost = f"at least {lost}" if lost else "an unknown number of frames"
        skipped = f", {summary['skipped']} skipped" if summary.get("skipped") else ""
        print(f"privcam replay: {summary['frames']} intact frames replayed, {lost} lost{skipped}: "
              f"{'; '.join(report['problems'])}", file=sys.stderr)
    return _finish_replay(summary)


AUTH_FAILED = 3  # exit status of a replay that skipped frames failing authentication


def _finish_replay(summary: dict[str, Any]) -> dict[str, Any]:
    """:func:`_finish`, and exit status 3 with a warning when frames failed authentication (an error or an
    interruption keeps its own status)."""
    auth = (summary.get("replay_report") or {}).get("authentication") or {}
    if auth.get("failures"):
        kinds = ", ".join(f"{kind} {_indices(auth[kind])}" for kind in ("tampered", "spliced", "duplicated",
                                                                       "unauthenticated") if auth.get(kind))
        print(f"privcam replay: warning: {auth['failures']} frames failed authentication and were skipped "
              f"({kinds}); exit status {AUTH_FAILED}", file=sys.stderr)
        summary["exit_status"] = AUTH_FAILED
    return _finish(summary)


def _indices(items: list[Any], shown: int = 10) -> str:
    """Frame indices (or Ray's {"recording", "frame_index"} entries) as short text."""
    text = [str(i) if not isinstance(i, dict) else f"{Path(i['recording']).name}#{i['frame_index']}"
            for i in items[:shown]]
    return "[" + ", ".join(text) + (", ..." if len(items) > shown else "") + "]"


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from sensor.configio import apply_overrides, read_yaml

    from ..lab.train import TrainConfig, train

    data = read_yaml(resolve(args.config)) if args.config else {}
    sets = list(args.set or [])
    for flag in ("dataset", "data", "model", "scheme", "epochs", "out", "limit_train", "limit_test", "sensor"):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{flag}={value}")
    cfg = TrainConfig.from_dict(apply_overrides(data, sets), args.config or "train options")
    manifest = train(cfg, progress=not args.quiet, overwrite=args.force)
    return {k: v for k, v in manifest.items() if k not in ("history", "sensor", "train_config")}


def cmd_show(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from models.checkpoint import check_model_input, load_checkpoint, model_input_hw
    from models.plain import build_model
    from sensor.keys import load_key_file
    from sensor.scene import colour_chart

    from ..stream.inputs import input_shape
    from .show import show_panels

    check_outputs([(args.out, "--out", (".png",))],
                  [args.image, args.key, args.checkpoint and resolve(args.checkpoint),
                   args.sensor and resolve(args.sensor)])
    config = load_sensor_config(args.sensor)
    if args.image:
        kind, scene, _ = read_scene_or_raw(Path(args.image))
        if kind != "scene":
            raise CliError(f"{args.image}: show expects an 8-bit image as the scene")
    else:
        scene = colour_chart(96, 144)
    h, w = scene.shape[:2]
    if args.scheme != "pixel" and (h % 2 or w % 2):
        scene = scene[: h - h % 2, : w - w % 2]
    key = load_key_file(args.key)
    h, w = scene.shape[:2]
    model_hw = None
    if args.checkpoint:
        model, manifest = load_checkpoint(resolve(args.checkpoint))
        model_hw = model_input_hw(model, manifest, input_shape(args.scheme, h, w),
                                  f"the {args.scheme} scheme on this {h}x{w} {config.cfa} frame", args.checkpoint)
        weights = args.checkpoint
    else:
        torch.manual_seed(0)
        model = build_model("compact", input_shape(args.scheme, *scene.shape[:2])[0], 10)
        weights = "random init (seed 0)"
        check_model_input(model, {}, input_shape(args.scheme, h, w),
                          f"the {args.scheme} scheme on this {h}x{w} {config.cfa} frame", "the compact net")
    figure, facts = show_panels(scene, config, key, args.scheme, model, args.frame_index, args.seed, model_hw)
    write_png(Path(args.out), figure)
    return {"out": args.out, "weights": weights, **facts}


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run a benchmark module; it prints its own table, the JSON result is returned (and kept in --out)."""
    import contextlib
    import importlib
    import tempfile

    check_outputs([(args.out, "--out", (".json",))])
    module = importlib.import_module(f"pipeline.bench.{args.what}")
    out = Path(args.out) if args.out else Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            module.main(list(args.extra) + ["--json", str(out)])
        result = json.loads(out.read_text())
    finally:
        if not args.out:
            out.unlink(missing_ok=True)
    return result if args.json else {"benchmark": args.what, "json": str(args.out) if args.out else None}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from sensor.keys import Key, load_key_file

    from ..lab.attacks import ConvergenceBudget
    from ..lab.evaluate import AttackBudget, accuracy_table
    from ..stream.datasets import load_dataset

    if args.what == "privacy":
        from .privacy_cmd import privacy_cli

        return privacy_cli(args)
    check_outputs([(args.out, "--out", (".json",))],
                  [args.key, args.data, resolve(args.checkpoint), resolve(args.sensor)])
    key = load_key_file(args.key) if args.key else Key.generate()
    test = load_dataset(args.dataset, "test", args.data).subset(args.limit_test)
    train = load_dataset(args.dataset, "train", args.data)
    sensor_cfg = load_sensor_config(args.sensor)
    budget = AttackBudget(train_images=args.attack_train_images, epochs=args.attack_epochs)
    convergence = ConvergenceBudget(train_images=max(2, args.attack_train_images),
                                    max_epochs=args.invariant_max_epochs, patience=args.invariant_patience)
    table = accuracy_table(str(resolve(args.checkpoint)), test, train, sensor_cfg, key, args.scheme, budget,
                           progress=not args.quiet, convergence=convergence,
                           frame_size=args.frame_size and tuple(args.frame_size))
    if args.out:
        from sensor.atomic import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(table, indent=2) + "\n")
    if not args.json:
        print(f"{table['dataset']}: {table['test_images']} test images, chance {table['chance']:.3f}")
        for mode in table["modes"]:
            for row in mode["rows"]:
                print(f"  {mode['key_mode']:<9} {row['row']}. {row['name']:<70} {row['accuracy']:.4f}")
        return {"out": args.out}
    return table


EXAMPLES = {
    "capture": "privcam capture photo.jpg --sensor configs/sensors/default.yaml --out frame.dng "
               "--preview preview.png\n  privcam capture photo.jpg --key camera.key --scheme quad --out protected.dng "
               "--preview protected.png",
    "ptc": "privcam ptc --sensor configs/sensors/mono10.yaml --analog-gain 4 --json",
    "keygen": "privcam keygen --out camera.key",
    "demo": "privcam demo --out demo_out",
    "run": "privcam run --key camera.key --limit 1000 --scheme pixel --rotation --predictions preds.jsonl --json",
    "record": "privcam record --key camera.key --limit 200 --out frames.mcap",
    "replay": "privcam replay frames.mcap --key camera.key --predictions preds.csv",
    "show": "privcam show photo.jpg --key camera.key --scheme quad --out show.png",
    "bench": "privcam bench readout --out readout.json -- --height 3000 --width 4000",
    "eval": "privcam eval accuracy --checkpoint models/weights/compact_fashion_mnist_pixel.pt --json",
    "train": "privcam train --config configs/train/compact_fashion_mnist.yaml",
    "data": data_cmd.EXAMPLE,
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one --help away), exit status 2 as before."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .privacy_cmd import add_privacy_arguments

    parser = Parser(
        prog="privcam",
        description="Simulated camera sensor with a keyed, privacy-preserving ADC readout.",
        epilog="Run 'privcam COMMAND --help' for the options and an example of each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
        return p

    p = add("capture", cmd_capture,
            "Expose an 8-bit image (rendered through an inverse ISP) or a raw frame on the emulated sensor "
            "and write the digitised raw frame (.dng, .npy, .png, .tif, .raw by extension); with --key, the "
            "frame as the keyed readout emits it.")
    p.add_argument("input", metavar="IMAGE_OR_RAW", help="8-bit image (scene) or raw frame")
    p.add_argument("--sensor", help="sensor profile YAML (default: configs/sensors/default.yaml)")
    p.add_argument("--out", required=True, help="output raw frame path")
    p.add_argument("--preview", help="also write a demosaiced, gamma-corrected PNG preview here")
    p.add_argument("--seed", type=SEED, default=0, help="temporal noise seed (default 0)")
    p.add_argument("--frame-index", type=FRAME_INDEX, default=0, help="frame counter n (default 0)")
    p.add_argument("--exposure-s", type=float_range(0, 3600), help="override the profile's exposure time (s)")
    p.add_argument("--key", help="master key file: read the frame out in the order of a fresh capture session "
                   "under this key (its public nonce is reported as \"session\"): the protected frame a keyed "
                   "camera emits (the preview then shows what anyone without the key sees)")
    p.add_argument("--scheme", default="pixel", choices=SCHEMES, help="readout scheme with --key (default pixel)")
    p.add_argument("--rotation", action="store_true",
                   help="with --key: the order of frame --frame-index instead of the static order")

    p = add("ptc", cmd_ptc,
            "Photon transfer measurement (EMVA 1288) on the emulator: recover K and read noise.")
    p.add_argument("--sensor", help="sensor profile YAML")
    p.add_argument("--analog-gain", type=float_range(0, 1e4),
                   help="override analog gain (read noise below 0.5 DN needs more gain)")
    p.add_argument("--points", type=int_range(2, 1000), default=12, help="number of exposures, 2-1000 (default 12)")
    p.add_argument("--size", type=int_range(16, 4096), default=256,
                   help="flat-field side in pixels, 16-4096 (default 256)")
    p.add_argument("--seed", type=SEED, default=0)

    p = add("keygen", cmd_keygen, "Create a 256-bit key file (hex, mode 0600), or with --session-of a session key "
            "file that opens one session's frames and nothing else (give it to a classifier host instead of the "
            "master key). Refuses to overwrite.")
    p.add_argument("--out", required=True, help="key file to create")
    p.add_argument("--session-of", dest="session_of", metavar="MASTER",
                   help="master key file to derive a session key from (with --nonce)")
    p.add_argument("--nonce", help="the session's public nonce, 32 hex digits (a recording's \"session\")")

    p = add("run", cmd_run, "Run the pipeline: dataset scenes -> sensor with keyed readout -> keyed classifier.")
    add_run_options(p)
    p.add_argument("--record", help="also record the protected frames to this .mcap file")
    add_label_option(p)
    add_ray_options(p)
    p.add_argument("--cameras", type=WORKERS, default=2, help="with --ray: simulated cameras (Ray actors)")

    p = add("record", cmd_record, "Capture protected frames into an MCAP recording (no model).")
    add_run_options(p, model=False)
    p.add_argument("--out", required=True, help="recording to write (.mcap)")
    add_label_option(p)

    p = add("replay", cmd_replay,
            "Stream a recording through the keyed classifier. The key's fingerprint must match the recording's; "
            "damaged parts are skipped and reported.")
    p.add_argument("recording", nargs="+", help="recording(s) (.mcap); with --ray also folders and globs")
    add_run_options(p, source=False)
    add_ray_options(p)

    p = add("train", cmd_train,
            "Train a plain classifier on plain sensor frames (noise included), resumable; writes checkpoint + "
            "manifest.")
    p.add_argument("--config", help="training YAML (configs/train/)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a training field (repeatable)")
    for flag, kind in (("--dataset", str), ("--data", str), ("--model", str), ("--scheme", str), ("--epochs", EPOCHS),
                       ("--out", str), ("--limit-train", COUNT), ("--limit-test", COUNT), ("--sensor", str)):
        p.add_argument(flag, type=kind)
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("show", cmd_show,
            "Write one PNG: scene, plain raw, protected frame, plain and keyed first-layer feature maps.")
    p.add_argument("image", nargs="?", help="8-bit scene image (default: built-in colour chart)")
    p.add_argument("--sensor", help="sensor profile YAML (default: configs/sensors/default.yaml)")
    p.add_argument("--key", required=True, help="key file")
    p.add_argument("--scheme", default="quad", choices=SCHEMES)
    p.add_argument("--checkpoint", help="plain model checkpoint (default: a randomly initialised compact net)")
    p.add_argument("--frame-index", type=FRAME_INDEX, default=0)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", default="show.png", help="PNG to write (default show.png)")

    p = add("bench", cmd_bench,
            "Throughput benchmarks, ratios against a baseline measured in the same run: readout (vs memcpy), "
            "model (keyed vs plain), pipeline (threaded vs serial), ray (local vs Ray replay, 1 and 2 actors).")
    p.add_argument("what", choices=["sensor", "readout", "model", "pipeline", "ray"])
    p.add_argument("--out", help="also write the JSON result here")
    p.epilog += "\n\noptions after '--' go to the benchmark itself (see python -m pipeline.bench.WHAT --help)"

    p = add("eval", cmd_eval,
            "Evaluation tables. 'accuracy': plain, no key, fine-tune attack, MLP attack, keyed, wrong key, "
            "permutation-invariant attack, for a static key and per-frame rotation. 'privacy': every protection "
            "method (keyed readout, EtC, ELE, Image-to-Perturbation) under the same attacks. "
            "Run 'privcam eval accuracy --help'.")
    p.epilog += "\n  privcam eval privacy --limit-test 2000 --json"
    what = p.add_subparsers(dest="what", required=True, metavar="TABLE", parser_class=Parser)
    acc = what.add_parser("accuracy", help="the accuracy table", description="The accuracy table.",
                          epilog=f"example:\n  {EXAMPLES['eval']}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    acc.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    acc.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    acc.add_argument("--dataset", default="fashion-mnist")
    acc.add_argument("--data", help="dataset path")
    acc.add_argument("--sensor", default=MONO_PROFILE)
    acc.add_argument("--scheme", default="pixel", choices=SCHEMES)
    acc.add_argument("--key", help="key file (default: a fresh random key)")
    acc.add_argument("--limit-test", type=COUNT, help="test images (default: the whole test split)")
    acc.add_argument("--attack-train-images", type=COUNT, default=10_000, help="attacker's labelled frames")
    acc.add_argument("--attack-epochs", type=EPOCHS, default=3, help="attacker's epochs (same for both key modes)")
    acc.add_argument("--invariant-max-epochs", type=EPOCHS, default=200,
                     help="row 7's epoch cap: it trains to convergence, stopping on a validation split (default 200)")
    acc.add_argument("--invariant-patience", type=EPOCHS, default=10,
                     help="row 7: epochs without a better validation accuracy before it stops (default 10)")
    acc.add_argument("--frame-size", type=int_range(1, 1 << 16), nargs=2, metavar=("H", "W"),
                     help="expose the scenes at this sensor size (the model reads them through the front end)")
    acc.add_argument("--out", help="also write the table (JSON) here")
    acc.add_argument("--quiet", action="store_true")
    priv = what.add_parser("privacy", help="the privacy table (methods x attacks)",
                           description="Every protection method under the same attacks.",
                           epilog="example:\n  privcam eval privacy --limit-test 2000 --threads 1 --out privacy.json",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    priv.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    add_privacy_arguments(priv)

    p = add("data", data_cmd.cmd_data, data_cmd.HELP)
    data_cmd.add_data_arguments(p)

    p = add("demo", cmd_demo,
            "Built-in demo on the shipped Fashion-MNIST sample: sensor, rotating keyed readout, recording, keyed "
            "classifier, replay, a wrong key, and show.png.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--limit", type=int_range(1, 1000), default=1000,
                   help="frames from the sample, 1-1000 (default 1000)")
    p.add_argument("--frame-size", type=int_range(1, 1 << 16), nargs=2, metavar=("H", "W"),
                   help="expose the 28x28 scenes at this sensor size, e.g. 280 280 (the 28x28 model reads the "
                        "frames through the keyed front end); default 28 28")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _print_human(summary: dict[str, Any]) -> None:
    stages = summary.pop("stages", None)
    width = max(len(k) for k in summary) if summary else 0
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} values]"
        print(f"{key:<{width}}  {value}")
    if stages:
        print(f"\n{'stage':<10} {'in':>7} {'out':>7} {'busy s':>8} {'items/s':>10} "
              f"{'wait in s':>10} {'wait out s':>10}")
        for st in stages:
            rate = f"{st['items_per_busy_s']:.1f}" if st["items_per_busy_s"] else "-"
            print(f"{st['name']:<10} {st['items_in']:>7} {st['items_out']:>7} {st['busy_s']:>8.3f} {rate:>10} "
                  f"{st['wait_in_s']:>10.3f} {st['wait_out_s']:>10.3f}")


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM is handled like Ctrl-C: the run stops, outputs are finalised, exit status 130."""
    raise KeyboardInterrupt


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # streams of large frames reuse freed memory (pipeline.memory)
    for stream in (sys.stdout, sys.stderr):  # paths that are not valid UTF-8 print as escapes, never crash
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    passthrough: list[str] = []
    if argv[:1] == ["bench"] and "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.extra = passthrough
    previous = None
    if threading_is_main():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        summary = args.func(args)
    except (PrivcamError, ValueError) as err:
        print(f"privcam {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"privcam {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"privcam {args.command}: error: out of memory (input too large? see PRIVCAM_MAX_PIXELS)",
              file=sys.stderr)
        return 1
    except OSError as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"privcam {args.command}: error: {where}{err.strerror or _one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_human(summary)
    return int(summary.get("exit_status", 0))


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
