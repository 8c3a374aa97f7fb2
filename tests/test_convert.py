import json
from pathlib import Path

import torch
from conftest import assert_same_tensors

from baka.models.blocks import BLOCK_IDS, block_of, block_of_diffusers
from baka.models.config import infer_config, tiny_config
from baka.models.convert import diffusers_to_ldm, ldm_to_diffusers
from baka.models.io import load_checkpoint, read_raw


def test_tiny_has_sd15_key_layout(tiny_sds):
    sd = tiny_sds[0]
    assert len(sd) == 1131
    comps, extra = ldm_to_diffusers(sd)
    assert {c: len(v) for c, v in comps.items()} == {"unet": 686, "vae": 248, "text_encoder": 196}
    assert list(extra) == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]


def test_keymap_agrees_with_diffusers_converter(tiny_sds):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd, cfg = tiny_sds[0], tiny_config()
    comps, _ = ldm_to_diffusers(sd, cfg)
    for ours, theirs in (
        (comps["unet"], convert_ldm_unet_checkpoint(sd, cfg.unet)),
        (comps["vae"], convert_ldm_vae_checkpoint(sd, cfg.vae)),
    ):
        assert_same_tensors(ours, theirs)


def test_round_trip_is_bit_exact(tiny_sds):
    sd = tiny_sds[0]
    comps, _ = ldm_to_diffusers(sd)
    assert_same_tensors(diffusers_to_ldm(comps, tiny_config()), sd)


def test_config_inference(tiny_sds):
    cfg = infer_config({k: tuple(v.shape) for k, v in tiny_sds[0].items()})
    t = tiny_config()
    assert (cfg.unet, cfg.vae, cfg.text_encoder) == (t.unet, t.vae, t.text_encoder)


def test_every_model_key_has_a_block(tiny_sds):
    blocks = {k: block_of(k) for k in tiny_sds[0]}
    assert None not in blocks.values()
    assert set(blocks.values()) == set(BLOCK_IDS)
    assert blocks["model.diffusion_model.time_embed.0.weight"] == "IN00"
    assert blocks["model.diffusion_model.out.2.weight"] == "OUT11"
    assert blocks["model.diffusion_model.input_blocks.4.1.proj_in.weight"] == "IN04"
    assert blocks["model.diffusion_model.middle_block.2.in_layers.0.weight"] == "M00"
    assert blocks["first_stage_model.decoder.up.0.block.0.conv1.weight"] == "BASE"
    assert block_of("model_ema.decay") is None and block_of("alphas_cumprod") is None


def test_diffusers_blocks_agree_with_ldm(tiny_sds):
    comps, _ = ldm_to_diffusers(tiny_sds[0])
    assert block_of_diffusers("unet", "down_blocks.1.attentions.0.proj_in.weight") == "IN04"
    assert block_of_diffusers("unet", "up_blocks.0.upsamplers.0.conv.weight") == "OUT02"
    assert block_of_diffusers("unet", "up_blocks.3.attentions.2.proj_out.bias") == "OUT11"
    assert block_of_diffusers("unet", "time_embedding.linear_1.weight") == "IN00"
    assert all(block_of_diffusers("unet", k) for k in comps["unet"])


def test_diffusers_folder_round_trip_and_pipeline_loads(tiny_files, tmp_path, run_cli):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "pipe"
    assert run_cli("convert", tiny_files[0], "-o", folder, "--diffusers")[0] == 0
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    back = tmp_path / "back.safetensors"
    assert run_cli("convert", folder, "-o", back)[0] == 0
    assert_same_tensors(read_raw(back)[0], read_raw(tiny_files[0])[0])

    # an ordinary diffusers user can load the folder offline and gets the same UNet
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert len(pipe.tokenizer) == 49408
    from baka.models.pipeline import build_module

    ckpt = load_checkpoint(tiny_files[0])
    ours = build_module("unet", ckpt.config, ckpt.components()["unet"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x, 10, ctx).sample, pipe.unet(x, 10, ctx).sample)


def test_pipeline_generates_offline(tiny_files):
    from baka.models.pipeline import build_pipeline

    pipe = build_pipeline(load_checkpoint(tiny_files[0]))
    g = torch.Generator().manual_seed(0)
    img = pipe("a cat", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    assert not torch.isnan(torch.from_numpy(img)).any()


def test_fp16_convert(tiny_files, tmp_path, run_cli):
    out = tmp_path / "half.safetensors"
    assert run_cli("convert", tiny_files[0], "-o", out, "--dtype", "fp16")[0] == 0
    half, _ = read_raw(out)
    full, _ = read_raw(tiny_files[0])
    for k, v in half.items():
        if full[k].is_floating_point():
            assert v.dtype == torch.float16 and torch.equal(v, full[k].half()), k
        else:
            assert torch.equal(v, full[k])


def test_old_text_encoder_keys_normalised(tiny_sds, tmp_path):
    from baka.models.io import save_checkpoint

    p = "cond_stage_model.transformer."
    sd = {
        (p + k[len(p + "text_model.") :] if k.startswith(p + "text_model.") else k): v
        for k, v in tiny_sds[0].items()
    }
    save_checkpoint(sd, tmp_path / "old.safetensors")
    assert_same_tensors(load_checkpoint(tmp_path / "old.safetensors").tensors, tiny_sds[0])


def test_shipped_config_folder_is_a_from_single_file_target(tiny_files, tiny_sds, tmp_path):
    """The shipped SD1.5 folder holds everything diffusers' ``from_single_file(config=...)`` reads
    offline (model_index.json, the configs, the tokenizer), equal to what ``write_configs`` writes; a
    folder written for the tiny config loads a tiny checkpoint through diffusers alone."""
    from importlib import resources

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from baka.models.config import sd15_config
    from baka.models.diffusers_writer import write_configs

    shipped = Path(str(resources.files("baka.models").joinpath("configs/sd15")))
    fresh = write_configs(sd15_config(), tmp_path / "sd15", with_components=False)
    for f in (
        "model_index.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
    ):
        assert (shipped / f).read_bytes() == (fresh / f).read_bytes(), f
    for comp in ("unet", "vae", "text_encoder"):
        assert json.loads((shipped / comp / "config.json").read_text()) == getattr(sd15_config(), comp)
    assert len(CLIPTokenizer.from_pretrained(shipped / "tokenizer")) == 49408

    folder = write_configs(tiny_config(), tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_files[0]), config=str(folder), local_files_only=True, safety_checker=None
    )
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(pipe.unet.down_blocks[0].attentions[0].proj_in.weight, tiny_sds[0][k])
    assert len(pipe.tokenizer) == 49408
