from __future__ import annotations

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.keyed import keyed
from models.plain import build_model
from sensor.keys import Key
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
