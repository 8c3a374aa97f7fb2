"""ESD: fine-tune the UNet so that its conditional prediction for a concept c matches a negatively
guided target from the frozen original e*:

    target = e*(x_t, t) - eta * (e*(x_t, c, t) - e*(x_t, t)),   loss = || e_theta(x_t, c, t) - target ||^2

x_t is reached by sampling k DDIM steps from pure noise with the model being edited (guided towards c,
k drawn uniformly below ``ddim_steps``), and t is that latent's own timestep: the scheduler's
``timesteps[k]``, the noise level the k-th step left it at (:func:`partial_sample`). Parameter sets
(:data:`ERASE_METHODS`) follow the original ``train_method`` definitions on the LDM parameter names
(``model.diffusion_model.`` stripped): ``xattn`` (ESD-x), ``noxattn`` (ESD-u), ``selfattn``, ``full``,
``notime``, ``xlayer``, ``selflayer``, and the 2025 release's ``esd-x-strict``. Settings: the paper's
(1000 iterations, lr 1e-5, eta 1) are the defaults; :data:`PRESETS` holds the 2025 release's.

Not in ESD: ``preserve`` prompts add a retain term, ``preserve_weight * || e_theta(y_s, p, s) -
e*(y_s, p, s) ||^2`` averaged over every preserved prompt p (or ``preserve_batch`` of them drawn at
random) each iteration, where y_s is a step (drawn per prompt and iteration) of the original model's
own guided DDIM run of p (one seeded run per prompt, computed once: :func:`preserved_trajectories`).
It holds the edited model to the original where the preserved prompts' images are made (the anchor /
retain-set regularisers of later erasure work, e.g. Kumari et al. 2023, "Ablating Concepts").

With ``network_dim`` the method's layers are not edited: a kohya LoRA on them is trained instead (LECO's
way, p1atdev/LECO) and written as a LoRA file, used as ``<lora:NAME:1>``. The original's predictions then
come from the same UNet with the LoRA switched off, so no second copy is held in memory.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from baka.errors import BakaError
from baka.merge.lora.common import lora_metadata, save_precision
from baka.registry import Registry

ParamFilter = Callable[[str], bool]  # LDM UNet parameter name (no model.diffusion_model.) -> trains?
ERASE_METHODS: Registry[ParamFilter] = Registry("erase method")


def _is_out_or_time(name: str) -> bool:
    return name.startswith("out.") or "time_embed" in name


@ERASE_METHODS.register("ESD-x", aliases=("xattn", "esd-x", "esd_x"))
def esd_x(name: str) -> bool:
    """Cross-attention parameters (attn2.*): erases the concept tied to its prompt words."""
    return "attn2" in name


@ERASE_METHODS.register("ESD-u", aliases=("noxattn", "esd-u", "esd_u"))
def esd_u(name: str) -> bool:
    """Every UNet parameter except cross-attention, the time embedding and the output layers (out.*):
    erases the concept globally."""
    return not (_is_out_or_time(name) or "attn2" in name)


@ERASE_METHODS.register("ESD-x-strict", aliases=("xattn-strict", "esd-x-strict", "esd_x_strict"))
def esd_x_strict(name: str) -> bool:
    """Only the cross-attention key and value projections."""
    return "attn2.to_k" in name or "attn2.to_v" in name


@ERASE_METHODS.register("selfattn")
def esd_selfattn(name: str) -> bool:
    """Self-attention parameters (attn1.*)."""
    return "attn1" in name


@ERASE_METHODS.register("full", aliases=("esd-all",))
def esd_full(name: str) -> bool:
    """Every UNet parameter."""
    return True


@ERASE_METHODS.register("notime")
def esd_notime(name: str) -> bool:
    """Every UNet parameter except the time embedding and the output layers."""
    return not _is_out_or_time(name)


@ERASE_METHODS.register("xlayer")
def esd_xlayer(name: str) -> bool:
    """Cross-attention of two decoder blocks only (output_blocks 6 and 8)."""
    return "attn2" in name and ("output_blocks.6." in name or "output_blocks.8." in name)


@ERASE_METHODS.register("selflayer")
def esd_selflayer(name: str) -> bool:
    """Self-attention of two encoder blocks only (input_blocks 4 and 7)."""
    return "attn1" in name and ("input_blocks.4." in name or "input_blocks.7." in name)


@dataclass
class EraseConfig:
    concept: str
    method: str = "ESD-x"
    eta: float = 1.0  # negative guidance
    iterations: int = 1000
    lr: float = 1e-5
    ddim_steps: int = 50
    start_guidance: float = 3.0  # CFG used while sampling x_t
    seed: int = 0
    size: int | None = None  # image size for x_t; default the model's native size
    # the paper samples x_t with the model being edited; the 2025 release with the frozen original
    sample_with_original: bool = False
    # the original train-esd.py's --seperator: the concept is several prompts, one drawn per iteration
    separator: str | None = None
    # prompts kept as the original draws them (split at ``separator`` like the concept); none: plain ESD
    preserve: str | None = None
    preserve_weight: float = 1.0
    # preserved prompts in each iteration's retain batch (default all; fewer bound memory on 512px models)
    preserve_batch: int | None = None

    # train a kohya LoRA of this rank (alpha = rank: scale 1) on the method's layers instead of the
    # weights (None: edit the weights)
    network_dim: int | None = None
    conv_dim: int = 0  # rank on the 3x3 convs (ESD-u's resnet and sampler convs); 0: those keep no module
    save_precision: str = "float"  # the LoRA file's dtype, kohya's names: float (fp32), fp16, bf16

    def __post_init__(self) -> None:
        if self.preserve_batch is not None and self.preserve_batch < 1:
            raise BakaError(f"preserve_batch must be at least 1, got {self.preserve_batch}")
        if self.network_dim is not None and self.network_dim < 1:
            raise BakaError(f"network_dim must be at least 1, got {self.network_dim}")
        if self.conv_dim and self.network_dim is None:
            raise BakaError("conv_dim is a LoRA rank: it needs network_dim")
        if self.conv_dim < 0:
            raise BakaError(f"conv_dim must be 0 or more, got {self.conv_dim}")
        save_precision(self.save_precision)

    def prompts(self) -> list[str]:
        """The concept's prompts: split at ``separator`` (empty pieces dropped), or the whole."""
        return self._split(self.concept, "concept")

    def preserved(self) -> list[str]:
        """The preserved prompts (none without ``preserve``)."""
        return self._split(self.preserve, "preserve") if self.preserve is not None else []

    def _split(self, text: str, what: str) -> list[str]:
        if not self.separator:
            return [text]
        words = [w.strip() for w in text.split(self.separator) if w.strip()]
        if not words:
            raise BakaError(f"{what} {text!r} has no prompt between its {self.separator!r}")
        return words


