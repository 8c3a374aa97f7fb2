"""LoRA / LoCon, LoHa and LoKr deltas, plain and Tucker-decomposed, linear and conv, and the IA3 /
GLoRA deltas that depend on the layer's weight, against lycoris-lora's own code (tables it produced:
tests/data/lycoris_deltas.json, tests/data/lycoris_orig_deltas.json); full diffs and their bias
applied through the LoRA patch and removed again."""

import json
from pathlib import Path

import pytest
import torch

from baka.models.networks import NETWORK_FORMATS

DATA = Path(__file__).parent / "data"
TABLE = json.loads((DATA / "lycoris_deltas.json").read_text())["cases"]
ORIG = json.loads((DATA / "lycoris_orig_deltas.json").read_text())["cases"]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_delta_equals_lycoris(name):
    case = TABLE[name]
    tensors = {k: torch.tensor(v) for k, v in case["tensors"].items()}
    fmt = next(f for n in NETWORK_FORMATS.names() if (f := NETWORK_FORMATS.get(n)).matches(tensors))
    delta, _rank = fmt.raw_delta({k: v.float() for k, v in tensors.items()})
    want = torch.tensor(case["delta"]).reshape(case["shape"])
    assert delta.numel() == want.numel(), (tuple(delta.shape), case["shape"])
    assert torch.allclose(delta.reshape(want.shape), want, atol=2e-4), name


def test_lokr_scale_is_a1111s():
    """A1111's network_lokr divides alpha by lokr_w1_b's rows, else lokr_w2_b's (Tucker included)."""
    case = TABLE["lokr conv tucker"]["tensors"]
    t = {k: torch.tensor(v) for k, v in case.items()}
    fmt = NETWORK_FORMATS.get("LoKr")
    _, rank = fmt.raw_delta(t)
    assert rank == t["lokr_w2_b"].shape[0]
    both = {k: torch.tensor(v) for k, v in TABLE["lokr conv both tucker"]["tensors"].items()}
    assert fmt.raw_delta(both)[1] == both["lokr_w1_b"].shape[0]


@pytest.mark.parametrize("name", sorted(ORIG))
def test_weight_dependent_delta_equals_lycoris(name):
    case = ORIG[name]
    tensors = {k: torch.tensor(v) for k, v in case["tensors"].items()}
    fmt = next(f for n in NETWORK_FORMATS.names() if (f := NETWORK_FORMATS.get(n)).matches(tensors))
    assert fmt.name == ("IA3" if name.startswith("ia3") else "GLoRA")
    orig = torch.tensor(case["orig"])
    delta = fmt.delta_weight(tensors, orig.shape, orig)  # no alpha: scale 1
    assert torch.allclose(delta, torch.tensor(case["delta"]).reshape(case["shape"]), atol=2e-4), name


def test_full_diff_with_bias_is_a_reversible_patch():
    from baka.generate.lora import LoraPatch, NetworkUse
    from baka.models.networks import Module, Network

    lin = torch.nn.Linear(6, 5)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    diff, diff_b = torch.randn(5, 6), torch.randn(5)
    net = Network(
        "full",
        Path("full.safetensors"),
        {"lora_unet_x": Module("lora_unet_x", {"diff": diff, "diff_b": diff_b})},
    )
    patch = LoraPatch([NetworkUse(net, 1.0, 0.5, None)], {"lora_unet_x": ("unet", lin, "IN01")})
    patch.apply({})
    assert torch.allclose(lin.weight, w0 + 0.5 * diff) and torch.allclose(lin.bias, b0 + 0.5 * diff_b)
    assert not patch.unmatched
    patch.remove()
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)


