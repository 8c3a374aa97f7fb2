"""The training loop (full fine-tune or LoRA), on accelerate so ``accelerate launch`` scales it out.

The pieces live beside it: :mod:`~baka.train.loss` (the loss), :mod:`~baka.train.optim` (what trains,
LR groups, optimizer, EMA), :mod:`~baka.train.outputs` (the saved model), :mod:`~baka.train.report`
(losses.json, loss.png), :mod:`~baka.train.checkpoint` (resumable state)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from baka.errors import BakaError
from baka.train import checkpoint
from baka.train.augment import augments_for
from baka.train.block_dropout import parse_schedules, resting_blocks
from baka.train.config import TrainConfig, check_steps, check_text_settings
from baka.train.data import Dataset, LatentCache, captions_for
from baka.train.logs import DEFAULT_TRACKER_NAME, StepLogs, log_target, lr_names
from baka.train.loss import caption_free_loss, ddpm_schedule, diffusion_loss, draw_noise
from baka.train.modes import MODES, Mode, with_weighted_captions
from baka.train.network import LoRANetwork
from baka.train.optim import (
    EMA,
    by_block,
    freeze_text_encoder,
    make_lr_scheduler,
    make_optimizer,
    param_groups,
    trainables,
)
from baka.train.outputs import save_output, save_samples
from baka.train.report import write_report


def _seed(*parts: object) -> int:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _Denoiser(nn.Module):
    """What DDP wraps: text encoder + UNet (+ the mode's module: LoRA network or embedding), returning
    the UNet prediction for the captions' tokens as the mode encodes them."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        network: nn.Module | None,
        mode: Mode,
        clip_skip: int = 1,
        cache_text: bool = False,
    ):
        super().__init__()
        self.unet, self.text_encoder, self.network, self.mode = unet, text_encoder, network, mode
        self.clip_skip = clip_skip
        # kohya's cache_text_encoder_outputs: a frozen encoder's states per token sequence
        self.text_cache: dict[bytes, torch.Tensor] | None = {} if cache_text else None

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.text_cache is None:
            enc = self.mode.text_states(self.network, self.text_encoder, cond, clip_skip=self.clip_skip)
        else:
            enc = self.cached_states(cond)
        return self.unet(noisy, t, enc).sample

    @torch.no_grad()
    def cached_states(self, cond: torch.Tensor) -> torch.Tensor:
        """The encoder's states row by row, each computed once per distinct token sequence."""
        assert self.text_cache is not None
        rows = []
        for row in cond:
            key = row.cpu().numpy().tobytes()
            states = self.text_cache.get(key)
            if states is None:
                states = self.mode.text_states(
                    self.network, self.text_encoder, row[None], clip_skip=self.clip_skip
                )[0]
                self.text_cache[key] = states
            rows.append(states)
        return torch.stack(rows)


@dataclass
class TrainResult:
    output: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    log_with, log_dir = log_target(cfg)
    # cpu=True without CUDA: under torchrun that makes accelerate run MULTI_CPU (gloo) across processes;
    # find_unused_parameters because module / block dropout leave some LoRA weights out of a step
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=log_with,
        project_dir=None if log_dir is None else str(log_dir),
    )
    # accelerate launch --use_fsdp / --use_deepspeed on CPU processes quietly becomes plain data
    # parallel (MULTI_CPU): refused rather than run as something else than asked
    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(env, "").lower() in ("1", "true") and acc.distributed_type.name != name.upper():
            raise BakaError(
                f"accelerate launch asked for {name}, but accelerate runs this as "
                f"{acc.distributed_type.value} ({name} shards over GPUs; on CPU processes launch with "
                "--multi_gpu for data parallel)"
            )
    return acc


