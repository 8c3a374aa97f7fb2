"""What a finished run writes: the LoRA (kohya ``ss_*`` metadata) or the full model (LDM layout),
both with modelspec metadata, and preview samples."""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from baka.models.io import SAVE_PRECISION_DTYPES
from baka.train.config import SAVE_PRECISIONS, TrainConfig
from baka.train.data import Dataset
from baka.train.optim import optimizer_description, warmup_steps

SAVE_DTYPES = {name: SAVE_PRECISION_DTYPES[name] for name in SAVE_PRECISIONS}


def save_dtype(cfg: TrainConfig) -> torch.dtype:
    """kohya's ``save_precision``: the dtype of every floating tensor in the written file."""
    return SAVE_DTYPES[cfg.save_precision]


def common_metadata(cfg: TrainConfig) -> dict[str, str]:
    from baka import __version__

    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{cfg.dataset.resolution}x{cfg.dataset.resolution}",
        "modelspec.prediction_type": "v" if cfg.v_prediction else "epsilon",
        "baka_version": __version__,
        "baka_block_dropout": json.dumps(cfg.block_dropout, sort_keys=True),
    }


def tag_frequency(ds: Dataset) -> dict[str, dict[str, int]]:
    """kohya ``ss_tag_frequency``: image folder name -> caption tag -> count over the training items."""
    tags: dict[str, Counter] = {}
    for it in ds.train:
        tags.setdefault(Path(it.subset.image_dir).name, Counter()).update(
            t.strip() for t in it.caption.split(",") if t.strip()
        )
    return {k: dict(v) for k, v in tags.items()}


def lora_metadata(cfg: TrainConfig, ds: Dataset, step: int, seconds: float) -> dict[str, str]:
    """The kohya ``ss_*`` training metadata of a LoRA (without ``sshs_model_hash``)."""
    n = cfg.network
    return {
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "ss_network_module": "networks.lora" if n.algo == "lora" and not n.dora_wd else "lycoris.kohya",
        "ss_network_dim": str(n.dim),
        "ss_network_alpha": str(n.alpha),
        "ss_network_dropout": str(n.dropout),
        "ss_network_args": json.dumps(
            {
                "algo": n.algo,
                "dora_wd": n.dora_wd,
                "factor": n.factor,
                "decompose_both": n.decompose_both,
                "conv_dim": n.conv_dim,
                "conv_alpha": n.conv_alpha,
                "rank_dropout": n.rank_dropout,
                "module_dropout": n.module_dropout,
                "block_dims": n.block_dims,
                "block_alphas": n.block_alphas,
                "down_lr_weight": n.down_lr_weight,
                "mid_lr_weight": n.mid_lr_weight,
                "up_lr_weight": n.up_lr_weight,
            }
        ),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr),
        "ss_unet_lr": str(cfg.unet_lr),
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_max_token_length": str(cfg.max_token_length),
        "ss_optimizer": optimizer_description(cfg),
        "ss_max_train_steps": str(cfg.max_steps),
        "ss_steps": str(step),
        "ss_seed": str(cfg.seed),
        "ss_training_time_s": f"{seconds:.0f}",
        # kohya: images x repeats of the training (not regularisation) folders
        "ss_num_train_images": str(math.floor(sum(it.repeats for it in ds.train if not it.subset.is_reg))),
        "ss_resolution": f"({cfg.dataset.resolution}, {cfg.dataset.resolution})",
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": Path(cfg.model).name,
        "ss_output_name": cfg.output_name,
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(warmup_steps(cfg)),
        "ss_scale_v_pred_loss_like_noise_pred": str(cfg.scale_v_pred_loss_like_noise_pred),
        "ss_debiased_estimation": str(cfg.debiased_estimation_loss),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_timestep": str(cfg.min_timestep),
        "ss_max_timestep": str(cfg.max_timestep or 1000),
        "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
        "ss_tag_frequency": json.dumps(tag_frequency(ds)),
        **run_metadata(cfg, ds),
        **dataset_metadata(cfg, ds, step, seconds),
        **model_hashes(cfg.model),
    }