# named settings: the paper's (the defaults above) and the 2025 release's esd_sd.py defaults
# (rohitgandikota/erasing, esd_sd.py: iterations 200, lr 5e-5, negative_guidance 2, guidance_scale 3,
# 50 inference steps, x_t sampled with the base UNet)
PRESETS: Registry[dict] = Registry("ESD preset")
PRESETS.add("paper", {"iterations": 1000, "lr": 1e-5, "eta": 1.0, "start_guidance": 3.0, "ddim_steps": 50})
PRESETS.add(
    "esd-2025",
    {
        "iterations": 200,
        "lr": 5e-5,
        "eta": 2.0,
        "start_guidance": 3.0,
        "ddim_steps": 50,
        "sample_with_original": True,
    },
    aliases=("2025",),
)


def guided_step(unet, sched, x, step_t, emb_0: torch.Tensor, emb_c: torch.Tensor, guidance: float):
    """One DDIM step from ``x`` at ``step_t`` guided towards ``emb_c`` (a batch of prompts for a batch
    of latents, one empty prompt for all); returns the next latent and the conditional prediction."""
    e = unet(torch.cat([x, x]), step_t, torch.cat([emb_0.expand(len(emb_c), -1, -1), emb_c])).sample
    e0, ec = e.chunk(2)
    return sched.step(e0 + guidance * (ec - e0), step_t, x).prev_sample, ec


