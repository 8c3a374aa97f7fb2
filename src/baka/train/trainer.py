"""The training loop (full fine-tune or LoRA), on accelerate so ``accelerate launch`` scales it out."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS, block_of_diffusers
from baka.registry import Registry
from baka.train import checkpoint
from baka.train.block_dropout import parse_schedules, resting_blocks
from baka.train.config import TrainConfig
from baka.train.data import Dataset, LatentCache, captions_for
from baka.train.network import LoRANetwork, block_lr_weights

OPTIMIZERS: Registry[type] = Registry("optimizer")
OPTIMIZERS.add("AdamW", torch.optim.AdamW)
OPTIMIZERS.add("Adam", torch.optim.Adam)
OPTIMIZERS.add("SGD", torch.optim.SGD)


def _seed(*parts: object) -> int:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _Denoiser(nn.Module):
    """What DDP wraps: text encoder + UNet (+ LoRA network), returning the UNet prediction."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, network: LoRANetwork | None):
        super().__init__()
        self.unet, self.text_encoder, self.network = unet, text_encoder, network

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        enc = self.text_encoder(input_ids=ids).last_hidden_state
        return self.unet(noisy, t, enc).sample


def freeze_text_encoder(te: nn.Module, cfg: TrainConfig) -> set[int]:
    """EveryDream2 freezing by requires_grad; returns the indices of CLIP layers left trainable."""
    tm = getattr(te, "text_model", te)
    n = len(tm.encoder.layers)
    te.requires_grad_(cfg.train_text_encoder)
    if not cfg.train_text_encoder:
        return set()
    keep = n if cfg.unfreeze_last_n_layers is None else max(0, min(n, cfg.unfreeze_last_n_layers))
    for i, layer in enumerate(tm.encoder.layers):
        layer.requires_grad_(i >= n - keep)
    if cfg.freeze_embeddings:
        tm.embeddings.requires_grad_(False)
    if cfg.freeze_final_layer_norm:
        tm.final_layer_norm.requires_grad_(False)
    return set(range(n - keep, n))


@dataclass
class TrainResult:
    output: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)