def run_metadata(cfg: TrainConfig, ds: Dataset) -> dict[str, str]:
    """More of kohya's ss_* fields: the session (a random id, as kohya), the finish time, and settings
    baka has or fixes (loss l2, no fp8 / full-fp16 / low-RAM modes, kohya's "None" for unset ones)."""
    import random
    import time

    return {
        "ss_session_id": str(random.SystemRandom().randint(0, 2**32)),
        "ss_training_finished_at": str(time.time()),
        "ss_training_comment": str(cfg.training_comment),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_loss_type": "l2",
        "ss_full_fp16": "False",
        "ss_fp8_base": "False",
        "ss_fp8_base_unet": "False",
        "ss_lowram": "False",
        "ss_vae_name": "None",  # the base model's own VAE
        "ss_validation_split": str(cfg.dataset.validation_split if cfg.dataset else 0.0),
        "ss_validate_every_n_steps": str(cfg.validate_every or None),
        "ss_num_validation_images": str(len(ds.val)),
        "ss_caption_dropout_every_n_epochs": "0",
        "ss_face_crop_aug_range": "None",
        "ss_ip_noise_gamma": "None",
        "ss_multires_noise_iterations": "None",
        "ss_adaptive_noise_scale": "None",
    }


def reg_counts(ds: Dataset) -> list[tuple]:
    """(subset, images found) of each regularisation subset."""
    found: dict[int, list] = {}
    for it in ds.reg_found:
        found.setdefault(id(it.subset), [it.subset, 0])[1] += 1
    return [(s, n) for s, n in found.values()]


