"""End to end exactness of the keyed path, on models whose predictions mean something.

For every scheme, static and rotating readout, fused and fast mode: the keyed classifier on the
protected frames the sensor emits (``Sensor.capture``) gives the LOGITS of the plain model on the
plain frames (``Sensor.expose``, same seed and frame index), to 1e-4, with the same argmax. The pixel
scheme runs the shipped trained checkpoints on the mono 10-bit sensor; quad and plane need the packed
4-plane input of a colour sensor, which no shipped checkpoint takes, so they run seeded, fitted
4-channel models (tests/fitted.py).

A control in each case shows the comparison can fail: the plain model on the protected frames
(unscrambling skipped) must disagree with its own plain-frame predictions on most frames. And the
predictions compared must cover several classes, so a constant model cannot pass.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from pipeline.resources import COLOUR_PROFILE, MONO_PROFILE, resolve
from pipeline.stream.classifier import KeyedClassifier
from pipeline.stream.datasets import load_dataset
from pipeline.stream.inputs import network_input
from sensor.config import SensorConfig
from sensor.frame import FrameFormat
from sensor.keys import Key
from sensor.scene import render_photons
from sensor.sensor import Sensor
from tests.fitted import fitted_model

N = 32  # test frames per case
LOGITS_ATOL = 1e-4
CONTROL_MAX_AGREEMENT = 0.5
NONCE = bytes.fromhex("11" * 16)  # a public session nonce: rotation needs a session key
KEY = Key(bytes.fromhex("3c" * 32)).for_session(NONCE)
OTHER_KEY = Key(bytes.fromhex("a5" * 32)).for_session(NONCE)  # a wrong key that knows the public nonce
WEIGHTS = resolve("models/weights/compact_fashion_mnist_pixel.pt").parent

pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def sample():
    return load_dataset("fashion-mnist-sample")


@cache
def model_for(name: str) -> tuple[torch.nn.Module, SensorConfig, float]:
    """(plain model, its sensor profile, the plain accuracy it must at least reach on the test frames)."""
    if name.endswith("_fashion_mnist_pixel"):
        model, manifest = load_checkpoint(WEIGHTS / f"{name}.pt")
        assert manifest["scheme"] == "pixel" and manifest["sensor"]["cfa"] == "mono"
        return model, SensorConfig.from_yaml(resolve(MONO_PROFILE)), 0.7
    arch = name.removesuffix("_4ch")  # fitted on images the test never evaluates (N .. N + 384)
    data = sample()
    colour = SensorConfig.from_yaml(resolve(COLOUR_PROFILE))
    return fitted_model(arch, colour, "quad", data.images[N:N + 384], data.labels[N:N + 384], seed=7), colour, 0.4


def capture(cfg: SensorConfig, key: Key, scheme: str, rotation: bool, n: int = N, seed: int = 5):
    """(plain frames (n, H, W), protected frames as the sensor emits them) of the first n sample images."""
    sensor = Sensor(cfg, seed=seed)
    photons = [render_photons(im, cfg) for im in sample().images[:n]]
    plain = np.stack([sensor.expose(p, i) for i, p in enumerate(photons)])
    protected = [sensor.capture(p, key, i, scheme=scheme, rotation=rotation) for i, p in enumerate(photons)]
    return plain, protected


CASES = [(model, scheme, rotation)
         for model, schemes in (("compact_fashion_mnist_pixel", ("pixel",)),
                                ("preresnet20_fashion_mnist_pixel", ("pixel",)), ("compact_4ch", ("quad", "plane")))
         for scheme in schemes for rotation in (False, True)]
CASES += [("preresnet20_4ch", "quad", False), ("preresnet20_4ch", "plane", True)]  # residual adds, packed input


@pytest.mark.parametrize("name, scheme, rotation", CASES)
def test_keyed_logits_equal_plain_logits_and_the_control_fails(name, scheme, rotation):
    model, cfg, min_accuracy = model_for(name)
    plain, protected = capture(cfg, KEY, scheme, rotation)
    fmt = FrameFormat.from_config(cfg, scheme=scheme, rotation=rotation, height=28, width=28)
    with torch.inference_mode():
        want = model(network_input(plain, fmt))
    want_pred = want.argmax(1)
    labels = sample().labels[:N]
    classes = len(set(want_pred.tolist()))
    accuracy = float((want_pred.numpy() == labels).mean())
    assert classes >= 5 and accuracy >= min_accuracy, (
        f"{name}: the plain predictions are degenerate ({classes} classes, accuracy {accuracy:.2f}); "
        "comparing them would prove nothing")

    for mode in ("fused", "fast"):
        clf = KeyedClassifier(model, KEY, fmt, mode=mode, device="cpu")
        got = clf.logits(protected).float()
        err = float((got - want).abs().max())
        assert err <= LOGITS_ATOL, f"{name} {scheme} rotation={rotation} {mode}: logits differ by {err:.2e}"
        assert torch.equal(got.argmax(1), want_pred), f"{name} {scheme} rotation={rotation} {mode}"

    # Control: the same comparison without the key's unscrambling must fail.
    with torch.inference_mode():
        blind = model(network_input(np.stack([f.data for f in protected]), fmt))
    agreement = float((blind.argmax(1) == want_pred).float().mean())
    print(f"control agreement {agreement:.3f} ({name} {scheme} rotation={rotation})")  # shown with -rP
    assert agreement < CONTROL_MAX_AGREEMENT, (
        f"control: the plain model on protected frames agrees with its plain-frame predictions on "
        f"{agreement:.2f} of the frames; the exactness test could not tell protected from plain")
    assert float((blind - want).abs().max()) > 100 * LOGITS_ATOL


@pytest.mark.parametrize("rotation", [False, True])
def test_a_wrong_key_gives_chance_end_to_end(rotation):
    """The shipped sample through the sensor's keyed readout: the right key's classifier is accurate, a
    classifier built from another key (fingerprint check off, as an attacker's) is at chance."""
    n = 256
    model, cfg, _ = model_for("compact_fashion_mnist_pixel")
    _, protected = capture(cfg, KEY, "pixel", rotation, n=n)
    labels = sample().labels[:n]
    fmt = FrameFormat.from_config(cfg, scheme="pixel", rotation=rotation, height=28, width=28)
    right = KeyedClassifier(model, KEY, fmt, device="cpu")
    wrong = KeyedClassifier(model, OTHER_KEY, fmt, device="cpu", check_fingerprint=False)
    right_acc = float((right.logits(protected).argmax(1).numpy() == labels).mean())
    wrong_preds = wrong.logits(protected).argmax(1).numpy()
    wrong_acc = float((wrong_preds == labels).mean())
    print(f"rotation={rotation}: right key accuracy {right_acc:.3f}, wrong key {wrong_acc:.3f} ({n} frames)")
    assert right_acc > 0.8, right_acc
    assert wrong_acc < 0.25, f"wrong key accuracy {wrong_acc:.3f} is above the chance band (0.1)"