def train(
    cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True
) -> TrainResult:
    """Train per ``cfg``; ``resume`` continues from the latest checkpoint in ``output_dir``.
    ``stop_after`` ends the run after that many steps of this call without final outputs (tests)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from diffusers import DDPMScheduler

    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.models.tokenizer import clean_text, load_tokenizer

    # cpu=True without CUDA: under torchrun that makes accelerate run MULTI_CPU (gloo) across processes;
    # find_unused_parameters because module / block dropout leave some LoRA weights out of a step
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    ckpt = load_checkpoint(cfg.model)
    comps = ckpt.components()
    torch.manual_seed(cfg.seed)  # identical initialisation on every process
    unet = build_module("unet", ckpt.config, comps["unet"]).to(device)
    te = build_module("text_encoder", ckpt.config, comps["text_encoder"]).to(device)
    vae = build_module("vae", ckpt.config, comps["vae"]).to(device).requires_grad_(False)
    sched = DDPMScheduler.from_config(
        ckpt.config.scheduler,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        prediction_type="v_prediction" if cfg.v_prediction else "epsilon",
    )
    ac = sched.alphas_cumprod.to(device)
    snr = ac / (1 - ac)  # after the zero-terminal-SNR fix, so the last SNR is exactly 0
    te_layers = freeze_text_encoder(te, cfg)
    lr_w = block_lr_weights(cfg.network)
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate

    network = None
    named: dict[str, tuple[nn.Parameter, str]] = {}  # trainable name -> (param, block)
    if cfg.mode == "lora":
        unet.requires_grad_(False)
        te.requires_grad_(False)
        network = LoRANetwork(unet, te if cfg.train_text_encoder else None, cfg.network, te_layers).to(device)
        for name, m in network.lora.items():
            for pn, p in m.named_parameters():
                named[f"{name}.{pn}"] = (p, m.block)
    else:
        unet.requires_grad_(True)
        for n, p in unet.named_parameters():
            named[f"unet.{n}"] = (p, block_of_diffusers("unet", n) or "BASE")
        for n, p in te.named_parameters():
            if p.requires_grad:
                named[f"text_encoder.{n}"] = (p, "BASE")
    groups: dict[tuple[str, float], list] = {}
    for name, (p, block) in named.items():
        w = lr_w[block]
        is_te = "lora_te_" in name or name.startswith("text_encoder.")
        if w == 0:
            p.requires_grad_(False)
            continue
        groups.setdefault((block, (te_lr if is_te else cfg.learning_rate) * w), []).append(p)
    named = {k: v for k, v in named.items() if v[0].requires_grad}
    if not named:
        raise BakaError("nothing to train: every block has LR weight 0 or dim 0")
    opt = OPTIMIZERS.get(cfg.optimizer)(
        [{"params": ps, "lr": lr, "block": b} for (b, lr), ps in groups.items()],
        lr=cfg.learning_rate,
        **({"weight_decay": cfg.weight_decay} if cfg.optimizer != "SGD" else {}),
    )
    model = _Denoiser(unet, te, network)
    model, opt = acc.prepare(model, opt)
    ema = {k: p.detach().float().clone() for k, (p, _) in named.items()} if cfg.ema_decay else None
    by_block: dict[str, list[nn.Parameter]] = {b: [] for b in BLOCK_IDS}
    for p, b in named.values():
        by_block[b].append(p)
    schedules = parse_schedules(cfg.block_dropout)

    ds = Dataset(cfg.dataset)
    cache = LatentCache(vae, cfg.dataset.cache_latents)
    n_batches = len(ds.epoch_batches(0, cfg.seed, world, rank))
    if n_batches == 0:
        raise BakaError(f"dataset has too few batches for {world} processes")
    tok = load_tokenizer()
    out_dir = cfg.out
    ck_root = out_dir / "checkpoints"
    step, losses, val_losses = 0, [], []
    if resume:
        ck = checkpoint.latest(ck_root)
        if ck is None:
            raise BakaError(f"{ck_root}: no checkpoint to resume from")
        tensors, opt_state, state = checkpoint.load(ck)
        with torch.no_grad():
            for k, (p, _) in named.items():
                p.copy_(tensors[k])
            if ema is not None:
                ema = {k: tensors[f"ema.{k}"].float() for k in named}
        opt.load_state_dict(opt_state)
        step, losses, val_losses = state["step"], state["losses"], [tuple(v) for v in state["val_losses"]]
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    def encode_ids(captions: list[str]) -> torch.Tensor:
        return tok(
            [clean_text(c) for c in captions],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    def loss_of(latents, ids, gen) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen).to(device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(
                device
            )
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
        pred = model(sched.add_noise(latents, noise, t), t, ids)
        target = sched.get_velocity(latents, noise, t) if cfg.v_prediction else noise
        per = nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            s = snr[t]
            g = torch.clamp(s, max=cfg.min_snr_gamma)
            # Hang et al. 2023: eps w = min(snr, g) / snr ; v w = min(snr, g) / (snr + 1)
            w = (
                g / (s + 1)
                if cfg.v_prediction
                else torch.where(s > 0, g / s.clamp_min(1e-12), torch.ones_like(s))
            )
            per = per * w
        return per.mean()

    @torch.no_grad()
    def validate() -> float | None:
        if not ds.val:
            return None
        model.eval()
        total = []
        for i, it in enumerate(ds.val):
            lat = cache.get([it], device)
            ids = encode_ids([it.caption])
            total.append(loss_of(lat, ids, torch.Generator().manual_seed(_seed(cfg.seed, "val", i))).item())
        return sum(total) / len(total)

    def save_checkpoint() -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            tensors = {k: p.detach() for k, (p, _) in named.items()}
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.items()})
            state = {"step": step, "losses": losses, "val_losses": val_losses, "mode": cfg.mode}
            checkpoint.save(ck_root, step, tensors, opt.state_dict(), state)
        acc.wait_for_everyone()

    target_steps = cfg.max_steps if stop_after is None else min(cfg.max_steps, step + stop_after)
    bar = tqdm(
        total=cfg.max_steps, initial=step, desc="train", disable=not (progress and acc.is_main_process)
    )
    epoch_cache: dict[int, list] = {}
    t0 = time.time()
    while step < target_steps:
        epoch, idx = divmod(step, n_batches)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: ds.epoch_batches(epoch, cfg.seed, world, rank)}
        items = epoch_cache[epoch][idx]
        torch.manual_seed(_seed(cfg.seed, "step", step, rank))  # dropout masks
        gen = torch.Generator().manual_seed(_seed(cfg.seed, "noise", step, rank))
        resting = resting_blocks(schedules, step, cfg.seed)
        if network is not None:
            for m in network.lora.values():
                m.resting = m.block in resting
        model.train()
        latents = cache.get(items, device)
        ids = encode_ids(captions_for(items, cfg.seed, step, rank))
        loss = loss_of(latents, ids, gen)
        acc.backward(loss)
        if acc.sync_gradients and cfg.max_grad_norm:
            acc.clip_grad_norm_([p for p, _ in named.values()], cfg.max_grad_norm)
        for b in resting:  # a resting block gets no optimizer update at all (not even momentum)
            for p in by_block[b]:
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for k, (p, _) in named.items():
                    ema[k].mul_(cfg.ema_decay).add_(p.detach().float(), alpha=1 - cfg.ema_decay)
        step += 1
        losses.append(acc.gather(loss.detach()[None]).mean().item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if cfg.validate_every and step % cfg.validate_every == 0:
            v = validate()
            if v is not None:
                val_losses.append((step, v))
        if cfg.sample_every and step % cfg.sample_every == 0 and acc.is_main_process:
            _samples(cfg, acc.unwrap_model(model), vae, ckpt.config, step)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint()
    bar.close()
    if stop_after is not None and step < cfg.max_steps:
        return TrainResult(None, step, losses, val_losses)
    output = None
    acc.wait_for_everyone()
    if acc.is_main_process:
        if ema is not None:  # outputs carry the EMA weights
            with torch.no_grad():
                for k, (p, _) in named.items():
                    p.copy_(ema[k].to(p.dtype))
        output = _save_output(cfg, acc.unwrap_model(model), ckpt, ds, step, time.time() - t0)
        _loss_plot(out_dir / "loss.png", losses, val_losses)
        (out_dir / "losses.json").write_text(json.dumps({"train": losses, "val": val_losses}))
        if cfg.sample_prompts:
            _samples(cfg, acc.unwrap_model(model), vae, ckpt.config, step)
    acc.wait_for_everyone()
    return TrainResult(output, step, losses, val_losses)


def _save_output(cfg: TrainConfig, model: _Denoiser, ckpt, ds: Dataset, step: int, seconds: float) -> Path:
    from baka import __version__
    from baka.models.convert import diffusers_to_ldm
    from baka.models.io import save_checkpoint
    from baka.models.safetensors_io import payload_sha256, save_file

    path = cfg.out / f"{cfg.output_name}.safetensors"
    common = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{cfg.dataset.resolution}x{cfg.dataset.resolution}",
        "modelspec.prediction_type": "v" if cfg.v_prediction else "epsilon",
        "baka_version": __version__,
        "baka_block_dropout": json.dumps(cfg.block_dropout, sort_keys=True),
    }
    if cfg.mode == "lora":
        sd = model.network.kohya_state_dict()
        tags: dict[str, Counter] = {}
        for it in ds.train:
            tags.setdefault(Path(it.subset.image_dir).name, Counter()).update(
                t.strip() for t in it.caption.split(",") if t.strip()
            )
        n = cfg.network
        meta = {
            **common,
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(n.dim),
            "ss_network_alpha": str(n.alpha),
            "ss_network_dropout": str(n.dropout),
            "ss_network_args": json.dumps(
                {
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
            "ss_max_train_steps": str(cfg.max_steps),
            "ss_steps": str(step),
            "ss_seed": str(cfg.seed),
            "ss_training_time_s": f"{seconds:.0f}",
            "ss_num_train_images": str(len(ds.train)),
            "ss_resolution": f"({cfg.dataset.resolution}, {cfg.dataset.resolution})",
            "ss_v2": "False",
            "ss_base_model_version": "sd_v1",
            "ss_sd_model_name": Path(cfg.model).name,
            "ss_output_name": cfg.output_name,
            "ss_min_snr_gamma": str(cfg.min_snr_gamma),
            "ss_noise_offset": str(cfg.noise_offset),
            "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
            "ss_tag_frequency": json.dumps({k: dict(v) for k, v in tags.items()}),
            "sshs_model_hash": payload_sha256(sd),
        }
        save_file(sd, path, meta)
        return path
    comps = ckpt.components()
    comps["unet"] = {k: v.detach().cpu() for k, v in model.unet.state_dict().items()}
    comps["text_encoder"] = {k: v.detach().cpu() for k, v in model.text_encoder.state_dict().items()}
    ldm = diffusers_to_ldm(comps, ckpt.config)
    save_checkpoint(
        ldm,
        path,
        metadata={**common, "modelspec.architecture": "stable-diffusion-v1", "baka_train_steps": str(step)},
        protect=[cfg.model],
    )
    return path


def _samples(cfg: TrainConfig, model: _Denoiser, vae, sd_config, step: int) -> None:
    from baka.generate.engine import Generator, GenParams

    was = model.training
    model.eval()
    try:
        gen = Generator.from_modules(model.unet, model.text_encoder, vae, sd_config, name=cfg.output_name)
        folder = cfg.out / "samples"
        for i, prompt in enumerate(cfg.sample_prompts):
            size = 8 * model.unet.config.sample_size
            r = gen(
                GenParams(
                    prompt,
                    steps=cfg.sample_steps,
                    seed=cfg.seed + i,
                    width=size,
                    height=size,
                    v_pred=cfg.v_prediction,
                    zero_snr=cfg.zero_terminal_snr,
                )
            )[0]
            r.save(folder / f"step{step:06d}-{i}.png")
    finally:
        model.train(was)


def _loss_plot(path: Path, losses: list[float], val: list[tuple[int, float]]) -> None:
    """Training loss (light: raw, dark: moving average) and validation loss (red dots) over steps."""
    from PIL import Image, ImageDraw

    from baka.models.safetensors_io import atomic_output

    w, h, m = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    vals = losses + [v for _, v in val]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    n = max(len(losses), max((s for s, _ in val), default=1))

    def xy(i: float, v: float) -> tuple[float, float]:
        return m + (w - 2 * m) * i / max(1, n - 1), h - m - (h - 2 * m) * (v - lo) / span

    if len(losses) > 1:
        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
        k = max(1, len(losses) // 20)
        avg = [
            sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1])
            for i in range(len(losses))
        ]
        d.line([xy(i, v) for i, v in enumerate(avg)], fill=(30, 60, 160), width=2)
    for s, v in val:
        x, y = xy(s - 1, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 8), f"loss (train blue, validation red)  steps 1-{n}", fill="black")
    d.text((4, m - 6), f"{hi:.4g}", fill="black")
    d.text((4, h - m - 6), f"{lo:.4g}", fill="black")
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")
