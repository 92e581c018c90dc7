from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from models.keyed import keyed
from models.plain import build_model
from pipeline.cli.main import main
from pipeline.resources import DEFAULT_CHECKPOINT, resolve
from sensor.keys import Key, write_key_file
from sensor.permutation import random_permutation

ARCH = {"name": "compact", "in_channels": 4, "num_classes": 10}


def test_round_trip_with_manifest(tmp_path):
    torch.manual_seed(0)
    model = build_model(**ARCH)
    manifest = save_checkpoint(tmp_path / "m.pt", model, ARCH, {"dataset": "fashion-mnist", "accuracy": 0.9})
    assert manifest["arch"] == ARCH and len(manifest["sha256"]) == 64
    loaded, info = load_checkpoint(tmp_path / "m.pt")
    assert info["accuracy"] == 0.9
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_changed_file_is_refused(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model(**ARCH), ARCH, {})
    data = bytearray((tmp_path / "m.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "m.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "m.pt")
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match="manifest not found"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_keyed_checkpoint_holds_no_table_and_loads_as_plain(tmp_path):
    model = build_model(**ARCH)
    key = Key(bytes(range(32)))
    twin = keyed(model, key, (4, 14, 14), torch.from_numpy(random_permutation(key.subkey("x"), 196)))
    save_checkpoint(tmp_path / "k.pt", twin, ARCH, {})
    payload = torch.load(tmp_path / "k.pt", weights_only=True)
    assert set(payload["state_dict"]) == set(model.state_dict())
    assert not any("table" in k or "perm" in k for k in payload["state_dict"])
    text = (tmp_path / "k.pt").read_bytes() + (tmp_path / "k.json").read_bytes()
    assert bytes(range(32)) not in text and bytes(range(32)).hex().encode() not in text


def shipped_copy(folder: Path) -> Path:
    """The shipped compact checkpoint and its manifest, copied into ``folder``."""
    src = resolve(DEFAULT_CHECKPOINT)
    shutil.copyfile(src, folder / "m.pt")
    shutil.copyfile(src.with_suffix(".json"), folder / "m.json")
    return folder / "m.pt"


def edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads(path.with_suffix(".json").read_text())
    manifest.update(changes)
    path.with_suffix(".json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("changes, error", [
    ({"sha256": "0" * 64}, "SHA-256 .* differs from the manifest's 0000000000000000"),
    ({"arch": {"name": "compact", "in_channels": 4, "num_classes": 10}}, "architecture differs from its manifest"),
    ({"arch": {"name": "preresnet20", "in_channels": 1, "num_classes": 10}}, "architecture differs"),
    ({"arch": {"name": "compact", "in_channels": 1, "num_classes": 2}}, "architecture differs"),
])
def test_an_edited_manifest_is_refused(tmp_path, changes, error):
    path = shipped_copy(tmp_path)
    load_checkpoint(path)
    edit_manifest(path, **changes)
    with pytest.raises(CheckpointError, match=error):
        load_checkpoint(path)


def test_weights_of_another_architecture_are_refused_with_a_clear_error(tmp_path):
    """A .pt whose weights do not fit the architecture it names (manifest hash updated, so only the load
    itself can notice) is a CheckpointError naming the architecture, not a bare torch RuntimeError."""
    path = shipped_copy(tmp_path)
    payload = torch.load(path, weights_only=True)
    for arch, state in ((payload["arch"], build_model("preresnet20", 1, 10).state_dict()),
                        ({**payload["arch"], "in_channels": 4}, payload["state_dict"]),
                        ({**payload["arch"], "name": "preresnet20"}, payload["state_dict"])):
        torch.save({"arch": arch, "state_dict": state}, path)
        edit_manifest(path, sha256=sha256_file(path), arch=arch)
        with pytest.raises(CheckpointError, match=r"m\.pt: the weights do not fit a .*'name': '" + arch["name"]):
            load_checkpoint(path)


def test_a_checkpoint_for_another_input_is_refused_before_the_run(tmp_path, capsys):
    """The manifest's scheme is informational (not authenticated): a 1-channel model whose manifest was
    edited to claim the packed quad input is refused by its channel count, in one line, exit status 2."""
    path = shipped_copy(tmp_path)
    edit_manifest(path, scheme="quad")
    load_checkpoint(path)  # loads: the scheme is not covered by the hash
    write_key_file(tmp_path / "k.key")
    args = ["run", "--key", str(tmp_path / "k.key"), "--dataset", "fashion-mnist-sample", "--limit", "4",
            "--scheme", "quad", "--checkpoint", str(path), "--quiet", "--set", "model.device=cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "m.pt: this checkpoint expects 1 channel at 28x28" in err and "the quad scheme" in err
    assert "gives 4 channels" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
