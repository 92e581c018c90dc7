from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.cli.main import build_parser, main
from sensor.rawio import read_raw
from sensor.scene import colour_chart


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), colour_chart(48, 64)[..., ::-1])
    return path


@pytest.mark.parametrize("suffix", [".dng", ".npy", ".png"])
def test_capture_writes_a_raw_frame_and_preview(photo, tmp_path, capsys, suffix):
    out, preview = tmp_path / f"frame{suffix}", tmp_path / "preview.png"
    assert main(["capture", str(photo), "--sensor", "configs/sensors/default.yaml", "--out", str(out),
                 "--preview", str(preview), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    frame = read_raw(out)
    assert frame.data.shape == (48, 64) and frame.meta.cfa == "RGGB" and frame.meta.bit_depth == 12
    assert summary["mean_dn"] == pytest.approx(frame.data.mean())
    image = cv2.imread(str(preview))
    assert image.shape == (48, 64, 3)


def test_capture_on_mono_profile_and_raw_input(photo, tmp_path):
    first = tmp_path / "mono.npy"
    assert main(["capture", str(photo), "--sensor", "configs/sensors/mono10.yaml", "--out", str(first)]) == 0
    assert read_raw(first).meta.cfa == "mono"
    again = tmp_path / "again.dng"
    assert main(["capture", str(first), "--sensor", "configs/sensors/mono10.yaml", "--out", str(again)]) == 0
    assert read_raw(again).data.max() <= 1023
    assert main(["capture", str(first), "--out", str(tmp_path / "x.npy")]) == 2, "CFA mismatch is refused"


def test_capture_errors_are_one_line(tmp_path, capsys):
    assert main(["capture", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.dng")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("bit_depth: 11\n")
    assert main(["capture", str(tmp_path / "missing.png"), "--sensor", str(bad), "--out", "x.dng"]) == 2
    assert "bit_depth" in capsys.readouterr().err


def test_every_command_has_help_with_an_example(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert "example:" in text and f"privcam {name}" in text, name


def test_ptc_command_reports_measured_gain(capsys):
    assert main(["ptc", "--points", "6", "--size", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gain_dn_per_e"] == pytest.approx(result["configured_gain_dn_per_e"], rel=0.08)
    assert np.isfinite(result["read_noise_e"])


@pytest.mark.parametrize("scheme, rotation", [("pixel", False), ("quad", True), ("plane", True)])
def test_capture_with_a_key_writes_the_protected_frame(photo, tmp_path, capsys, scheme, rotation):
    from sensor.config import SensorConfig
    from sensor.keys import load_key_file
    from sensor.readout import readout_permutation
    from sensor.scene import render_photons
    from sensor.sensor import Sensor

    key_file, out = tmp_path / "k.key", tmp_path / "protected.npy"
    assert main(["keygen", "--out", str(key_file)]) == 0
    capsys.readouterr()
    args = ["capture", str(photo), "--key", str(key_file), "--scheme", scheme, "--frame-index", "7", "--out",
            str(out), "--json"] + (["--rotation"] if rotation else [])
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    key = load_key_file(key_file)
    assert summary["protected"] is True and summary["key_fingerprint"] == key.fingerprint
    assert key_file.read_text().strip() not in json.dumps(summary)
    config = SensorConfig.from_yaml("configs/sensors/default.yaml")
    plain = Sensor(config).expose(render_photons(cv2.imread(str(photo))[..., ::-1], config), 7)
    protected = read_raw(out).data
    assert not np.array_equal(protected, plain)
    session = key.for_session(bytes.fromhex(summary["session"]))  # each capture is a session of its own
    order = readout_permutation(session, scheme, 48, 64, 7 if rotation else None)
    assert np.array_equal(order.inverse(protected), plain)  # exactly the plain frame, read out in key order
    assert not np.array_equal(readout_permutation(key, scheme, 48, 64, 7 if rotation else None).inverse(protected),
                              plain), "the master key's own order must not open a session's frame"
