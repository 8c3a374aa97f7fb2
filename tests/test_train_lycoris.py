"""LyCORIS training (LoHa, LoKr, DoRA): the modules have lycoris-lora's shapes, factorisation, scale and
saved alpha (tables from running lycoris-lora 4.1.3 locally: tests/data/lycoris_module_shapes.json), and a
trained file, loaded by the generator's network loader, gives exactly what the training hooks computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import write_config
from torch import nn

from baka.errors import BakaError
from baka.train.config import NetworkConfig, load_config
from baka.train.network import ALGOS, LoRANetwork, factorization, module_factory
from baka.train.trainer import train

DATA = Path(__file__).parent / "data" / "lycoris_module_shapes.json"

# lycoris.functional.general.factorization, run locally (its docstring's table is stale: 360 -> 18, 20)
FACTORS = {
    127: [(1, 127), (1, 127), (1, 127), (1, 127), (1, 127)],
    128: [(8, 16), (2, 64), (4, 32), (8, 16), (8, 16)],
    250: [(10, 25), (2, 125), (2, 125), (5, 50), (10, 25)],
    360: [(18, 20), (2, 180), (4, 90), (8, 45), (15, 24)],
    768: [(24, 32), (2, 384), (4, 192), (8, 96), (16, 48)],
    1280: [(32, 40), (2, 640), (4, 320), (8, 160), (16, 80)],
}


@pytest.mark.parametrize("dim", sorted(FACTORS))
def test_factorization_as_lycoris(dim):
    assert [factorization(dim, f) for f in (-1, 2, 4, 8, 16)] == FACTORS[dim]


def _layer(name: str) -> nn.Module:
    kind, *sizes = name.split("_")
    if kind == "linear":
        return nn.Linear(int(sizes[1]), int(sizes[0]))
    return nn.Conv2d(int(sizes[1]), int(sizes[0]), int(sizes[2]), padding=int(sizes[2]) // 2)


CASES = {  # the table's case -> baka's network settings
    "loha": {"algo": "loha", "dim": 4, "alpha": 2},
    "lokr": {"algo": "lokr", "dim": 4, "alpha": 2},
    "lokr_f8": {"algo": "lokr", "dim": 4, "alpha": 2, "factor": 8},
    "lokr_both": {"algo": "lokr", "dim": 4, "alpha": 2, "decompose_both": True},
    "lokr_big": {"algo": "lokr", "dim": 64, "alpha": 2},
    "locon_dora": {"algo": "lora", "dim": 4, "alpha": 4, "dora_wd": True},
}


def test_module_shapes_scale_and_alpha_as_lycoris():
    table = json.loads(DATA.read_text())["cases"]
    assert len(table) == 24
    for key, want in table.items():
        case, layer_name = key.split("/")
        cfg = NetworkConfig(**CASES[case])
        layer = _layer(layer_name)
        m = module_factory(cfg)("x", layer, cfg.dim, cfg.alpha, cfg, "IN01")
        got = {k: list(t.shape) for k, t in m.file_tensors().items()}
        assert got == want["shapes"], key
        assert float(m.alpha) == want["alpha"], key
        # the loader's scale: alpha / the rank a low-rank factor has, 1 when both factors are full
        from baka.models.networks import NETWORK_FORMATS

        t = {k: v.detach().float() for k, v in m.file_tensors().items()}
        _, rank = NETWORK_FORMATS.get(m.format_name).raw_delta(t)
        assert (1.0 if rank is None else float(m.alpha) / rank) == want["scale"], key


def _unet_out(unet, x, ctx):
    with torch.no_grad():
        return unet(x, 10, ctx).sample


@pytest.mark.parametrize(
    "net",
    [
        {"algo": "loha", "dim": 4, "alpha": 2, "conv_dim": 2, "conv_alpha": 1, "rank_dropout": 0.1},
        {"algo": "lokr", "dim": 4, "alpha": 2, "conv_dim": 4, "conv_alpha": 4, "module_dropout": 0.1},
        {"algo": "lora", "dim": 4, "alpha": 4, "dora_wd": True},
        {"algo": "loha", "dim": 4, "alpha": 4, "dora_wd": True},
    ],
    ids=["loha", "lokr", "dora", "loha-dora"],
)
def test_trained_lycoris_file_loads_as_trained(tmp_path, tiny_files, net):
    """Train a few steps; the file's modules all find their layers in the generator, and the loader's
    patched weights give the UNet output the training hooks give."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image, ImageDraw

    for i, c in enumerate(("red", "blue")):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse([8, 8, 56, 56], fill=c)
        im.save(imgs / f"i{i}.png")
        (imgs / f"i{i}.txt").write_text(f"{c} circle")
    cfg = load_config(write_config(tmp_path, tiny_files[0], imgs, max_steps=3, network=net))
    res = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    from safetensors import safe_open

    from baka.generate.lora import LoraPatch, NetworkUse, target_names
    from baka.models.io import load_checkpoint
    from baka.models.networks import load_network
    from baka.models.pipeline import build_module

    with safe_open(str(res.output), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == net["algo"]
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "lora": ".lora_down.weight"}[net["algo"]]
    assert any(k.endswith(marker) for k in keys)
    assert any(k.endswith(".dora_scale") for k in keys) == bool(net.get("dora_wd"))
    ck = load_checkpoint(tiny_files[0])
    unet = build_module("unet", ck.config, ck.components()["unet"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    base = _unet_out(unet, x, ctx)
    trained = LoRANetwork(unet, None, cfg.network)
    trained.load_kohya(res.output)
    trained.eval()
    hooked = _unet_out(unet, x, ctx)
    trained.remove()
    assert torch.equal(_unet_out(unet, x, ctx), base)
    patch = LoraPatch([NetworkUse(load_network(res.output), 1.0, 1.0, None)], target_names(unet, None))
    patch.apply({})
    assert not patch.unmatched
    baked = _unet_out(unet, x, ctx)
    patch.remove()
    assert not torch.allclose(hooked, base, atol=1e-6)  # it learned something
    assert torch.allclose(baked, hooked, atol=1e-5, rtol=1e-4)


def test_lycoris_settings_are_checked(tmp_path, tiny_files):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    cases = [
        ({"algo": "loah"}, "did you mean .*'loha'"),
        ({"algo": "loha", "dropout": 0.1}, "network dropout and LoRA\\+ are LoRA's"),
        ({"algo": "lokr", "loraplus_lr_ratio": 16}, "LoRA\\+ are LoRA's"),
        ({"dora_wd": True, "dim": 4, "alpha": 2}, "needs alpha = dim"),
        ({"dora_wd": True, "dim": 4, "alpha": 4, "rank_dropout": 0.1}, "act on LoRA's activations"),
    ]
    for net, match in cases:
        with pytest.raises(BakaError, match=match):
            load_config(write_config(tmp_path, tiny_files[0], imgs, network=net))
    assert {"lora", "loha", "lokr"} <= {ALGOS.canonical(n) for n in ("lora", "locon", "loha", "lokr")}
