"""Checks of the PyTorch reference against the release's key lists and the reference's layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import torch_reference as R

KEY_DIR = Path(__file__).parent / "data" / "official_keys"
KEY_FILES = sorted(KEY_DIR.glob("*.txt"))
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _read_key_list(path: Path) -> tuple[dict[str, str], list[tuple[str, tuple[int, ...], str]]]:
    header: dict[str, str] = {}
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            for field in line[1:].split():
                if "=" in field:
                    k, v = field.split("=", 1)
                    header[k] = v
            continue
        if not line.strip():
            continue
        key, shape, dtype = line.split()
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        rows.append((key, dims, dtype))
    return header, rows


def _build_from_header(header: dict[str, str]) -> R.VideoNet:
    return R.build(
        header["net"],
        int(header["num_class"]),
        num_segments=int(header["num_segments"]),
        depth=int(header["arch"].removeprefix("resnet")),
        dropout=float(header["dropout"]),
    )


def test_key_lists_present() -> None:
    assert len(KEY_FILES) == 13


@pytest.mark.parametrize("path", KEY_FILES, ids=[p.stem for p in KEY_FILES])
def test_state_dict_matches_release_key_list(path: Path) -> None:
    header, rows = _read_key_list(path)
    model = _build_from_header(header)
    got = [
        ("module." + k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]
    assert {k: (s, d) for k, s, d in got} == {k: (s, d) for k, s, d in rows}
    # Same registration order too, so that a state dict round-trips key for key.
    assert [k for k, _, _ in got] == [k for k, _, _ in rows]


@pytest.mark.parametrize(
    "name, expected",
    [("TSM", 23_864_558), ("C2D", 23_864_558), ("TSM_CinST_BN", 23_868_142)],
)
def test_parameter_counts_resnet50_174(name: str, expected: int) -> None:
    assert R.count_params(R.build(name, 174)) == expected


def test_dropout_zero_puts_classifier_in_base_model() -> None:
    sd = R.build("TSM_C_BN", 7, depth=14, width=8, dropout=0.0).state_dict()
    assert sd["base_model.fc.weight"].shape == (7, 256)
    assert sd["base_model.fc.bias"].shape == (7,)
    assert not any(k.startswith("new_fc") for k in sd)
    sd = R.build("TSM_C_BN", 7, depth=14, width=8, dropout=0.5).state_dict()
    assert not any(k.startswith("base_model.fc") for k in sd)
    assert sd["new_fc.weight"].shape == (7, 256)


def test_torchvision_resnet_layout() -> None:
    tv = R.TorchvisionResNet(50)
    assert R.count_params(tv) == 25_557_032  # torchvision resnet50
    sd = tv.state_dict()
    assert sd["fc.weight"].shape == (1000, 2048)
    video = R.build("C2D", 174, dropout=0.5).state_dict()
    backbone = {
        k.removeprefix("base_model."): v.shape for k, v in video.items() if "new_fc" not in k
    }
    assert {k: v.shape for k, v in sd.items() if not k.startswith("fc.")} == backbone
    assert R.count_params(R.TorchvisionResNet(101)) == 44_549_160  # torchvision resnet101
    tiny = R.randomize_(R.TorchvisionResNet(14, width=8), seed=1).eval()
    with torch.no_grad():
        feats = tiny.features(torch.randn(2, 3, 32, 32))
        logits = tiny(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 256) and logits.shape == (2, 1000)


def test_resnet101_stage3_odd_blocks_have_no_shift_or_attention() -> None:
    net = R.build("TSM_CinST_BN", 174, depth=101)
    for i, block in enumerate(net.base_model.layer3):
        assert (block.shift == "blockres") == (i % 2 == 0)
        assert hasattr(block, "eft") == (i % 2 == 0)
    for layer in (net.base_model.layer1, net.base_model.layer4):
        assert all(b.shift == "blockres" and hasattr(b, "eft") for b in layer)


def test_initialisation() -> None:
    net = R.build("TSM_CinST_BN", 11, depth=14, width=8)
    assert torch.all(net.new_fc.bias == 0)
    assert 0.0002 < net.new_fc.weight.std().item() < 0.002
    bn = net.base_model.layer1[0].eft.C_bn
    assert bn.weight.item() == 1.0 and bn.bias.item() == 0.0


def test_randomize_touches_every_parameter_and_buffer() -> None:
    net = R.build("TSM_STinCplusCinST_BN", 5, depth=14, width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    R.randomize_(net, seed=3)
    after = net.state_dict()
    for k, v in after.items():
        assert not torch.equal(v, before[k]), k
        if k.endswith("running_var"):
            assert torch.all(v > 0), k
    again = R.randomize_(R.build("TSM_STinCplusCinST_BN", 5, depth=14, width=8), seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())


def test_temporal_shift() -> None:
    b, t, c = 2, 4, 16
    x = torch.randn(b * t, c, 3, 3)
    y = R.temporal_shift(x, t).view(b, t, c, 3, 3)
    x5 = x.view(b, t, c, 3, 3)
    fold = c // 8
    for ti in range(t):
        nxt = x5[:, ti + 1, :fold] if ti + 1 < t else torch.zeros_like(x5[:, 0, :fold])
        prv = x5[:, ti - 1, fold : 2 * fold] if ti > 0 else torch.zeros_like(x5[:, 0, :fold])
        assert torch.equal(y[:, ti, :fold], nxt)
        assert torch.equal(y[:, ti, fold : 2 * fold], prv)
        assert torch.equal(y[:, ti, 2 * fold :], x5[:, ti, 2 * fold :])


# For each gate: the x5 axis pooled over, and the x5 axes the Conv3d's D1, D2, D3 slide over.
GATE_AXES = {"C": (2, (1, 3, 4)), "T": (1, (2, 3, 4)), "H": (3, (1, 2, 4)), "W": (4, (1, 3, 2))}


@pytest.mark.parametrize("gate", list(GATE_AXES))
def test_gate_axis_order(gate: str) -> None:
    """A one-hot kernel tap at +1 along D_d must read the pooled map at +1 along that x5 axis."""
    b, t, c, h, w = 2, 3, 5, 6, 7  # all distinct, so a swapped axis cannot go unnoticed
    unit = R.AttentionUnit("CinST", num_segments=t).eval()
    bn = getattr(unit, f"{gate}_bn")
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    x5 = torch.randn(b, t, c, h, w)
    pooled_axis, d_axes = GATE_AXES[gate]
    pooled = {
        0: x5.amax(dim=pooled_axis, keepdim=True),
        1: x5.mean(dim=pooled_axis, keepdim=True),
    }
    for k in (0, 1):  # pooled channel: max first, then mean
        for d, axis in enumerate(d_axes):
            weight = torch.zeros(1, 2, 3, 3, 3)
            idx = [0, k, 1, 1, 1]
            idx[2 + d] = 2
            weight[tuple(idx)] = 1.0
            with torch.no_grad():
                getattr(unit, f"{gate}_conv").weight.copy_(weight)
                got = unit.gate_logits(gate, x5)
            n = x5.shape[axis]
            expected = torch.zeros_like(pooled[k])
            expected.narrow(axis, 0, n - 1).copy_(pooled[k].narrow(axis, 1, n - 1))
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_units_follow_the_definitions() -> None:
    t = 4
    unit = R.randomize_(R.AttentionUnit("CinST", t), seed=5).eval()
    stinc = R.AttentionUnit("STinC", t).eval()
    stinc.load_state_dict(unit.state_dict())
    x = torch.randn(2 * t, 6, 5, 5)
    x5 = x.view(2, t, 6, 5, 5)
    with torch.no_grad():
        y = x5 * unit.gate("C", x5)
        cinst = x5 * (unit.gate("T", y) + unit.gate("H", y) + unit.gate("W", y)) / 3
        z = x5 * (unit.gate("T", x5) + unit.gate("H", x5) + unit.gate("W", x5)) / 3
        st_in_c = x5 * unit.gate("C", z)
        torch.testing.assert_close(unit(x), cinst.reshape_as(x))
        torch.testing.assert_close(stinc(x), st_in_c.reshape_as(x))


@pytest.mark.parametrize("backbone", ["TSM", "C2D"])
@pytest.mark.parametrize("attention", [None, *R.PLACEMENTS])
def test_tiny_forward(backbone: str, attention: str | None) -> None:
    name = backbone if attention is None else f"{backbone}_{attention}_BN"
    net = R.randomize_(R.build(name, 5, num_segments=4, depth=14, width=8), seed=0)
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        out_eval = net.eval()(x)
        out_train = net.train()(x)
    for out in (out_eval, out_train):
        assert out.shape == (2, 5)
        assert torch.isfinite(out).all()


def test_shift_place_block_differs_from_blockres() -> None:
    x = torch.randn(1, 4, 3, 32, 32)
    outs = {}
    for place in ("blockres", "block"):
        net = R.build("TSM_C_BN", 3, num_segments=4, depth=14, width=8, shift_place=place)
        outs[place] = R.randomize_(net, seed=2).eval()(x).detach()
    assert not torch.allclose(outs["blockres"], outs["block"])
