import json

import pytest
import torch

from baka.errors import BakaError, ModelFileError
from baka.merge.engine import merge_models
from baka.merge.recipe import Recipe
from baka.merge.weights import parse_weights
from baka.models.blocks import BLOCK_INDEX, block_of
from baka.models.hashes import addnet_hash
from baka.models.io import read_raw, save_checkpoint
from baka.models.safetensors_io import SafetensorsFile

GRAD = parse_weights("GRAD_V")


def _recipe(files, method="weight_sum", alpha=GRAD, beta=0.0, **kw):
    return Recipe(method, [str(f) for f in files], parse_weights(alpha), parse_weights(beta), **kw)


def test_block_weighted_sum_per_key(tiny_files, tiny_sds, tmp_path):
    out = tmp_path / "m.safetensors"
    res = merge_models(_recipe(tiny_files[:2]), out, progress=False)
    merged, _ = read_raw(out)
    a, b = tiny_sds[0], tiny_sds[1]
    assert set(merged) == set(a) and res.keys == len(a)
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(merged[k], a[k])
            continue
        w = GRAD[BLOCK_INDEX[block_of(k)]]
        assert torch.allclose(merged[k], torch.lerp(a[k], b[k], w), atol=1e-6), k
    # GRAD_V: BASE 0 -> exactly A; IN00 1 (time_embed too) -> exactly B; M00 0 -> A
    assert torch.equal(
        merged["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
        a["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
    )
    assert torch.equal(
        merged["model.diffusion_model.time_embed.2.weight"], b["model.diffusion_model.time_embed.2.weight"]
    )
    assert torch.equal(
        merged["model.diffusion_model.middle_block.1.proj_in.weight"],
        a["model.diffusion_model.middle_block.1.proj_in.weight"],
    )


def test_fp32_math_then_output_dtype(tiny_sds, tmp_path):
    half = [tmp_path / "a16.safetensors", tmp_path / "b16.safetensors"]
    for p, sd in zip(half, tiny_sds, strict=False):
        save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, p)
    out = tmp_path / "m.safetensors"
    merge_models(_recipe(half, alpha=0.3), out, progress=False)
    merged, _ = read_raw(out)
    k = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    a, b = read_raw(half[0])[0][k], read_raw(half[1])[0][k]
    assert merged[k].dtype == torch.float16
    assert torch.equal(merged[k], torch.lerp(a.float(), b.float(), 0.3).half())
    out32 = tmp_path / "m32.safetensors"
    merge_models(_recipe(half, alpha=0.3, dtype="fp32"), out32, progress=False)
    m32, _ = read_raw(out32)
    assert m32[k].dtype == torch.float32 and torch.equal(m32[k], torch.lerp(a.float(), b.float(), 0.3))
    assert m32["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_large_tensors_are_chunked_identically(tiny_files, tmp_path, monkeypatch):
    import baka.merge.engine as engine

    whole = tmp_path / "whole.safetensors"
    merge_models(_recipe(tiny_files[:2], alpha=0.37), whole, progress=False)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)  # force row chunking on most tensors
    chunked = tmp_path / "chunked.safetensors"
    merge_models(_recipe(tiny_files[:2], alpha=0.37), chunked, progress=False)
    assert addnet_hash(whole) == addnet_hash(chunked)


def test_deterministic_and_replayable(tiny_files, tmp_path):
    r = _recipe(tiny_files[:2], method="dare", alpha=0.5, beta=0.5, seed=3)
    one, two = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    merge_models(r, one, progress=False)
    merge_models(Recipe.from_file(one), two, progress=False)
    assert one.read_bytes() == two.read_bytes()  # same recipe -> same bytes, header included
    other = tmp_path / "3.safetensors"
    merge_models(_recipe(tiny_files[:2], method="dare", alpha=0.5, beta=0.5, seed=4), other, progress=False)
    assert addnet_hash(other) != addnet_hash(one)


def test_metadata_recipe_and_a1111_keys(tiny_files, tmp_path):
    out = tmp_path / "m.safetensors"
    merge_models(_recipe(tiny_files[:2], elemental="IN05:attn2:0.9"), out, progress=False)
    with SafetensorsFile(out) as f:
        meta = f.metadata
    rec = json.loads(meta["baka_recipe"])
    assert (
        rec["method"] == "weight_sum" and rec["alpha"] == list(GRAD) and rec["elemental"] == "IN05:attn2:0.9"
    )
    import hashlib

    sha_a = hashlib.sha256(tiny_files[0].read_bytes()).hexdigest()
    assert rec["model_sha256"][0] == sha_a
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["primary_model_hash"] == sha_a and a1111["interp_method"] == "Weighted sum"
    # A1111's types: multiplier one float; the 26 weights in baka's own keys
    assert isinstance(a1111["multiplier"], float) and a1111["baka_alpha"] == list(GRAD)
    assert a1111["multiplier"] == pytest.approx(sum(GRAD) / 26)
    models = json.loads(meta["sd_merge_models"])
    from baka.models.hashes import legacy_hash

    assert models[sha_a] == {"name": "modelA.safetensors", "legacy_hash": legacy_hash(tiny_files[0]),
                             "sd_merge_recipe": None}  # fmt: skip
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_merge_of_merges_flattens_the_ancestry_as_a1111(tiny_files, tmp_path):
    import hashlib

    m1 = tmp_path / "m1.safetensors"
    merge_models(Recipe("add_difference", [str(p) for p in tiny_files], (0.3,) * 26, (0.0,) * 26), m1,
                 progress=False)  # fmt: skip
    m2 = tmp_path / "m2.safetensors"
    merge_models(_recipe([m1, tiny_files[1]]), m2, progress=False)
    with SafetensorsFile(m2) as f:
        models = json.loads(f.metadata["sd_merge_models"])
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (*tiny_files, m1)}
    assert set(models) == set(sha.values())  # m1, and A, B, C through m1's own list
    assert models[sha["m1.safetensors"]]["sd_merge_recipe"]["interp_method"] == "Add difference"
    assert models[sha["modelC.safetensors"]]["name"] == "modelC.safetensors"