def test_dora_as_a1111():
    """A1111 1.10's apply_weight_decompose, restated per input channel: column j of W + delta is
    rescaled to length dora_scale[j], W is taken away, then alpha / rank scales the result."""
    from baka.models.networks import LoRA

    g = torch.Generator().manual_seed(3)
    orig, up, down = (
        torch.randn(5, 6, generator=g),
        torch.randn(5, 2, generator=g),
        torch.randn(2, 6, generator=g),
    )
    mag = torch.rand(1, 6, generator=g) + 0.5
    t = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": mag}
    got = LoRA.delta_weight(t, orig.shape, orig)
    merged = orig + up @ down
    want = torch.stack([merged[:, j] * mag[0, j] / merged[:, j].norm() for j in range(6)], 1) - orig
    assert torch.allclose(got, want * 0.5, atol=1e-5)  # alpha 1 / rank 2
    conv = torch.randn(4, 3, 3, 3, generator=g)
    t = {
        "lora_up.weight": torch.randn(4, 2, 1, 1, generator=g),
        "lora_down.weight": torch.randn(2, 3, 3, 3, generator=g),
    }
    mag = torch.rand(1, 3, 1, 1, generator=g) + 0.5
    got = LoRA.delta_weight({**t, "dora_scale": mag}, conv.shape, conv)
    merged = conv + (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(conv.shape)
    norms = torch.stack([merged[:, j].norm() for j in range(3)]).reshape(1, 3, 1, 1)
    assert torch.allclose(got, merged * mag / norms - conv, atol=1e-5)


def test_dora_per_output_channel_as_lycoris_writes_it():
    """LyCORIS's default (wd_on_out = True) stores dora_scale per output channel, [out, 1, ...]: each
    row of W + delta is rescaled to its magnitude (ComfyUI reads it so); square layers included."""
    from baka.models.networks import LoRA

    g = torch.Generator().manual_seed(4)
    for out_dim, in_dim in ((5, 6), (6, 6)):
        orig = torch.randn(out_dim, in_dim, generator=g)
        up, down = torch.randn(out_dim, 2, generator=g), torch.randn(2, in_dim, generator=g)
        mag = torch.rand(out_dim, 1, generator=g) + 0.5
        t = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0), "dora_scale": mag}
        got = LoRA.delta_weight(t, orig.shape, orig)
        merged = orig + up @ down
        want = torch.stack([merged[i] * mag[i, 0] / merged[i].norm() for i in range(out_dim)]) - orig
        assert torch.allclose(got, want, atol=1e-5)


def test_oft_as_lycoris():
    """LyCORIS diag-oft's get_diff_weight (lycoris-lora 4.1.3 run locally: tests/data/lycoris_oft_cases.json):
    plain, norm-constrained, at multiplier 0.5, rescaled, and on a conv; BOFT's butterfly too."""
    import json
    from pathlib import Path

    from baka.models.networks import NETWORK_FORMATS, OFT, Module

    data = json.loads((Path(__file__).parent / "data" / "lycoris_oft_cases.json").read_text())["cases"]
    assert len(data) == 8
    for name, case in data.items():
        w = torch.tensor(case["weight"])
        t = {k: torch.tensor(v) for k, v in case["tensors"].items()}
        m = Module("x", t)
        assert m.format is NETWORK_FORMATS.get("OFT") and m.unsupported() == []
        got = OFT.delta_weight(t, w.shape, w) * case["multiplier"]
        want = torch.tensor(case["delta"])
        assert torch.allclose(got, want, atol=1e-5), (name, float((got - want).abs().max()))


def test_oft_is_a_reversible_patch():
    import json
    from pathlib import Path

    from baka.generate.lora import LoraPatch, NetworkUse
    from baka.models.networks import Module, Network

    case = json.loads((Path(__file__).parent / "data" / "lycoris_oft_cases.json").read_text())["cases"][
        "linear_8x6"
    ]
    lin = torch.nn.Linear(6, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(case["weight"]))
    w0 = lin.weight.detach().clone()
    t = {k: torch.tensor(v) for k, v in case["tensors"].items()}
    net = Network("oft", Path("oft.safetensors"), {"lora_unet_x": Module("lora_unet_x", t)})
    patch = LoraPatch([NetworkUse(net, 1.0, 0.5, None)], {"lora_unet_x": ("unet", lin, "IN01")})
    patch.apply({})
    assert not patch.unmatched
    assert torch.allclose(lin.weight, w0 + 0.5 * torch.tensor(case["delta"]), atol=1e-5)
    patch.remove()
    assert torch.equal(lin.weight, w0)
