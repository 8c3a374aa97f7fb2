"""ESD: fine-tune the UNet so that its conditional prediction for a concept c matches a negatively
guided target from the frozen original e*:

    target = e*(x_t, t) - eta * (e*(x_t, c, t) - e*(x_t, t)),   loss = || e_theta(x_t, c, t) - target ||^2

x_t is reached by sampling partway with the model being trained (DDIM, a random number of steps,
guided towards c), and t is drawn inside that DDIM step's window of the 1000 training timesteps.
Parameter sets: ESD-x = cross-attention (attn2), ESD-u = everything but attn2, ESD-x-strict = attn2
to_k / to_v only. Paper settings: 1000 iterations, batch 1, Adam, lr 1e-5, eta 1.
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
from baka.registry import Registry

ParamFilter = Callable[[str], bool]
ERASE_METHODS: Registry[ParamFilter] = Registry("erase method")


@ERASE_METHODS.register("ESD-x", aliases=("xattn", "esd_x"))
def esd_x(name: str) -> bool:
    """Cross-attention parameters (attn2.*): erases the concept tied to its prompt words."""
    return ".attn2." in name


@ERASE_METHODS.register("ESD-u", aliases=("noxattn", "esd_u"))
def esd_u(name: str) -> bool:
    """Every UNet parameter except cross-attention: erases the concept globally."""
    return ".attn2." not in name


@ERASE_METHODS.register("ESD-x-strict", aliases=("xattn-strict", "esd_x_strict"))
def esd_x_strict(name: str) -> bool:
    """Only the cross-attention key and value projections."""
    return ".attn2.to_k." in name or ".attn2.to_v." in name


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


def erase(
    model: str | Path,
    cfg: EraseConfig,
    output: str | Path,
    *,
    delta_only: bool = False,
    progress: bool = True,
) -> Path:
    """Erase ``cfg.concept`` from ``model``; write a full checkpoint, or only the changed tensors."""
    from diffusers import DDIMScheduler

    from baka.generate.conditioning import PromptEncoder
    from baka.models.io import load_checkpoint, save_checkpoint
    from baka.models.keymap import UNET_PREFIX, unet_key_to_ldm
    from baka.models.pipeline import load_modules, save_modules

    keep = ERASE_METHODS.get(cfg.method)
    ckpt = load_checkpoint(model)
    mods = load_modules(ckpt, ("unet", "text_encoder"))
    unet, te = mods["unet"], mods["text_encoder"].requires_grad_(False)
    frozen = copy.deepcopy(unet).requires_grad_(False)
    unet.requires_grad_(False)
    params = {n: p for n, p in unet.named_parameters() if keep(n)}
    if not params:
        raise BakaError(f"{cfg.method}: selects no parameters")
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    enc = PromptEncoder(te)
    with torch.no_grad():
        emb_c = enc.encode_chunks(enc.chunks(cfg.concept)[:1])
        emb_0 = enc.encode_chunks(enc.chunks("")[:1])
    sched = DDIMScheduler.from_config(ckpt.config.scheduler)
    sched.set_timesteps(cfg.ddim_steps)
    n_train = sched.config.num_train_timesteps
    size = (cfg.size or 8 * unet.config.sample_size) // 8
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    for _ in tqdm(range(cfg.iterations), desc=f"erase {cfg.method}", disable=not progress):
        k = int(torch.randint(cfg.ddim_steps, (1,), generator=gen))
        lo, hi = round(k / cfg.ddim_steps * n_train), round((k + 1) / cfg.ddim_steps * n_train)
        t = torch.randint(lo, max(hi, lo + 1), (1,), generator=gen)
        x = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
        with torch.no_grad():  # x_t: k DDIM steps with the model being edited, guided towards c
            for step_t in sched.timesteps[:k]:
                e = unet(torch.cat([x, x]), step_t, torch.cat([emb_0, emb_c])).sample
                e0, ec = e.chunk(2)
                x = sched.step(e0 + cfg.start_guidance * (ec - e0), step_t, x).prev_sample
            e0 = frozen(x, t, emb_0).sample
            ec = frozen(x, t, emb_c).sample
            target = e0 - cfg.eta * (ec - e0)
        loss = torch.nn.functional.mse_loss(unet(x, t, emb_c).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval()
    meta = {"baka_erase": json.dumps({**asdict(cfg), "base_model": Path(model).name}, sort_keys=True)}
    if delta_only:
        changed = {UNET_PREFIX + unet_key_to_ldm(n): p.detach().clone() for n, p in params.items()}
        return save_checkpoint(changed, output, metadata=meta, protect=[model])
    return save_modules(ckpt, {"unet": unet}, output, metadata=meta, protect=[model])