def test_elemental_overrides(tiny_files, tiny_sds, tmp_path):
    out = tmp_path / "m.safetensors"
    rules = "IN05 OUT02:attn2:1\nNOT IN05 OUT02 BASE:norm:1\nOUT02:NOT attn2:0.25"
    merge_models(_recipe(tiny_files[:2], alpha=0.0, elemental=rules), out, progress=False)
    m, _ = read_raw(out)
    a, b = tiny_sds[0], tiny_sds[1]
    k1 = "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    k2 = "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn1.to_k.weight"
    k3 = "model.diffusion_model.output_blocks.7.1.norm.weight"  # a norm outside IN05/OUT02
    k4 = "model.diffusion_model.output_blocks.2.0.in_layers.2.weight"  # OUT02, not attn2
    k5 = "cond_stage_model.transformer.text_model.final_layer_norm.weight"  # BASE excluded by NOT
    assert torch.equal(m[k1], b[k1]) and torch.equal(m[k2], a[k2])
    assert torch.equal(m[k3], b[k3]) and torch.equal(m[k5], a[k5])
    assert torch.allclose(m[k4], torch.lerp(a[k4], b[k4], 0.25))


def test_missing_keys_copied_and_non_model_keys_dropped(tiny_sds, tmp_path):
    a = dict(tiny_sds[0]) | {"model_ema.decay": torch.tensor(0.99), "alphas_cumprod": torch.rand(10)}
    b = {k: v for k, v in tiny_sds[1].items() if not k.startswith("first_stage_model.")}
    pa, pb = save_checkpoint(a, tmp_path / "a.safetensors"), save_checkpoint(b, tmp_path / "b.safetensors")
    res = merge_models(_recipe([pa, pb], alpha=0.5), tmp_path / "m.safetensors", progress=False)
    m, _ = read_raw(res.path)
    assert sorted(res.dropped) == ["alphas_cumprod", "model_ema.decay"] and "alphas_cumprod" not in m
    k = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(m[k], a[k])


def test_errors(tiny_files, tiny_sds, tmp_path):
    with pytest.raises(BakaError, match="needs 3 models"):
        merge_models(
            _recipe(tiny_files[:2], method="add_difference"), tmp_path / "x.safetensors", progress=False
        )
    with pytest.raises(ModelFileError, match="refusing to overwrite an input"):
        merge_models(_recipe(tiny_files[:2]), tiny_files[1], progress=False)
    bad = dict(tiny_sds[1])
    k = "model.diffusion_model.out.2.weight"
    bad[k] = torch.zeros(4, 64, 3, 3)
    pb = save_checkpoint(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match=f"bad.safetensors: shape of {k}"):
        merge_models(_recipe([tiny_files[0], pb]), tmp_path / "x.safetensors", progress=False)
    assert not (tmp_path / "x.safetensors").exists()
    assert not list(tmp_path.glob(".*.part"))  # no half-written temp file left behind


