import pytest
import torch

from baka.erase.esd import ERASE_METHODS, EraseConfig, erase
from baka.errors import BakaError
from baka.models.io import load_checkpoint, read_raw
from baka.models.pipeline import build_module


@pytest.fixture(scope="module")
def probe(tiny_files):
    from baka.generate.conditioning import PromptEncoder

    ck = load_checkpoint(tiny_files[0])
    te = build_module("text_encoder", ck.config, ck.components()["text_encoder"])
    enc = PromptEncoder(te)
    with torch.no_grad():
        c = enc.encode_chunks(enc.chunks("a cat")[:1])
        u = enc.encode_chunks(enc.chunks("")[:1])
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(4)]
    ts = [torch.tensor([t]) for t in (100, 400, 700, 900)]
    return ck, c, u, xs, ts


def gap(path, probe, eta=1.0):
    ck0, c, u, xs, ts = probe
    orig = build_module("unet", ck0.config, ck0.components()["unet"])
    ck = load_checkpoint(path)
    unet = build_module("unet", ck.config, ck.components()["unet"])
    total = 0.0
    with torch.no_grad():
        for x, t in zip(xs, ts, strict=True):
            e0, ec = orig(x, t, u).sample, orig(x, t, c).sample
            target = e0 - eta * (ec - e0)
            total += torch.nn.functional.mse_loss(unet(x, t, c).sample, target).item()
    return total


# ESD-u trains every non-attn2 weight, so it needs a smaller step on a random tiny model
@pytest.mark.parametrize("method,lr", [("ESD-x", 1e-4), ("ESD-u", 1e-5), ("ESD-x-strict", 1e-4)])
def test_esd_moves_towards_target_and_touches_only_its_parameters(tiny_files, tmp_path, probe, method, lr):
    out = tmp_path / "erased.safetensors"
    erase(
        tiny_files[0],
        EraseConfig("a cat", method, eta=1.0, iterations=25, lr=lr, ddim_steps=5),
        out,
        progress=False,
    )
    # the conditional prediction for the concept moved towards the negatively guided target
    assert gap(out, probe) < 0.9 * gap(tiny_files[0], probe)
    before, after = read_raw(tiny_files[0])[0], read_raw(out)[0]
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    sel = ERASE_METHODS.get(method)
    assert all(sel("." + k) for k in changed), [k for k in changed if not sel("." + k)][:3]
    if method == "ESD-x-strict":
        assert {k.split(".attn2.")[1].split(".")[0] for k in changed} == {"to_k", "to_v"}


def test_delta_only_and_cli(tiny_files, tmp_path, run_cli):
    out = tmp_path / "delta.safetensors"
    code, stdout, _ = run_cli(
        "erase",
        tiny_files[0],
        "a cat",
        "-o",
        out,
        "--iterations",
        2,
        "--ddim-steps",
        3,
        "--delta-only",
        "--lr",
        1e-3,
    )
    assert code == 0 and "[erase]" in stdout
    delta = read_raw(out)[0]
    assert delta and all(".attn2." in k for k in delta)
    from baka.models.safetensors_io import SafetensorsFile

    with SafetensorsFile(out) as f:
        assert '"concept": "a cat"' in f.metadata["baka_erase"]
    code, _, err = run_cli("erase", tiny_files[0], "x", "-o", out, "-m", "ESD-z")
    assert code == 2 and "did you mean" in err


def test_unknown_method():
    with pytest.raises(BakaError):
        ERASE_METHODS.get("nope")