def partial_sample(
    unet, sched, x: torch.Tensor, k: int, emb_0: torch.Tensor, emb_c: torch.Tensor, guidance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` DDIM steps from ``x`` (pure noise at ``sched.timesteps[0]``), guided towards ``emb_c``;
    returns the latent and its own timestep ``sched.timesteps[k]``, the noise level those steps left
    it at (the step from timesteps[i] lands on timesteps[i + 1])."""
    for step_t in sched.timesteps[:k]:
        x = guided_step(unet, sched, x, step_t, emb_0, emb_c, guidance)[0]
    return x, sched.timesteps[k : k + 1].clone()


def preserved_trajectories(
    frozen, sched, kept: torch.Tensor, emb_0: torch.Tensor, guidance: float, gen: torch.Generator, size: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The original model's own guided DDIM run for each preserved prompt (one seeded noise each):
    per step the latents ``[P, C, h, w]``, the timestep and the original's conditional predictions,
    the retain term's inputs and targets."""
    x = torch.randn(len(kept), frozen.config.in_channels, size, size, generator=gen)
    out = []
    with torch.no_grad():
        for step_t in sched.timesteps:
            x_next, ec = guided_step(frozen, sched, x, step_t, emb_0, kept, guidance)
            out.append((x, step_t, ec))
            x = x_next
    return out


def retain_batch(
    traj, kept: torch.Tensor, gen: torch.Generator, batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The retain term's batch: every preserved prompt (or ``batch`` of them drawn at random), each at
    a step of its run drawn at random: latents ``[B, C, h, w]``, timesteps ``[B]``, the prompts'
    embeddings and the original's predictions there."""
    n = len(kept)
    rows = torch.randperm(n, generator=gen)[:batch].tolist() if batch and batch < n else list(range(n))
    steps = torch.randint(len(traj), (len(rows),), generator=gen).tolist()
    x = torch.stack([traj[i][0][j] for j, i in zip(rows, steps, strict=True)])
    t = torch.stack([traj[i][1] for i in steps]).reshape(len(rows))
    anchor = torch.stack([traj[i][2][j] for j, i in zip(rows, steps, strict=True)])
    return x, t, kept[rows], anchor


def erase(
    model: str | Path,
    cfg: EraseConfig,
    output: str | Path,
    *,
    delta_only: bool = False,
    progress: bool = True,
) -> Path:
    """Erase ``cfg.concept`` from ``model``; write a full checkpoint, only the changed tensors
    (``delta_only``), or with ``cfg.network_dim`` the trained LoRA."""
    from diffusers import DDIMScheduler

    from baka.generate.conditioning import PromptEncoder
    from baka.models.io import load_checkpoint, save_checkpoint
    from baka.models.keymap import UNET_PREFIX, unet_key_to_ldm
    from baka.models.pipeline import load_modules, save_modules

    keep = ERASE_METHODS.get(cfg.method)
    if delta_only and cfg.network_dim is not None:
        raise BakaError("delta_only writes edited weights; a LoRA (network_dim) is its own file")
    ckpt = load_checkpoint(model)
    # fp32 weights to edit whatever the file holds (Adam on fp16 weights loses the small updates)
    mods = load_modules(ckpt, ("unet", "text_encoder"), dtype=torch.float32)
    unet, te = mods["unet"], mods["text_encoder"].requires_grad_(False)
    unet.requires_grad_(False)
    net = None
    if cfg.network_dim is None:
        frozen = copy.deepcopy(unet)
        params = {n: p for n, p in unet.named_parameters() if keep(unet_key_to_ldm(n))}
    else:
        net = lora_network(unet, cfg, keep)
        frozen = WithoutLoRA(unet, net)
        params = dict(net.named_parameters())
    if not params:
        raise BakaError(f"{cfg.method}: selects no parameters")
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    enc = PromptEncoder(te)

    def encode(text: str) -> torch.Tensor:  # the first 75-token chunk, as the original's single pass
        return enc.encode_chunks(enc.chunks(text)[:1])

    with torch.no_grad():
        embs = [encode(c) for c in cfg.prompts()]
        preserved = cfg.preserved()
        kept = torch.cat([encode(c) for c in preserved]) if preserved else None
        emb_0 = encode("")
    sched = DDIMScheduler.from_config(ckpt.config.scheduler)
    sched.set_timesteps(cfg.ddim_steps)
    size = (cfg.size or 8 * unet.config.sample_size) // 8
    gen = torch.Generator().manual_seed(cfg.seed)
    # its own generator: the concept, k and noise draws are plain ESD's
    keep_gen = torch.Generator().manual_seed(cfg.seed + 1)
    traj = (
        preserved_trajectories(frozen, sched, kept, emb_0, cfg.start_guidance, keep_gen, size)
        if kept is not None
        else []
    )
    unet.train()
    for _ in tqdm(range(cfg.iterations), desc=f"erase {cfg.method}", disable=not progress):
        # one prompt per iteration (drawn only when there are several: one prompt keeps the old stream)
        emb_c = embs[int(torch.randint(len(embs), (1,), generator=gen))] if len(embs) > 1 else embs[0]
        k = int(torch.randint(cfg.ddim_steps, (1,), generator=gen))
        x = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
        with torch.no_grad():  # x_t: k DDIM steps with the model being edited, guided towards c
            sampler = frozen if cfg.sample_with_original else unet
            x, t = partial_sample(sampler, sched, x, k, emb_0, emb_c, cfg.start_guidance)
            e0 = frozen(x, t, emb_0).sample
            ec = frozen(x, t, emb_c).sample
            target = e0 - cfg.eta * (ec - e0)
        loss = torch.nn.functional.mse_loss(unet(x, t, emb_c).sample, target)
        if kept is not None:  # every preserved prompt, each at a step of the original's own run of it
            x_p, t_p, emb_p, anchor = retain_batch(traj, kept, keep_gen, cfg.preserve_batch)
            pred = unet(x_p, t_p, emb_p).sample
            loss = loss + cfg.preserve_weight * torch.nn.functional.mse_loss(pred, anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval()
    meta = {"baka_erase": json.dumps({**asdict(cfg), "base_model": Path(model).name}, sort_keys=True)}
    if net is not None:  # a kohya LoRA file, with the metadata baka's LoRA tools write
        from baka.models.safetensors_io import save_file

        sd = net.kohya_state_dict(save_precision(cfg.save_precision))
        tool = {"tool": "erase"}  # the settings are in baka_erase
        meta |= lora_metadata(Path(output).stem, net.cfg.dim, net.cfg.conv_dim, tool, sd)
        return save_file(sd, output, meta, protect=[model])
    if delta_only:
        changed = {UNET_PREFIX + unet_key_to_ldm(n): p.detach().clone() for n, p in params.items()}
        return save_checkpoint(changed, output, metadata=meta, protect=[model])
    return save_modules(ckpt, {"unet": unet}, output, metadata=meta, protect=[model])


def lora_network(unet: torch.nn.Module, cfg: EraseConfig, keep: ParamFilter):
    """A kohya LoRA (LoCon with ``conv_dim``; alpha = rank) on the UNet layers whose weight ``keep``
    selects."""
    from baka.models.keymap import unet_key_to_ldm
    from baka.train.config import NetworkConfig
    from baka.train.network import LoRANetwork

    dim, conv = cfg.network_dim or 1, cfg.conv_dim
    ncfg = NetworkConfig(dim=dim, alpha=float(dim), conv_dim=conv, conv_alpha=float(conv))
    with torch.random.fork_rng():  # the down matrices' random start, from the run's seed
        torch.manual_seed(cfg.seed)
        return LoRANetwork(unet, None, ncfg, keep=lambda name: keep(unet_key_to_ldm(name + ".weight")))


class WithoutLoRA:
    """``unet`` called with every module of ``net`` switched off: the original model, for ESD's
    targets, without a second copy of the UNet."""

    def __init__(self, unet: torch.nn.Module, net: torch.nn.Module):
        self.unet, self.modules = unet, list(net.lora.values())
        self.config = unet.config

    def __call__(self, *args, **kwargs):
        for m in self.modules:
            m.resting = True
        try:
            return self.unet(*args, **kwargs)
        finally:
            for m in self.modules:
                m.resting = False