class _Run:
    """One training run's state: models, optimizer, data, and the step / loss history that
    a checkpoint saves and ``resume`` restores."""

    def __init__(self, cfg: TrainConfig):
        from baka.models.io import cast, load_checkpoint
        from baka.models.pipeline import build_module
        from baka.models.tokenizer import load_tokenizer

        self.cfg = cfg
        self.acc = acc = _accelerator(cfg)
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.ckpt = load_checkpoint(cfg.model)
        comps = self.ckpt.components()
        torch.manual_seed(cfg.seed)  # identical initialisation on every process
        # fp32 master weights whatever the file holds (fp16 checkpoints are the common case), as kohya
        # and ED2 do; mixed_precision decides the compute dtype
        comps = {c: cast(sd, torch.float32) for c, sd in comps.items()}
        unet = build_module("unet", self.ckpt.config, comps["unet"]).to(self.device)
        te = build_module("text_encoder", self.ckpt.config, comps["text_encoder"]).to(self.device)
        if not cfg.sdpa:  # kohya's default without --sdpa: plain attention
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
        if cfg.gradient_checkpointing:  # kohya: recompute activations in backward
            unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                te.gradient_checkpointing_enable()
        self.vae = build_module("vae", self.ckpt.config, comps["vae"]).to(self.device).requires_grad_(False)
        self.schedule = ddpm_schedule(self.ckpt.config.scheduler, cfg.zero_terminal_snr, self.device)
        te_layers = freeze_text_encoder(te, cfg)
        self.network, named = trainables(cfg, unet, te, te_layers, self.device)
        self.named, groups = param_groups(named, cfg)
        check_text_settings(cfg)
        self.mode = MODES.get(cfg.mode)
        if cfg.weighted_captions:
            self.mode = with_weighted_captions(self.mode, cfg.weighted_captions_emphasis)
        check_steps(cfg)
        denoiser = _Denoiser(
            unet,
            te,
            self.network,
            self.mode,
            cfg.clip_skip,
            cfg.cache_text_encoder_outputs,
        )
        self.model, self.opt = acc.prepare(denoiser, make_optimizer(cfg, groups))
        # stepped by hand once per optimizer step (accelerate's wrapper would step it once per process)
        self.lr_sched = make_lr_scheduler(cfg, self.opt.optimizer)
        self.weighting = cfg.loss_weighting
        self.ema = EMA(self.named, cfg.ema_decay) if cfg.ema_decay else None
        self.by_block = by_block(self.named)
        self.block_schedules = parse_schedules(cfg.block_dropout)
        self.ds = Dataset(cfg.dataset)
        d = cfg.dataset
        disk = Path(d.latent_cache_dir or cfg.out / "latent_cache") if d.cache_latents_to_disk else None
        self.cache = LatentCache(self.vae, d.cache_latents or d.cache_latents_to_disk, disk)
        self.n_batches = len(
            self.ds.epoch_batches(0, cfg.seed, self.world, self.rank, cfg.gradient_accumulation_steps)
        )
        if self.n_batches == 0:
            raise BakaError(f"dataset has too few batches for {self.world} processes")
        self.tok = load_tokenizer()
        self.ck_root = cfg.out / "checkpoints"
        self.step, self.losses, self.val_losses = 0, [], []
        self._epoch: dict[int, list] = {}
        self._empty: torch.Tensor | None = None
        self.logging = bool(acc.log_with)
        self.step_logs = StepLogs(self.n_batches)
        self.lr_names = lr_names(self.opt.param_groups)

    # -- state ---------------------------------------------------------------------------------------

    def resume(self) -> None:
        ck = checkpoint.latest(self.ck_root)
        if ck is None:
            raise BakaError(f"{self.ck_root}: no checkpoint to resume from")
        tensors, opt_state, state = checkpoint.load(ck)
        with torch.no_grad():
            for k, (p, _) in self.named.items():
                p.copy_(tensors[k])
        if self.ema is not None:
            self.ema.load(tensors)
        self.opt.load_state_dict(opt_state)
        self.step, self.losses = state["step"], state["losses"]
        # the saved groups already hold this step's LR; the schedule continues from the step
        self.lr_sched.last_epoch = self.step
        self.lr_sched._last_lr = [g["lr"] for g in self.opt.param_groups]  # type: ignore[attr-defined]
        self.val_losses = [tuple(v) for v in state["val_losses"]]

    def save_checkpoint(self) -> None:
        acc = self.acc
        acc.wait_for_everyone()
        if acc.is_main_process:
            tensors = {k: p.detach() for k, (p, _) in self.named.items()}
            if self.ema is not None:
                tensors.update(self.ema.tensors())
            state = {
                "step": self.step,
                "losses": self.losses,
                "val_losses": self.val_losses,
                "mode": self.cfg.mode,
            }
            checkpoint.save(self.ck_root, self.step, tensors, self.opt.state_dict(), state)
        acc.wait_for_everyone()

    # -- one step ------------------------------------------------------------------------------------

    def encode_ids(self, captions: list[str]) -> torch.Tensor:
        """The captions as the denoiser takes them (token ids; with the embedding's slots in that mode)."""
        return self.mode.tokens(
            self.network, self.tok, captions, self.device, chunks=self.cfg.max_token_length // 75
        )

    def draw(self, shape: torch.Size, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        return draw_noise(
            shape,
            gen,
            self.schedule.num_timesteps,
            cfg.noise_offset,
            self.device,
            (cfg.min_timestep, cfg.max_timestep),
        )

    def loss_of(
        self,
        latents: torch.Tensor,
        ids: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
    ):
        kw: dict[str, Any] = dict(
            v_prediction=self.cfg.v_prediction, weighting=self.weighting, sample_weights=sample_weights
        )
        below = self.cfg.caption_free_below_timestep
        if below:
            empty = self._empty_ids(len(ids))
            return caption_free_loss(self.model, latents, ids, empty, noise, t, self.schedule, below, **kw)
        return diffusion_loss(self.model, latents, ids, noise, t, self.schedule, **kw)

    def _empty_ids(self, n: int) -> torch.Tensor:
        """The empty caption's tokens, n rows (what caption dropout trains the unconditional branch on)."""
        if self._empty is None:
            self._empty = self.encode_ids([""])
        return self._empty.expand(n, *self._empty.shape[1:])

    def loss(self, latents: torch.Tensor, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.loss_of(latents, ids, *self.draw(latents.shape, gen))

    def batch(self) -> list:
        epoch, idx = divmod(self.step, self.n_batches)
        if epoch not in self._epoch:
            k = self.cfg.gradient_accumulation_steps
            self._epoch = {epoch: self.ds.epoch_batches(epoch, self.cfg.seed, self.world, self.rank, k)}
        return self._epoch[epoch][idx]

    def train_step(self) -> None:
        """One optimizer step; every random draw in it is seeded from (seed, step, rank)."""
        cfg, acc, step, rank = self.cfg, self.acc, self.step, self.rank
        items = self.batch()
        torch.manual_seed(_seed(cfg.seed, "step", step, rank))  # dropout masks
        gen = torch.Generator().manual_seed(_seed(cfg.seed, "noise", step, rank))
        resting = resting_blocks(self.block_schedules, step, cfg.seed)
        if isinstance(self.network, LoRANetwork):
            for m in self.network.lora.values():
                m.resting = m.block in resting
        self.model.train()
        latents = self.cache.get(items, self.device, augments_for(items, cfg.seed, step, rank))
        ids = self.encode_ids(captions_for(items, cfg.seed, step, rank))
        # kohya: regularisation images count prior_loss_weight times; EveryDream2: loss_scale.txt
        w = [(cfg.prior_loss_weight if it.subset.is_reg else 1.0) * it.options.loss_scale for it in items]
        weights = torch.tensor(w, device=self.device) if any(x != 1.0 for x in w) else None
        # noise and t for the whole step's batch at once, so accumulating k micro-batches of b draws
        # what one batch of k b draws; each micro-batch's mean loss weighted by its share of the batch
        noise, t = self.draw(latents.shape, gen)
        bs, n = cfg.dataset.batch_size if cfg.dataset else len(items), len(items)
        loss = torch.zeros((), device=self.device)
        for i in range(0, n, bs):
            part = slice(i, i + bs)
            sync = contextlib.nullcontext() if i + bs >= n or self.world == 1 else acc.no_sync(self.model)
            share = min(bs, n - i) / n
            with sync:
                micro = self.loss_of(
                    latents[part], ids[part], noise[part], t[part], None if weights is None else weights[part]
                )
                acc.backward(micro * share)
            loss = loss + micro.detach() * share
        if acc.sync_gradients and cfg.max_grad_norm:
            acc.clip_grad_norm_([p for p, _ in self.named.values()], cfg.max_grad_norm)
        for b in resting:  # a resting block gets no optimizer update at all (not even momentum)
            for p in self.by_block[b]:
                p.grad = None
        self.opt.step()
        self.lr_sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        self.losses.append(acc.gather(loss.detach()[None]).mean().item())

    @torch.no_grad()
    def validate(self) -> float | None:
        if not self.ds.val:
            return None
        self.model.eval()
        total = []
        for i, it in enumerate(self.ds.val):
            lat = self.cache.get([it], self.device)
            ids = self.encode_ids([it.caption])
            total.append(
                self.loss(lat, ids, torch.Generator().manual_seed(_seed(self.cfg.seed, "val", i))).item()
            )
        return sum(total) / len(total)

    def samples(self, epoch: int | None = None) -> None:
        model = self.acc.unwrap_model(self.model)
        written = save_samples(self.cfg, model, self.vae, self.ckpt.config, self.step, epoch)
        if self.logging:
            self.log_images(written)

    def log_images(self, paths: list[Path]) -> None:
        """The sample images to the trackers that take images (TensorBoard: samples/NN at this step)."""
        import numpy as np
        from PIL import Image

        images = {}
        for i, p in enumerate(paths):
            with Image.open(p) as im:
                images[f"samples/{i:02d}"] = np.asarray(im.convert("RGB"))[None]
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images(images, step=self.step, dataformats="NHWC")

    def after_step(self) -> None:
        """Validation, samples and checkpoint, each every so many steps."""
        cfg, step = self.cfg, self.step
        epoch, rest = divmod(step, self.n_batches)
        if self.logging:
            lrs = [float(g["lr"]) for g in self.opt.param_groups]
            self.acc.log(self.step_logs.step(self.losses[-1], lrs, self.lr_names), step=step)
            if rest == 0:  # kohya: the epoch's mean loss at step = epoch
                self.acc.log({"loss/epoch": sum(self.losses[-self.n_batches :]) / self.n_batches}, step=epoch)
        if cfg.validate_every and step % cfg.validate_every == 0:
            v = self.validate()
            if v is not None:
                self.val_losses.append((step, v))
                if self.logging:
                    self.acc.log({"loss/validation": v}, step=step)
        if cfg.sample_prompts and self.acc.is_main_process:
            # kohya: per-epoch sampling, when set, replaces per-step sampling
            if cfg.sample_every_n_epochs:
                if rest == 0 and epoch % cfg.sample_every_n_epochs == 0:
                    self.samples(epoch)
            elif (every := cfg.sample_every_n_steps or cfg.sample_every) and step % every == 0:
                self.samples()
        if cfg.save_every and step % cfg.save_every == 0:
            self.save_checkpoint()
        # kohya's periodic outputs: loadable files named output_name-stepNNNNNNNN / output_name-NNNNNN
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < cfg.max_steps:
            self.save_named(f"{cfg.output_name}-step{step:08d}")
        if (
            cfg.save_every_n_epochs
            and rest == 0
            and epoch % cfg.save_every_n_epochs == 0
            and step < cfg.max_steps
        ):
            self.save_named(f"{cfg.output_name}-{epoch:06d}")

    def save_named(self, name: str) -> Path | None:
        """The output as it is now, under another name (main process)."""
        import dataclasses

        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            cfg = dataclasses.replace(self.cfg, output_name=name)
            path = save_output(cfg, self.acc.unwrap_model(self.model), self.ckpt, self.ds, self.step, 0.0)
        self.acc.wait_for_everyone()
        return path

    # -- the end -------------------------------------------------------------------------------------

    def finish(self, seconds: float) -> Path | None:
        """The outputs (main process only): the model (EMA weights if on), the report, samples."""
        output = None
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if self.ema is not None:  # outputs carry the EMA weights
                self.ema.copy_to_params()
            output = save_output(
                self.cfg, self.acc.unwrap_model(self.model), self.ckpt, self.ds, self.step, seconds
            )
            write_report(self.cfg.out, self.losses, self.val_losses)
            if self.cfg.sample_prompts:
                self.samples()
        self.acc.wait_for_everyone()
        if self.logging:
            self.acc.end_training()
        return output


def train(
    cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True
) -> TrainResult:
    """Train per ``cfg``; ``resume`` continues from the latest checkpoint in ``output_dir``.
    ``stop_after`` ends the run after that many steps of this call without final outputs (tests)."""
    run = _Run(cfg)
    if resume:
        run.resume()
    if run.logging:
        import dataclasses

        settings = None
        if cfg.log_config:  # scalars only (TensorBoard's hyperparameters)
            scalar = (int, float, str, bool)
            settings = {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, scalar)}
        run.acc.init_trackers(cfg.log_tracker_name or DEFAULT_TRACKER_NAME.get(cfg.mode, "train"), settings)
    if run.acc.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
    target = cfg.max_steps if stop_after is None else min(cfg.max_steps, run.step + stop_after)
    show = progress and run.acc.is_main_process
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", disable=not show)
    t0 = time.time()
    if cfg.sample_at_first and cfg.sample_prompts and run.step == 0 and run.acc.is_main_process:
        run.samples()  # kohya's sample_at_first: the model before its first step
    while run.step < target:
        run.train_step()
        bar.update()
        bar.set_postfix(loss=f"{run.losses[-1]:.4f}", lr=f"{run.lr_sched.get_last_lr()[0]:.2e}")
        run.after_step()
    bar.close()
    if stop_after is not None and run.step < cfg.max_steps:
        return TrainResult(None, run.step, run.losses, run.val_losses)
    output = run.finish(time.time() - t0)
    return TrainResult(output, run.step, run.losses, run.val_losses)