def test_failure_mid_write_leaves_nothing(tiny_files, tmp_path, monkeypatch):
    import baka.merge.methods as methods

    calls = {"n": 0}
    real = methods.METHODS.get("weight_sum")

    def boom(a, b, c, x):
        calls["n"] += 1
        if calls["n"] > 50:
            raise RuntimeError("disk on fire")
        return real.fn(a, b, c, x)

    from dataclasses import replace

    monkeypatch.setitem(methods.METHODS._items, "weight_sum", replace(real, fn=boom))
    out = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_models(_recipe(tiny_files[:2], alpha=0.5), out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "method",
    [
        "add_difference",
        "train_difference",
        "triple_sum",
        "sum_twice",
        "smooth_add_difference",
        "ties",
        "ties_mecha",
        "cosine_a",
        "cosine_b",
        "cosine_a_columns",
        "tensor",
        "tensor2",
        "self",
        "extract",
        "dare",
    ],
)
def test_every_method_runs_on_real_topology(tiny_files, tiny_sds, tmp_path, method):
    from baka.merge.methods import METHODS, Ctx

    m = METHODS.get(method)
    files = tiny_files if m.needs_c else tiny_files[:2]
    out = tmp_path / "m.safetensors"
    merge_models(_recipe(files, method=method, alpha=0.5, beta=0.3), out, progress=False)
    merged, _ = read_raw(out)
    # [128, 512]: tensor2 slices axis 1 only where it is longer than 100 (supermerger's rule)
    k = "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.ff.net.2.weight"
    c = tiny_sds[2][k] if m.needs_c else None
    state = None
    if m.prepare is not None:  # the model-wide pass (cosine's similarity range) over the same models
        state = m.prepare(lambda key: (tiny_sds[0][key], tiny_sds[1][key]), list(tiny_sds[0]))
    want = m.fn(tiny_sds[0][k], tiny_sds[1][k], c, Ctx(k, 0.5, 0.3, 0, state))
    assert torch.allclose(merged[k], want, atol=1e-6)
    assert not torch.equal(merged[k], tiny_sds[0][k])


def test_diffusers_folder_input_and_hash_alignment(tiny_files, tiny_sds, tmp_path, run_cli):
    import hashlib

    folder = tmp_path / "b-diffusers"
    assert run_cli("convert", tiny_files[1], "-o", folder, "--diffusers")[0] == 0
    out = tmp_path / "m.safetensors"
    merge_models(_recipe([tiny_files[0], folder], alpha=0.25), out, progress=False)
    merged, _ = read_raw(out)
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.allclose(merged[k], torch.lerp(tiny_sds[0][k], tiny_sds[1][k], 0.25), atol=1e-6)
    with SafetensorsFile(out) as f:
        meta = f.metadata
    sha_a = hashlib.sha256(tiny_files[0].read_bytes()).hexdigest()
    assert json.loads(meta["baka_recipe"])["model_sha256"] == [sha_a, ""]  # one entry per model, in order
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["primary_model_hash"] == sha_a and a1111["secondary_model_hash"] is None
    assert list(json.loads(meta["sd_merge_models"])) == [sha_a]


def test_partial_a_takes_missing_keys_from_b(tiny_sds, tmp_path, run_cli):
    from baka.models.io import load_checkpoint
    from baka.models.keymap import VAE_PREFIX

    a = {k: v for k, v in tiny_sds[0].items() if not k.startswith(VAE_PREFIX)}  # a UNet + TE file, no VAE
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(a, pa)
    save_checkpoint(tiny_sds[1], pb)
    out = tmp_path / "m.safetensors"
    code, stdout, _ = run_cli("merge", pa, pb, "-o", out, "-a", "0.5", "-q")
    assert code == 0 and "keys model A lacks taken from B" in stdout
    merged, _ = read_raw(out)
    assert set(merged) == set(tiny_sds[1])  # nothing of B's model dropped: a loadable whole model
    vae_keys = [k for k in tiny_sds[1] if k.startswith(VAE_PREFIX)]
    assert vae_keys and all(torch.equal(merged[k], tiny_sds[1][k]) for k in vae_keys)
    assert "vae" in load_checkpoint(out).components()


def test_inpainting_model_merges_as_a1111(tiny_files, tiny_sds, tmp_path, run_cli):
    """inpaint + (custom - base), A1111's recipe for an inpainting version of a custom model: the first
    conv's 4 latent channels get the difference, its 5 extra (mask, masked image) stay A's."""
    from baka.models.config import tiny_config
    from baka.models.detect import classify
    from baka.models.tiny import tiny_checkpoint

    cfg = tiny_config()
    cfg.unet["in_channels"] = 9
    inpaint = tiny_checkpoint(4, cfg)
    path = tmp_path / "inpaint.safetensors"
    save_checkpoint(inpaint, path)
    out = tmp_path / "custom-inpainting.safetensors"
    files = [str(path), str(tiny_files[1]), str(tiny_files[0])]
    merge_models(Recipe("add_difference", files, (1.0,) * 26, (0.0,) * 26), out, progress=False)
    got, _ = read_raw(out)
    custom, base = tiny_sds[1], tiny_sds[0]
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert got[k].shape[1] == 9
    assert torch.allclose(got[k][:, :4], inpaint[k][:, :4] + custom[k] - base[k], atol=1e-6)
    assert torch.equal(got[k][:, 4:], inpaint[k][:, 4:])
    k2 = "model.diffusion_model.output_blocks.5.1.proj_in.weight"
    assert torch.allclose(got[k2], inpaint[k2] + custom[k2] - base[k2], atol=1e-6)
    assert classify({n: tuple(t.shape) for n, t in got.items()}).name == "sd1-inpaint"
    with SafetensorsFile(out) as f:
        assert json.loads(f.metadata["sd_merge_recipe"])["is_inpainting"] is True
    code, _, err = run_cli("merge", tiny_files[0], path, "-o", tmp_path / "x.safetensors", "-a", "0.5")
    assert code == 2 and "an inpainting model must be model A" in err and err.count("\n") == 1
