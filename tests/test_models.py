"""Plain models: factory, shapes, parameter counts, and a quick training sanity check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.plain import MODEL_NAMES, CompactNet, PreResNet, build_model, vgg16_bn

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "size"), [("compact", 28), ("compact", 32), ("preresnet20", 32),
                                            ("vgg16_bn", 32)])
@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_output_shapes(name, size, in_channels):
    model = build_model(name, in_channels, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def test_factory_builds_every_name_and_rejects_unknown():
    for name in MODEL_NAMES:
        model = build_model(name, 3, 10)
        assert isinstance(model, nn.Sequential)  # the keyed converter walks the children in order
    assert build_model("preresnet56", 3, 10).depth == 56
    with pytest.raises(ValueError, match="vgg16_bn, preresnet20, preresnet56, preresnet110, compact"):
        build_model("resnet18", 3, 10)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("compact", 0, 10)
    with pytest.raises(ValueError, match="depth"):
        PreResNet(depth=21)
    with pytest.raises(ValueError, match="input_size"):
        vgg16_bn(3, 10, input_size=48)


def test_parameter_counts():
    total = n_params(build_model("preresnet110", 3, 10))
    assert abs(total - 1.70e6) / 1.70e6 < 0.02, total
    assert total == 1_730_522  # 54 pre-activation blocks + two 1x1 projection shortcuts
    assert n_params(build_model("preresnet20", 3, 10)) == 272_282
    assert n_params(build_model("vgg16_bn", 3, 10)) == 14_724_042
    assert n_params(CompactNet(1, 10)) < 100_000


def test_vgg16_structure_and_larger_inputs():
    model = vgg16_bn(3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 13 and len(pools) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    big = vgg16_bn(3, 10, input_size=64).eval()
    assert big.classifier.in_features == 512 * 4
    with torch.no_grad():
        assert big(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_preresnet_layout():
    model = build_model("preresnet20", 3, 10)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert model.layer1[0].downsample is None
    assert model.layer2[0].downsample[0].stride == (2, 2)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 17, 23)).shape == (1, 10)  # global average pool


def test_compact_net_learns_quickly():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = CompactNet(1, 2)
    x = torch.randn(32, 1, 28, 28, generator=g)
    y = (x[:, 0, :14].mean((1, 2)) > x[:, 0, 14:].mean((1, 2))).long()  # top half brighter?
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
