"""Hostile input, part 1: what a user hands in. Every case ends in a one-line error (exit 2) or a
correct result: never code execution, a native crash, a huge allocation, a hang or a traceback.

Classes (of the issue): 1 code execution, 2 native crashes and memory bombs, 7 mismatches, 8 argument
and config validation. Part 2 (tests/test_hostile_outputs.py) covers outputs, recordings and signals.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    sha256_file,
)
from models.plain import build_model
from pipeline.cli.main import main
from pipeline.stream.datasets import load_cifar10, load_image_folder, read_idx
from pipeline.stream.recording import RecordingError, RecordingReader
from sensor.config import SensorConfig
from sensor.configio import load_yaml, read_yaml
from sensor.errors import ConfigError, DatasetError, InputFileError, PrivcamError, RawFormatError
from sensor.rawio import read_raw
from sensor.safeio import declared_image_size, max_pixels, read_image
from tests.hostile_world import Marker, deadline, fifo, make_world, model_args, source_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    return make_world(tmp_path_factory.mktemp("hostile"))


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- 1. code execution ------------------------------------------------------------------------------------------------
def test_a_pickle_beside_the_training_output_runs_no_code(world, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    out = tmp_path / "model.pt"
    torch.save({"config": Marker(marker)}, tmp_path / "model.state")
    assert main(["train", "--dataset", "mnist", "--data", str(world), "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 2
    one_line_error(capsys, "model.state", "refusing to load")
    assert not marker.exists(), "unpickling ran code"
    assert not out.exists()


@pytest.mark.parametrize("payload, words", [
    ([1, 2, 3], "expected a training state"),
    ({"config": {}}, "expected a training state"),
    ({"config": {}, "model": {}, "optimizer": {}, "scheduler": {}, "epoch": "1", "history": [], "wall_s": 0.0},
     "epoch"),
])
def test_training_state_payloads_are_checked(tmp_path, payload, words):
    torch.save(payload, tmp_path / "x.state")
    with pytest.raises(CheckpointError, match=words):
        load_training_state(tmp_path / "x.state")
    (tmp_path / "y.state").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable training state"):
        load_training_state(tmp_path / "y.state")


def forge(path: Path, payload: object, arch: dict) -> None:
    """A checkpoint whose manifest hash matches its (bad) payload."""
    torch.save(payload, path)
    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(path), "arch": arch}))


ARCH = {"name": "compact", "in_channels": 1, "num_classes": 10}


@pytest.mark.parametrize("case, words", [
    ("list", "expected a checkpoint dict"),
    ("no_state_dict", "expected a checkpoint dict"),
    ("unknown_keyword", "exactly the keys"),
    ("unknown_model", "arch.name"),
    ("huge_channels", "arch.in_channels"),
    ("other_weights", "do not fit"),
    ("state_dict_list", "state_dict"),
    ("pickle", "refusing to load"),
])
def test_checkpoints_whose_hash_matches_but_payload_is_wrong(tmp_path, case, words):
    marker = tmp_path / "code-ran"
    good = build_model(**ARCH).state_dict()
    arch = dict(ARCH)
    payload: object = {"arch": arch, "state_dict": good}
    if case == "list":
        payload = [1, 2, 3]
    elif case == "no_state_dict":
        payload = {"arch": arch}
    elif case == "unknown_keyword":
        arch = {**ARCH, "evil": 1}
        payload = {"arch": arch, "state_dict": good}
    elif case == "unknown_model":
        arch = {**ARCH, "name": "os.system"}
        payload = {"arch": arch, "state_dict": good}
    elif case == "huge_channels":
        arch = {**ARCH, "in_channels": 10**9}
        payload = {"arch": arch, "state_dict": good}
    elif case == "other_weights":
        payload = {"arch": arch, "state_dict": build_model("compact", 4, 10).state_dict()}
    elif case == "state_dict_list":
        payload = {"arch": arch, "state_dict": [1, 2]}
    elif case == "pickle":
        payload = {"arch": arch, "state_dict": good, "x": Marker(marker)}
    forge(tmp_path / "m.pt", payload, arch)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(tmp_path / "m.pt")
    assert not marker.exists()


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model(**ARCH), ARCH, {})
    (tmp_path / "m.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_cifar_pickle_that_names_a_function_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": Marker(marker)}, fh)
    with pytest.raises(DatasetError, match="refusing to load posix.mkdir|refusing to load os.mkdir|refusing"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]}, fh)
    with pytest.raises(DatasetError, match="labels"):
        load_cifar10(tmp_path, "test")


# -- 2. native crashes, memory bombs, hangs ---------------------------------------------------------------------------
def test_file_names_that_are_not_utf8_do_not_crash(tmp_path):
    """cv2.imread segfaults on such names; run in a child so a regression cannot take pytest down."""
    folder = os.path.join(os.fsencode(tmp_path), b"imgs")
    os.mkdir(folder)
    ok, png = cv2.imencode(".png", np.full((16, 24, 3), 120, np.uint8))
    for name in (b"bad\xff.png", b"ok.png"):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(png.tobytes())
    script = (
        "import os, sys\n"
        "from pipeline.cli.main import main\n"
        "from pipeline.stream.datasets import load_image_folder\n"
        "folder = os.fsdecode(sys.argv[1])\n"
        "bad = os.path.join(folder, os.fsdecode(b'bad\\xff.png'))\n"
        "assert main(['capture', bad, '--out', os.path.join(folder, os.fsdecode(b'out\\xff.npy'))]) == 0\n"
        "assert len(load_image_folder(folder)) == 2\n"
        "print('fine')\n")
    proc = subprocess.run([sys.executable, "-c", script, os.fsdecode(folder)], cwd=ROOT, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert b"fine" in proc.stdout


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def npy_declaring(shape: tuple[int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<u2", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 100


def test_size_bombs_are_refused_before_allocation(tmp_path, capsys):
    (tmp_path / "bomb.png").write_bytes(png_declaring(65000, 65000))
    (tmp_path / "bomb.npy").write_bytes(npy_declaring((200000, 200000)))
    assert (tmp_path / "bomb.png").stat().st_size < 300 and (tmp_path / "bomb.npy").stat().st_size < 300
    for name in ("bomb.png", "bomb.npy"):
        assert main(["capture", str(tmp_path / name), "--out", str(tmp_path / "x.npy")]) == 2
        one_line_error(capsys, name, "PRIVCAM_MAX_PIXELS")
    # A .npy whose declared shape does not match its size, and a headerless raw file of a huge size.
    (tmp_path / "lie.npy").write_bytes(npy_declaring((100, 100)))
    with pytest.raises(RawFormatError, match="data bytes"):
        read_raw(tmp_path / "lie.npy", cfa="mono")
    (tmp_path / "big.raw").write_bytes(b"\0" * 8)
    (tmp_path / "big.raw.yaml").write_text("width: 100000\nheight: 100000\nbit_depth: 12\ncfa: RGGB\n"
                                           "black_level: 0\nwhite_level: 4095\nbyte_order: little\n")
    with pytest.raises(RawFormatError, match="PRIVCAM_MAX_PIXELS"):
        read_raw(tmp_path / "big.raw")


def test_damaged_npy_headers_are_refused(tmp_path):
    for i, header in enumerate((b"{'descr': '<u2', 'fortran_order': False, 'shape': (2,",
                                b"{'descr': 'O', 'fortran_order': False, 'shape': (2, 2), }",
                                b"{'descr': '<u2', 'fortran_order': False, 'shape': (2, 2, 2), }")):
        path = tmp_path / f"h{i}.npy"
        path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + 1) + header + b"\n" + b"\0" * 16)
        with pytest.raises(RawFormatError, match=f"h{i}.npy"):
            read_raw(path, cfa="mono")


def test_the_pixel_limit_is_configurable(tmp_path, monkeypatch, capsys):
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.full((40, 60, 3), 90, np.uint8))
    monkeypatch.setenv("PRIVCAM_MAX_PIXELS", "1000")
    assert max_pixels() == 1000
    assert main(["capture", str(image), "--out", str(tmp_path / "x.npy")]) == 2
    one_line_error(capsys, "at most 1,000 pixels", "60x40")
    monkeypatch.setenv("PRIVCAM_MAX_PIXELS", "5000")
    assert main(["capture", str(image), "--out", str(tmp_path / "x.npy")]) == 0
    monkeypatch.setenv("PRIVCAM_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="PRIVCAM_MAX_PIXELS"):
        max_pixels()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".tif"])
def test_declared_sizes_are_read_from_every_image_header(tmp_path, ext):
    ok, encoded = cv2.imencode(ext, np.zeros((13, 21, 3), np.uint8))
    assert ok
    fmt, size = declared_image_size(encoded.tobytes())
    assert size == (13, 21), fmt
    path = tmp_path / f"x{ext}"
    path.write_bytes(encoded.tobytes())
    assert read_image(path, "colour").shape == (13, 21, 3)


def test_truncated_and_unknown_images_are_refused(tmp_path):
    ok, encoded = cv2.imencode(".png", np.zeros((13, 21), np.uint8))
    (tmp_path / "cut.png").write_bytes(encoded.tobytes()[:20])
    (tmp_path / "text.png").write_bytes(b"GIF89a not really")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("cut.png", "text.png", "empty.png"):
        with pytest.raises(InputFileError, match=name):
            read_image(tmp_path / name)


def test_idx_bombs_are_refused(tmp_path):
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (1 << 20, 4096, 4096))
    (tmp_path / "bomb-idx").write_bytes(header + b"\0" * 10)
    with pytest.raises(DatasetError, match="size"):
        read_idx(tmp_path / "bomb-idx")
    with gzip.open(tmp_path / "bomb-idx.gz", "wb") as fh:
        fh.write(header + b"\0" * 10)
    with pytest.raises(DatasetError, match="gzip file"):
        read_idx(tmp_path / "bomb-idx.gz")


def test_devices_and_named_pipes_are_refused_without_blocking(world, tmp_path, capsys):
    key = str(world / "cam.key")
    pipe = fifo(tmp_path / "pipe.mcap")
    with deadline(60):
        assert main(["replay", "/dev/zero", "--key", key, *model_args(world)]) == 2
        one_line_error(capsys, "/dev/zero", "regular file")
        assert main(["replay", str(pipe), "--key", key, *model_args(world)]) == 2
        one_line_error(capsys, "pipe.mcap", "named pipe")
        image = fifo(tmp_path / "pipe.png")
        assert main(["capture", str(image), "--out", str(tmp_path / "x.npy")]) == 2
        one_line_error(capsys, "pipe.png", "named pipe")
        assert main(["show", str(image), "--key", key, "--out", str(tmp_path / "s.png")]) == 2
        one_line_error(capsys, "pipe.png", "named pipe")
        config = fifo(tmp_path / "pipe.yaml")
        assert main(["run", "--config", str(config), *source_args(world), *model_args(world)]) == 2
        one_line_error(capsys, "pipe.yaml", "named pipe")
        with pytest.raises(ConfigError, match="named pipe"):
            read_yaml(config)
        with pytest.raises(RawFormatError, match="named pipe"):
            read_raw(fifo(tmp_path / "pipe.npy"), cfa="mono")
        with pytest.raises(RecordingError, match="folder"):
            RecordingReader(tmp_path)
        with pytest.raises(DatasetError, match="named pipe"):
            read_idx(fifo(tmp_path / "pipe-idx"))
        folder = tmp_path / "images"
        folder.mkdir()
        cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
        fifo(folder / "b.png")
        assert len(load_image_folder(folder)) == 1


# -- 7. mismatches that should be errors ------------------------------------------------------------------------------
def test_show_with_a_checkpoint_of_the_wrong_scheme(world, tmp_path, capsys):
    assert main(["show", "--scheme", "quad", "--checkpoint", "models/weights/compact_fashion_mnist_pixel.pt",
                 "--key", str(world / "cam.key"), "--out", str(tmp_path / "s.png")]) == 2
    one_line_error(capsys, "this checkpoint expects 1 channel at 28x28", "the quad scheme", "gives 4 channels")
    assert not (tmp_path / "s.png").exists()


def test_eval_accuracy_with_a_checkpoint_of_the_wrong_scheme(world, capsys):
    assert main(["eval", "accuracy", "--scheme", "quad", "--dataset", "mnist", "--data", str(world),
                 "--limit-test", "4", "--attack-train-images", "4", "--attack-epochs", "1", "--quiet"]) == 2
    one_line_error(capsys, "expects 1 channel", "quad scheme", "gives 4 channels")


def test_replay_with_a_checkpoint_of_the_wrong_channels(world, capsys):
    args = ["replay", str(world / "rec.mcap"), "--key", str(world / "cam.key"), "--checkpoint",
            str(world / "m4.pt"), "--set", "model.device=cpu", "--quiet"]
    assert main(args) == 2
    one_line_error(capsys, "checkpoint's (quad)", "pixel")


# -- 8. argument and config validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["ptc", "--points", "0"], "--points"),
    (["ptc", "--size", "1"], "--size"),
    (["ptc", "--analog-gain", "nan"], "--analog-gain"),
    (["ptc", "--seed", "-3"], "--seed"),
    (["eval", "privacy", "--threads", "-1"], "--threads"),
    (["eval", "privacy", "--i2p-train-images", "0"], "--i2p-train-images"),
    (["eval", "privacy", "--block", "0"], "--block"),
    (["eval", "privacy", "--seed", "-1"], "--seed"),
    (["eval", "accuracy", "--limit-test", "-1"], "--limit-test"),
    (["eval", "accuracy", "--attack-epochs", "0"], "--attack-epochs"),
    (["run", "--limit", "-1"], "--limit"),
    (["run", "--limit", "0"], "--limit"),
    (["run", "--batch-size", "0"], "--batch-size"),
    (["run", "--ray", "--actors", "0"], "--actors"),
    (["record", "--limit", "x", "--out", "r.mcap"], "--limit"),
    (["capture", "in.png", "--out", "o.npy", "--seed", "-1"], "--seed"),
    (["capture", "in.png", "--out", "o.npy", "--frame-index", "-1"], "--frame-index"),
    (["capture", "in.png", "--out", "o.npy", "--exposure-s", "inf"], "--exposure-s"),
    (["capture", "in.png", "--out", "o.npy", "--exposure-s", "1e300"], "--exposure-s"),
    (["show", "--key", "k", "--seed", "-1"], "--seed"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--limit-train", "-1"], "--limit-train"),
    (["demo", "--limit", "0"], "--limit"),
])
def test_numeric_options_have_ranges(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    one_line_error(capsys, option, "expected")


@pytest.mark.parametrize("setting, field", [
    ("lr=.nan", "lr"), ("lr=.inf", "lr"), ("lr=0", "lr"), ("momentum=2", "momentum"), ("seed=-1", "seed"),
    ("batch_size=0", "batch_size"), ("epochs=1e9", "epochs"), ("augment=true", "out"),
])
def test_train_settings_are_checked_before_any_work(world, tmp_path, setting, field, capsys):
    out = tmp_path / ("model.json" if field == "out" else "m.pt")
    assert main(["train", "--dataset", "mnist", "--data", str(world), "--out", str(out), "--set", setting,
                 "--quiet"]) == 2
    one_line_error(capsys, f"'{field}'")
    assert not out.exists() and not out.with_suffix(".state").exists()


@pytest.mark.parametrize("setting, field", [
    ("pipeline.batch_timeout_s=.nan", "pipeline.batch_timeout_s"),
    ("pipeline.batch_timeout_s=-1", "pipeline.batch_timeout_s"),
    ("pipeline.queue_size=0", "pipeline.queue_size"),
    ("sensor.seed=-1", "sensor.seed"),
    ("source.offset=-1", "source.offset"),
    ("source.limit=-1", "source.limit"),
    ("source.split=validation", "source.split"),
])
def test_run_settings_are_checked(world, setting, field, capsys):
    source = [a for a in source_args(world) if a not in ("--limit", str(24))]
    assert main(["run", *source, *model_args(world), "--set", setting, "--quiet"]) == 2
    one_line_error(capsys, field)


def test_privacy_lists_name_the_option(capsys):
    assert main(["eval", "privacy", "--kpa-pairs", "1,two", "--quiet"]) == 2
    one_line_error(capsys, "--kpa-pairs")
    assert main(["eval", "privacy", "--methods", "readout-static,nonsense", "--quiet"]) == 2
    one_line_error(capsys, "--methods")


def test_yaml_12_floats_and_physical_ranges(tmp_path):
    assert load_yaml("a: 1.2e6\nb: 1e-3\nc: 12\nd: 1.5\ne: 3e+2") == {"a": 1.2e6, "b": 1e-3, "c": 12, "d": 1.5,
                                                                     "e": 300.0}
    profile = tmp_path / "s.yaml"
    profile.write_text("white_photons_per_s: 1.2e6\nexposure_s: 1e-2\n")
    cfg = SensorConfig.from_yaml(profile)
    assert cfg.white_photons_per_s == 1.2e6 and cfg.exposure_s == 0.01
    for bad, field in (({"temperature_c": 150, "dark_reference_temperature_c": -60,
                         "dark_doubling_temperature_c": 0.1}, "temperature_c"),
                       ({"dark_reference_temperature_c": -1e300}, "dark_reference_temperature_c"),
                       ({"exposure_s": 1e300}, "exposure_s"),
                       ({"full_well_e": 1e300}, "full_well_e"),
                       ({"white_photons_per_s": float("nan")}, "white_photons_per_s"),
                       ({"fpn_seed": -1}, "fpn_seed")):
        with pytest.raises(ConfigError) as err:
            SensorConfig.from_dict(bad, "x.yaml")
        assert err.value.field == field, err.value


def test_errors_never_print_key_material(world, tmp_path, capsys):
    secret = (world / "cam.key").read_text().strip()
    for argv in (["replay", str(world / "rec.mcap"), "--key", str(world / "other.key"), *model_args(world)],
                 ["show", "--key", str(world / "cam.key"), "--scheme", "quad", "--checkpoint", str(world / "m.pt"),
                  "--out", str(tmp_path / "s.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert secret not in err and "Traceback" not in err


def test_every_privcam_error_is_one_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bit_depth: [12\n  oops")
    assert main(["capture", str(world / "cam.key"), "--sensor", str(bad), "--out", str(tmp_path / "x.npy")]) == 2
    one_line_error(capsys, "bad.yaml")
    with pytest.raises(PrivcamError):
        raise InputFileError("x", "y", "z")
