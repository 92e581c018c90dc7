"""Regenerate the known-answer files of tests/test_kat.py.

Run by hand, from any directory, ONLY when a key derivation, readout table or layer order changes on purpose,
after bumping FORMAT_VERSION in tests/test_kat.py (the file names carry the version, so old files stay until
you delete them):

    python tests/data/make_kat.py              # vectors, recording and predictions
    python tests/data/make_kat.py --vectors    # only kat_v<N>.json
    python tests/data/make_kat.py --recording  # only the recording and its predictions

Everything is derived from the public test key in tests/test_kat.py; no other key is ever read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.checkpoint import read_manifest  # noqa: E402
from pipeline.stream.run import record_frames, replay_recording  # noqa: E402
from tests.test_kat import (  # noqa: E402
    CHECKPOINT,
    FORMAT_VERSION,
    KAT_FILE,
    KEY,
    LOGITS_ATOL,
    PREDICTIONS_FILE,
    RECORDING_FILE,
    kat_vectors,
    make_key_file,
    recorded_logits,
    recording_config,
)

MAX_RECORDING_BYTES = 100_000


def dump(obj: object) -> str:
    """JSON with one key per line but lists of numbers on one line."""
    text = json.dumps(obj, indent=1, ensure_ascii=True)
    return re.sub(r"\[\s+([-+\d.eE,\s]+?)\s+\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(","))
                  + "]", text) + "\n"


def write_vectors(tmp: Path) -> None:
    KAT_FILE.write_text(dump(kat_vectors(tmp)))
    print(f"wrote {KAT_FILE.relative_to(REPO)}")


def run_description() -> dict[str, object]:
    cfg = recording_config(Path("kat.key"))
    return {"dataset": cfg.source.dataset, "limit": cfg.source.limit, "offset": cfg.source.offset,
            "sensor_profile": str(Path(cfg.sensor.profile).relative_to(REPO)), "sensor_seed": cfg.sensor.seed,
            "scheme": cfg.key.scheme, "rotation": cfg.key.rotation, "mode": cfg.model.mode}


def write_recording(tmp: Path) -> None:
    key_file = make_key_file(tmp)
    out = tmp / RECORDING_FILE.name
    rec = record_frames(recording_config(key_file), str(out), progress=False)
    if rec["error"] or rec["frames"] != 16:
        raise SystemExit(f"recording failed: {rec}")
    if out.stat().st_size >= MAX_RECORDING_BYTES:
        raise SystemExit(f"recording is {out.stat().st_size} bytes, keep it under {MAX_RECORDING_BYTES}")
    shutil.copyfile(out, RECORDING_FILE)

    frames, logits = recorded_logits("fused")
    top2 = logits.topk(2, dim=1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    if margin <= 100 * LOGITS_ATOL:  # a prediction that a 1e-4 change could flip would make a fragile test
        raise SystemExit(f"smallest top-2 logit margin {margin:.2e} is too close to the tolerance")
    preds_file = tmp / "replay.jsonl"
    replay = replay_recording(str(RECORDING_FILE), recording_config(key_file, preds_file), progress=False)
    rows = [json.loads(line) for line in preds_file.read_text().splitlines()]
    if replay["error"] or [r["pred"] for r in rows] != logits.argmax(1).tolist():
        raise SystemExit(f"replay disagrees with the keyed classifier: {replay}")

    manifest = read_manifest(CHECKPOINT)
    PREDICTIONS_FILE.write_text(dump({
        "format_version": FORMAT_VERSION,
        "about": "predictions of tests/data/" + RECORDING_FILE.name + " replayed with the public test key of "
                 "tests/test_kat.py; regenerate only with tests/data/make_kat.py",
        "recording": RECORDING_FILE.name,
        "recording_sha256": hashlib.sha256(RECORDING_FILE.read_bytes()).hexdigest(),
        "key_fingerprint": KEY.fingerprint,
        "checkpoint": str(CHECKPOINT.relative_to(REPO)),
        "checkpoint_sha256": manifest["sha256"],
        "run": run_description(),
        "logits_atol": LOGITS_ATOL,
        "smallest_top2_margin": round(margin, 4),
        "accuracy": sum(r["pred"] == r["label"] for r in rows) / len(rows),
        "frames": [{"frame_index": f.meta.frame_index, "label": f.meta.label, "pred": int(row.argmax()),
                    "logits": [round(float(v), 6) for v in row]} for f, row in zip(frames, logits, strict=True)],
    }))
    print(f"wrote {RECORDING_FILE.relative_to(REPO)} ({RECORDING_FILE.stat().st_size} bytes) and "
          f"{PREDICTIONS_FILE.relative_to(REPO)} (accuracy {sum(r['pred'] == r['label'] for r in rows)}/16, "
          f"smallest top-2 margin {margin:.3f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", action="store_true", help="only the known-answer vectors")
    parser.add_argument("--recording", action="store_true", help="only the recording and its predictions")
    args = parser.parse_args(argv)
    both = not (args.vectors or args.recording)
    with tempfile.TemporaryDirectory() as tmp:
        if both or args.vectors:
            write_vectors(Path(tmp))
        if both or args.recording:
            write_recording(Path(tmp))


if __name__ == "__main__":
    main()