def dataset_metadata(cfg: TrainConfig, ds: Dataset, step: int, seconds: float) -> dict[str, str]:
    """kohya's dataset and batch ``ss_*`` fields (strings, as kohya writes them)."""
    import time

    d = cfg.dataset
    assert d is not None
    k = cfg.gradient_accumulation_steps
    per_epoch = max(1, len(ds.epoch_batches(0, cfg.seed, 1, 0, k)))
    dirs: dict[bool, dict[str, dict[str, int]]] = {False: {}, True: {}}
    for it in ds.train:
        entry = dirs[it.subset.is_reg].setdefault(
            Path(it.subset.image_dir).name, {"n_repeats": it.subset.num_repeats, "img_count": 0}
        )
        entry["img_count"] += 1
    counts: dict[tuple[int, int], int] = {}
    for it in ds.train:
        counts[it.bucket] = counts.get(it.bucket, 0) + math.floor(it.repeats)
    buckets = {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))}
    first = d.subsets[0]
    return {
        "ss_dataset_dirs": json.dumps(dirs[False]),
        "ss_reg_dataset_dirs": json.dumps(dirs[True]),
        "ss_bucket_info": json.dumps({"buckets": buckets}),
        "ss_num_batches_per_epoch": str(per_epoch),
        "ss_num_epochs": str(math.ceil(cfg.max_steps / per_epoch)),
        "ss_epoch": str(math.ceil(step / per_epoch)),
        "ss_batch_size_per_device": str(d.batch_size),
        "ss_total_batch_size": str(d.batch_size * k),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_cache_latents": str(d.cache_latents),
        "ss_enable_bucket": str(d.enable_bucket),
        "ss_min_bucket_reso": str(d.min_bucket_reso),
        "ss_max_bucket_reso": str(d.max_bucket_reso),
        "ss_bucket_no_upscale": "False",
        "ss_keep_tokens": str(first.keep_tokens),
        "ss_shuffle_caption": str(first.shuffle_caption),
        "ss_caption_dropout_rate": str(first.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(first.caption_tag_dropout_rate),
        "ss_flip_aug": str(first.flip_aug),
        "ss_color_aug": str(first.color_aug),
        "ss_random_crop": str(first.random_crop),
        # kohya: the reg folders' images x repeats as found (before balancing)
        "ss_num_reg_images": str(sum(s.num_repeats * n for s, n in reg_counts(ds))),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_training_started_at": str(time.time() - seconds),
    }


def model_hashes(model: str) -> dict[str, str]:
    """kohya's ``ss_sd_model_hash`` (A1111's legacy hash) and ``ss_new_sd_model_hash`` (the file's
    sha256) of the base model, when it is one file."""
    from baka.models.shipped import resolve

    path = resolve(model)
    if not path.is_file():
        return {}
    return _hashes(str(path), path.stat().st_size, path.stat().st_mtime_ns)


@functools.cache
def _hashes(path: str, size: int, mtime: int) -> dict[str, str]:
    from baka.models.hashes import legacy_hash, sha256_file

    return {"ss_sd_model_hash": legacy_hash(path), "ss_new_sd_model_hash": sha256_file(path)}


def save_lora(cfg: TrainConfig, network, ds: Dataset, step: int, seconds: float) -> Path:
    from baka.models.safetensors_io import payload_sha256, save_file

    path = cfg.out / f"{cfg.output_name}.safetensors"
    sd = network.kohya_state_dict()
    sd = {k: v.to(save_dtype(cfg)) if v.is_floating_point() else v for k, v in sd.items()}
    meta = {
        **common_metadata(cfg),
        **lora_metadata(cfg, ds, step, seconds),
        "sshs_model_hash": payload_sha256(sd),
    }
    save_file(sd, path, meta)
    return path


def save_full(cfg: TrainConfig, unet: nn.Module, text_encoder: nn.Module, ckpt, step: int) -> Path:
    """The base checkpoint with the trained UNet and text encoder, in LDM layout."""
    from baka.models.pipeline import save_modules

    path = cfg.out / f"{cfg.output_name}.safetensors"
    meta = {
        **common_metadata(cfg),
        "modelspec.architecture": "stable-diffusion-v1",
        "baka_train_steps": str(step),
    }
    modules = {"unet": unet, "text_encoder": text_encoder}
    save_modules(ckpt, modules, path, metadata=meta, protect=[cfg.model], dtype=save_dtype(cfg))
    return path


def save_output(cfg: TrainConfig, model, ckpt, ds: Dataset, step: int, seconds: float) -> Path:
    """``output_dir/output_name.*`` from the (unwrapped) denoiser, as its mode writes it: the LoRA
    network, the UNet + text encoder, or the embedding."""
    from baka.train.modes import MODES

    return MODES.get(cfg.mode).save(cfg, model, ckpt, ds, step, seconds)


def save_textual_inversion(cfg: TrainConfig, emb, ds: Dataset, step: int, seconds: float) -> Path:
    """The learnt vectors as an embedding file named ``output_name`` (prompts use it by that name)."""
    from baka.train.embedding import save_embedding

    meta = {
        **common_metadata(cfg),
        **{k: v for k, v in lora_metadata(cfg, ds, step, seconds).items() if not k.startswith("ss_network")},
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
        "ss_token_string": emb.name,
        "ss_init_word": cfg.init_word,
        "ss_num_vectors_per_token": str(cfg.num_vectors_per_token),
    }
    vectors = emb.vectors.to(save_dtype(cfg))
    return save_embedding(cfg.out / cfg.output_name, cfg.output_name, vectors, meta, cfg.save_model_as)


def save_samples(cfg: TrainConfig, model, vae, sd_config, step: int, epoch: int | None = None) -> list[Path]:
    """kohya's sample images for ``sample_prompts`` (:mod:`baka.train.samples`): one per prompt, in
    ``output_dir/sample``, named as kohya names them; the model's native size unless a prompt says."""
    from baka.generate.engine import Generator, GenParams
    from baka.generate.samplers import SAMPLERS
    from baka.train.samples import load_prompts, sample_name

    was = model.training
    model.eval()
    written = []
    try:
        gen = Generator.from_modules(model.unet, model.text_encoder, vae, sd_config, name=cfg.output_name)
        if hasattr(model.network, "snapshot"):  # textual inversion: the prompts use the embedding so far
            gen.embeddings.add(model.network.snapshot())
        native = 8 * model.unet.config.sample_size
        for i, sp in enumerate(load_prompts(cfg.sample_prompts)):
            seed = cfg.seed + i if sp.seed is None else sp.seed
            r = gen(
                GenParams(
                    sp.prompt,
                    sp.negative,
                    steps=sp.steps or cfg.sample_steps,
                    sampler=SAMPLERS.get(sp.sampler or cfg.sample_sampler).name,
                    cfg=sp.scale,
                    seed=seed,
                    width=sp.width or native,
                    height=sp.height or native,
                    v_pred=cfg.v_prediction,
                    zero_snr=cfg.zero_terminal_snr,
                    clip_skip=cfg.clip_skip,
                )
            )[0]
            name = sample_name(cfg.output_name, i, seed, step=step, epoch=epoch)
            written.append(r.save(cfg.out / "sample" / name))
    finally:
        model.train(was)
    return written
