import hashlib
import json
import os
import struct

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors

from baka.errors import ModelFileError
from baka.models.ckpt import load_ckpt
from baka.models.hashes import addnet_hash, all_hashes, autov2, legacy_hash
from baka.models.io import load_checkpoint, load_vae, read_raw, save_checkpoint
from baka.models.safetensors_io import SafetensorsFile, save_file


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_loads_nothing_runs_nothing(tmp_path, run_cli):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "payload": _Evil(marker)}, bad)
    with pytest.raises(ModelFileError, match="posix.system|os.system"):
        load_ckpt(bad)
    code, out, err = run_cli("convert", bad, "-o", tmp_path / "x.safetensors")
    assert code == 2 and str(bad) in err and "could run code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


def test_lightning_ckpt_with_numpy_and_callbacks(tiny_sds, tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = np.float64(0.5)

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    ema = {
        "model_ema." + "".join(k.split(".")[1:]): v + 1
        for k, v in tiny_sds[0].items()
        if k.startswith("model.")
    }
    obj = {
        "state_dict": {
            **tiny_sds[0],
            **ema,
            "alphas_cumprod": torch.rand(1000),
            "model_ema.decay": torch.tensor(0.9),
        },
        "callbacks": {"ModelCheckpoint": ModelCheckpoint()},
        "global_step": np.int64(470000),
        "epoch": 6,
    }
    path = tmp_path / "pl.ckpt"
    torch.save(obj, path)
    monkeypatch.delitem(sys.modules, mod.__name__)  # loading must not need the class
    ck = load_checkpoint(path)
    assert_same_tensors(ck.tensors, tiny_sds[0])  # EMA and schedule buffers dropped
    ck_ema = load_checkpoint(path, ema=True)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(ck_ema.tensors[k], tiny_sds[0][k] + 1)
    assert torch.equal(
        ck_ema.tensors["first_stage_model.quant_conv.weight"],
        tiny_sds[0]["first_stage_model.quant_conv.weight"],
    )


def test_ckpt_to_safetensors_round_trip(tiny_sds, tmp_path, run_cli):
    ck = tmp_path / "m.ckpt"
    save_checkpoint(tiny_sds[0], ck)
    assert run_cli("convert", ck, "-o", tmp_path / "m.safetensors")[0] == 0
    assert_same_tensors(read_raw(tmp_path / "m.safetensors")[0], tiny_sds[0])
    assert_same_tensors(load_ckpt(ck), tiny_sds[0])


def _write_variant(tmp_path, name, sd):
    p = tmp_path / name
    save_file(sd, p)
    return p


@pytest.mark.parametrize(
    "variant,message",
    [
        ("sd2", "SD2.x"),
        ("sdxl", "SDXL"),
        ("inpaint", "inpainting"),
        ("lora", "LoRA"),
        ("vae", "VAE file"),
        ("empty", "not a Stable Diffusion checkpoint"),
    ],
)
def test_wrong_model_kinds_one_line_error(tiny_sds, tmp_path, run_cli, variant, message):
    sd = dict(tiny_sds[0])
    ka = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if variant == "sd2":
        sd[ka] = torch.zeros(sd[ka].shape[0], 1024)
    elif variant == "sdxl":
        sd = {"conditioner.embedders.1.model.ln_final.weight": torch.ones(4), **sd}
    elif variant == "inpaint":
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    elif variant == "lora":
        sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    elif variant == "vae":
        sd = {k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    else:
        sd = {"foo": torch.zeros(1)}
    p = _write_variant(tmp_path, f"{variant}.safetensors", sd)
    code, out, err = run_cli("convert", p, "-o", tmp_path / "out.safetensors")
    assert code == 2
    assert err.startswith(f"baka: error: {p}: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_and_garbage_files(tiny_files, tmp_path, run_cli):
    data = tiny_files[0].read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01hello this is not a model" * 10)
    notjson = tmp_path / "notjson.safetensors"
    notjson.write_bytes(struct.pack("<Q", 4) + b"abcd")
    for path, msg in ((trunc, "truncated"), (garbage, "not a safetensors file"), (notjson, "not JSON")):
        code, _, err = run_cli("info", path)
        assert code == 2 and str(path) in err and msg in err, err
    code, _, err = run_cli("info", tmp_path / "missing.safetensors")
    assert code == 2 and "no such file" in err


def test_hashes(tiny_files, tmp_path):
    p = tiny_files[0]
    data = p.read_bytes()
    assert len(data) > 0x110000
    assert autov2(p) == hashlib.sha256(data).hexdigest()[:10]
    assert legacy_hash(p) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    (n,) = struct.unpack("<Q", data[:8])
    assert addnet_hash(p) == hashlib.sha256(data[8 + n :]).hexdigest()
    h = all_hashes(p)
    assert h["autov2"] == autov2(p) and h["addnet"] == addnet_hash(p) and h["legacy"] == legacy_hash(p)
    # metadata edits change the file hash but not the addnet (payload) hash
    tensors, _ = read_raw(p)
    q = save_file(tensors, tmp_path / "meta.safetensors", {"note": "edited"})
    assert addnet_hash(q) == addnet_hash(p) and autov2(q) != autov2(p)


def test_info_cli(tiny_files, run_cli):
    code, out, _ = run_cli("info", tiny_files[0], "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "sd1" and info["keys"] == 1131
    assert (
        info["blocks"]["IN00"] == 6
        and info["blocks"]["BASE"] == 445
        and info["size"] == "tiny SD1.x topology"
    )
    assert sum(info["blocks"].values()) == 1131
    assert info["hashes"]["autov2"] == autov2(tiny_files[0])
    code, out, _ = run_cli("info", tiny_files[0])
    assert "model hash" in out and "IN00=6" in out


@pytest.mark.parametrize("layout", ["ldm_pt", "prefixed_safetensors", "diffusers"])
def test_separate_vae(tiny_sds, tmp_path, run_cli, layout):
    donor = tiny_sds[1]
    vae = {k: v for k, v in donor.items() if k.startswith("first_stage_model.")}
    if layout == "ldm_pt":  # kl-f8-anime2 style: no prefix, training loss keys, pickled
        path = tmp_path / "anime.vae.pt"
        sd = {k[len("first_stage_model.") :]: v for k, v in vae.items()} | {"loss.logvar": torch.zeros(())}
        torch.save({"state_dict": sd}, path)
    elif layout == "prefixed_safetensors":
        path = save_file(vae, tmp_path / "vae.safetensors")
    else:
        from baka.models.convert import ldm_to_diffusers

        path = save_file(ldm_to_diffusers(donor)[0]["vae"], tmp_path / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(load_vae(path), vae)
    out = tmp_path / "baked.safetensors"
    base = tmp_path / "base.safetensors"
    save_checkpoint(tiny_sds[0], base)
    assert run_cli("convert", base, "--vae", path, "-o", out)[0] == 0
    baked, _ = read_raw(out)
    assert_same_tensors({k: v for k, v in baked.items() if k.startswith("first_stage_model.")}, vae)
    assert torch.equal(
        baked["model.diffusion_model.out.2.weight"], tiny_sds[0]["model.diffusion_model.out.2.weight"]
    )


def test_never_overwrites_input(tiny_files, run_cli):
    before = tiny_files[0].read_bytes()
    code, _, err = run_cli("convert", tiny_files[0], "-o", tiny_files[0], "--dtype", "fp16")
    assert code == 2 and "refusing to overwrite an input" in err
    assert tiny_files[0].read_bytes() == before


def test_zero_copy_views_are_copy_on_write(tiny_files):
    with SafetensorsFile(tiny_files[0]) as f:
        t = f.get("model.diffusion_model.out.2.bias")
        before = t.clone()
        t.add_(1)  # must not crash and must not touch the file
    with SafetensorsFile(tiny_files[0]) as f:
        assert torch.equal(f.get("model.diffusion_model.out.2.bias"), before)


def test_outputs_have_ordinary_permissions(tiny_sds, tmp_path):
    old = os.umask(0o022)
    try:
        p = save_checkpoint(tiny_sds[0], tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def test_unlisted_containers_are_refused_not_dropped(tmp_path):
    import collections

    path = tmp_path / "dd.ckpt"
    torch.save(
        {"state_dict": collections.defaultdict(list, {"model.diffusion_model.x": torch.ones(1)})}, path
    )
    with pytest.raises(ModelFileError, match="refused: the pickle references collections.defaultdict"):
        load_ckpt(path)
