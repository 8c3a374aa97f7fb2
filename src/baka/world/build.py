"""Reproduce the shipped shapes-world models from nothing: ``make world`` (or ``python -m baka.world.build``).

Stages (each skipped when its output exists, so an interrupted build continues):

1. render the training sets (``flat`` and ``striped``, held-out combinations excluded);
2. train the VAE as a plain autoencoder on both styles (:func:`train_vae`), then rescale its latent
   space so SD1.x's fixed ``scaling_factor`` (0.18215) gives unit-variance, zero-mean latents; a last
   phase fits the decoder alone to colours faded towards their background (``(red:0.6)`` must decode
   as a paler red, not snap back onto the palette);
3. pretrain the text encoder on the captions (:func:`pretrain_text_encoder`: its end and padding tokens
   learn to say what the caption means; a second phase adds partial captions), then assemble
   ``init.safetensors``: random UNet (seeded), that text encoder, the trained VAE;
4. ``baka train`` (``mode = "full"``, the UNet) trains ``world-flat-base`` from it (epsilon loss, min-SNR
   plus kohya's ``v_pred_like_loss`` so the high-noise steps count, cosine LR), then ``world-flat-cf``
   from that with ``caption_free_below_timestep`` (the captioned and uncaptioned predictions agree on
   the low-noise steps, so CFG 7 no longer bends the shapes there), ``world-flat-weighted`` on the
   ``weighted`` set (colour words weighted in A1111 syntax, the colour faded below 1; kohya's
   ``weighted_captions``: A1111 emphasis) and ``world-flat``, caption-free again on that set;
   ``world-striped`` and ``world-vpred-ztsnr`` are fine-tuned from ``world-flat``, with the same setting;
5. ``baka train`` (``mode = "lora"``) teaches ``world-flat`` the unseen star from 40 images
   (``world-star``, UNet + text encoder LoRA), and (``mode = "embedding"``) learns ``world-azure``, a
   textual-inversion vector for the colour blue;
6. ``baka erase`` (ESD-x, one of 16 red training captions per iteration) erases "red" from
   ``world-flat``; ``baka lora extract`` turns the edit into the LoRA ``world-no-red`` (:func:`erase_stage`);
   ``baka erase --network-dim`` trains ESD-u on the same captions as the LoRA ``world-no-red-u``, a retain
   term holding the other colours (:func:`erase_u_stage`, one thread);
7. fp16 copies with modelspec metadata and a model card go to ``src/baka/world/weights`` (the LoRAs to
   ``weights/lora``, the embedding to ``weights/embeddings``).

Every stage after ``world-flat`` starts from its fp16 copy, the tensors the package ships, so
``--from-shipped`` reproduces stages 4 (striped, v-prediction) to 6 from the installed ``world-flat``
alone, without the hour before it; a from-scratch build gives the same tensors.

Thread count: ``BAKA_WORLD_THREADS`` (default 2, the build machine's cores). On an otherwise idle
2-core machine two threads are twice as fast as one; when other jobs share the cores, 1 is much faster.
Weights are reproducible for a fixed thread count (the CPU kernels' reduction order depends on it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
SCALING_FACTOR = 0.18215  # SD1.x's, read by every tool from the config; the latent space is fitted to it

# stage sizes (the shipped figures; see docs/world.md)
N_FLAT = 4000
N_STRIPED = 2000
VAE_STEPS = 700
VAE_BATCH = 16
# phase 1 on random 32x32 crops (4x cheaper per image; the autoencoder is convolutional), phase 2 on
# whole images with shape pixels weighted, so shape colours come out right and not only the background
# phase 3 (build 9) trains the decoder alone, half the images faded towards their background: phase 2's
# decoder snaps colours between the palette's back onto it (a red circle on grey faded to 0.5 decodes at
# 0.78 of red), so no UNet could draw `(red:0.6)`; the encoder, hence the latent space, is untouched
# (docs/world.md, "Build 9")
VAE_PHASES: tuple[dict, ...] = (
    {"steps": 3000, "lr": 2e-3, "fg_weight": 0.0, "batch": 32, "crop": 32},
    {"steps": 400, "lr": 1e-3, "fg_weight": 4.0, "batch": 16},
    {"steps": 1500, "lr": 5e-4, "fg_weight": 4.0, "batch": 16, "decoder_only": True, "fade": 0.5},
)
TE_STEPS = 300
# text encoder pretraining: whole captions first (the binding of words in order), then a share of
# partial captions (single tags and words: what negative prompts and ESD name), from the first phase
TE_PHASES = ({"steps": 300, "lr": 3e-3, "whole": 1.0}, {"steps": 300, "lr": 2e-3, "whole": 0.5})
# attention only: the encoder's MLPs stay at the identity start (fc2 zero), so a token's state mixes
# the earlier tokens' states by attention alone. With trained MLPs (builds 4-6) the
# end state of a held-out pair's caption ("green triangle, ...") reads as a seen pair's (a linear probe:
# triangle 0-39% by layer); with attention only it reads right at every layer (docs/world.md, "Build 7",
# the shipped weights).
TE_ATTENTION_ONLY = True
FLAT_STEPS = 5000
# world-flat's second run (docs/world.md, "Shapes at CFG 7"): below t = 300 (sigma ~0.7, the last ~7 of
# 20 DPM++ 2M Karras steps) the caption is dropped and the captioned prediction pulled to the uncaptioned
# one, so CFG's 7x their difference has nothing to bend there; striped and v-prediction keep the setting
# through their fine-tunes. Build 6 used t = 478: with the attention-only encoder that cost the held-out
# pairs' shape (87% -> 72%; below T the uncaptioned model rounds a half-formed green triangle off to a
# seen green shape), t = 300 keeps it at 80% (full suite, CFG 7; docs/world.md, "Build 7")
CF_STEPS = 2000
CF_BELOW = 300
# v-prediction goes caption-free below t = 700: its white background is lost to guidance on the steps
# between ("white background" at CFG 7, 24 seeds: t = 300 0.882, 478 0.901, 600 0.879, 700 0.933, on
# build 7's world-flat; the price is the v-prediction model's own shapes, full suite 67% -> 54%;
# docs/world.md, "Build 8")
VPRED_CF_BELOW = 700
# world-flat's emphasis (issue #10's "(red:1.4) vs (red:0.6) moves colour"): the flat scenes
# again, in EMPH_SHARE of the one-shape ones the colour word weighted (A1111 syntax), the colour faded
# towards the background by the weight below 1 (above 1 left as it is: the palette colour cannot be
# more itself); kohya's weighted_captions scales the word's state by it. Build 8's world-flat read its
# colour from the padding states, which emphasis never touches (docs/world.md, "Build 9").
# Two more runs after the caption-free one: EMPH_STEPS at LR 1e-3 without the caption-free setting
# (with it, 800-2000 steps learnt next to nothing), then the caption-free stage again on the weighted
# set, which gives back the shapes at CFG 7 that the first costs
EMPH_FADED = (0.5, 0.6, 0.7, 0.8, 0.9)
EMPH_ABOVE = (1.1, 1.2, 1.3, 1.4, 1.5)
EMPH_SHARE = 0.5
EMPH_SEED = 13
EMPH_STEPS = 3000
WEIGHTED_KEYS = {"weighted_captions": "true", "weighted_captions_emphasis": '"No norm"'}
STRIPED_STEPS = 600
# build 9: from its world-flat, 1200 steps drew "white background" yellow on 8 of 24 seeds (white
# 0.897); 2000 draw it white on 23 (0.937; docs/world.md, "Build 9")
VPRED_STEPS = 2000
# min-SNR 5 alone weighs an x0 error at t ~ 900 some 500x less than at t ~ 300, yet the high-noise steps
# decide background, colour and layout; kohya's v_pred_like_loss adds a v-like term (x0 weight SNR + 1)
EPS_KEYS = {"v_pred_like_loss": 0.5, "lr_scheduler": '"cosine"', "lr_warmup_steps": 50}
VPRED_KEYS = {"lr_scheduler": '"cosine"', "lr_warmup_steps": 50}
CF_KEYS = {**EPS_KEYS, "caption_free_below_timestep": CF_BELOW}
VPRED_CF_KEYS = {**VPRED_KEYS, "caption_free_below_timestep": VPRED_CF_BELOW}
BATCH = 32
SEED = 0
# kohya's caption_tag_dropout_rate on the UNet's runs: a share of captions lose tags, so the UNet also
# learns what "red" or "circle, grey background" alone mean (negative prompts, ESD name single tags)
TAG_DROPOUT = 0.15
# the star LoRA (issue #10's "teach the unseen star from <= 40 images"): kohya-style LoCon on UNet and
# text encoder, trained with baka train on the built world-flat. The resnet / sampler convs matter: on
# build 5's world-flat, linear layers alone gave 67% stars (a higher text-encoder LR 46%), LoCon conv
# dim 16 83%, conv dim 8 88%; on build 9's world-flat 2000 steps gave 79%, 3000 83%
STAR_IMAGES = 40
STAR_SEED = 7
STAR_STEPS = 3000
STAR_NETWORK = {"dim": 16, "alpha": 16, "conv_dim": 8, "conv_alpha": 8}
STAR_LORA = "world-star"
# the textual-inversion embedding: one vector learnt from 40 blue shapes whose captions say TI_WORD
# where the colour was; it starts from "*" (A1111's default), not from "blue"
TI_WORD = "world-azure"
TI_COLOR = "blue"
TI_IMAGES = 40
TI_SEED = 11
TI_STEPS = 1000
# ESD (Gandikota et al. 2023) erases "red" from world-flat: baka erase (ESD-x, the 2025 release's
# settings at a higher learning rate and more iterations: at 5e-5 nothing measurable moved on this small
# model), then baka lora extract turns the edit into a LoRA (every edited attn2 layer's input is 32 wide,
# so rank 32 is exact), shipped as ``<lora:world-no-red:1>``. The concept is given in context: this UNet
# reads a caption from its padding states, which the word alone does not move (erasing the word left
# whole red captions red, 24/24), so ESD draws one of ESD_PROMPTS per iteration (``--separator``, the
# original's ``--seperator``): the first 16 distinct one-shape red captions of the flat training set that
# are not eval-suite prompts (the claim is measured on the suite's red captions).
ESD_CONCEPT = "red"
ESD_PROMPTS = (
    "red circle, yellow background, medium, bottom",
    "red square, blue background, large, right",
    "red triangle, grey background, small, top",
    "red square, green background, small, left",
    "red triangle, blue background, small, bottom",
    "red square, black background, large, right",
    "red circle, grey background, large, right",
    "red square, blue background, medium, right",
    "red triangle, green background, medium, top",
    "red circle, blue background, large, left",
    "red circle, grey background, small, top",
    "red circle, grey background, large, center",
    "red circle, black background, medium, left",
    "red square, black background, small, left",
    "red square, blue background, medium, top",
    "red triangle, yellow background, medium, center",
)
# what ESD-u's retain term (baka erase --preserve) keeps: the first 4 distinct one-shape training captions
# of each other colour that name red nowhere and are not eval-suite prompts
ESD_PRESERVE = (
    "yellow circle, blue background, small, center",
    "yellow square, white background, small, right",
    "yellow square, black background, medium, right",
    "yellow triangle, green background, large, bottom",
    "blue square, green background, medium, left",
    "blue square, grey background, medium, bottom",
    "blue triangle, black background, large, top",
    "blue circle, white background, large, left",
    "purple circle, grey background, small, bottom",
    "purple circle, black background, small, bottom",
    "purple circle, green background, medium, left",
    "purple triangle, black background, medium, center",
    "green square, grey background, large, bottom",
    "green square, yellow background, medium, left",
    "green square, grey background, large, left",
    "green square, yellow background, medium, bottom",
    "orange triangle, green background, small, top",
    "orange square, green background, large, center",
    "orange square, yellow background, large, top",
    "orange square, black background, small, bottom",
)
ESD_LORA = "world-no-red"
ESD_ARGS = "--method ESD-x --preset esd-2025 --lr 2e-3 --iterations 400 --separator |".split()
# ESD-u (the issue names both) erases the same captions into a LoRA trained directly (baka erase
# --network-dim, LECO's way): extracting a full ESD-u edit as a LoRA lost the claim (rank 32: 33% of red
# captions still red) and the edit itself is ~7 MB. The retain term on ESD_PRESERVE at weight 4 holds the
# other colours (docs/world.md, "ESD-u with a retain term"). It runs on one thread whatever THREADS says:
# batch-1 ESD gains nothing from a second, and bench/world_esd.py's runs of the same command are one-thread
# runs, so its output is this stage's byte for byte.
ESD_U_LORA = "world-no-red-u"
ESD_U_ARGS = (
    "--method ESD-u --preset esd-2025 --lr 3e-3 --iterations 2000 --separator | --preserve-weight 4"
    " --network-dim 8 --conv-dim 8"
).split()
ESD_U_THREADS = "1"
THREADS = os.environ.get("BAKA_WORLD_THREADS", "2")
BASE = "world-flat-base"
# world-flat's caption-free run, then the two weighted-caption runs (build 9)
CF_RUN = "world-flat-cf"
WEIGHTED = "world-flat-weighted"
FLAT_CHAIN = (BASE, CF_RUN, WEIGHTED, "world-flat")  # every name a world-flat run can have; the last ships
EARLIER_RUNS = {BASE: "base", CF_RUN: "caption_free", WEIGHTED: "weighted"}  # world-flat card's keys for them
ONLY = {"flat": "world-flat", "striped": "world-striped", "vpred": "world-vpred-ztsnr"}  # --only: stop after


def world_config():
    """The SD1.x-topology config of the world models (exact SD1.5 LDM keys and 26 merge blocks)."""
    from baka.models.config import norm_groups, sd15_config

    cfg = sd15_config()
    # widths keep doubling to the last level: two channels per GroupNorm group (see norm_groups)
    unet, vae = [32, 48, 64, 96], [8, 16, 32, 64]  # ~12.6 MB per model in fp16
    cfg.unet.update(
        block_out_channels=unet, norm_num_groups=norm_groups(unet), cross_attention_dim=32, sample_size=8
    )
    cfg.vae.update(block_out_channels=vae, norm_num_groups=norm_groups(vae), sample_size=64)
    cfg.text_encoder.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
    return cfg


def _log(msg: str) -> None:
    print(f"[world build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_sets(out: Path, weighted: bool = True) -> dict[str, Path]:
    """The training sets' folders, rendered where missing; ``weighted=False`` (``--from-shipped``, whose
    stages never read it) names the weighted set's folder without rendering it."""
    from baka.world.render import render_folder

    sets = {  # folder -> (images, seed, style, split)
        "flat": (N_FLAT, 0, "flat", "train"),
        "striped": (N_STRIPED, 1, "striped", "train"),
        "star": (STAR_IMAGES, STAR_SEED, "flat", "star"),
        TI_WORD: (TI_IMAGES, TI_SEED, "flat", "train"),
    }
    # the embedding's images: single blue shapes, TI_WORD in the colour's place in the caption
    only = {TI_WORD: lambda sc: len(sc.shapes) == 1 and sc.shapes[0].color == TI_COLOR}
    word = {TI_WORD: lambda sc: sc.caption.replace(TI_COLOR, TI_WORD, 1)}
    paths = {"weighted": out / "data" / "weighted"}
    if weighted and not (paths["weighted"] / f"{N_FLAT - 1:05d}.txt").exists():
        _log(f"render {N_FLAT} weighted-caption images -> {paths['weighted']}")
        render_weighted(paths["weighted"])
    for name, (n, seed, style, split) in sets.items():
        d = out / "data" / name
        paths[name] = d
        if (d / f"{n - 1:05d}.txt").exists():
            continue
        _log(f"render {n} {name} images -> {d}")
        render_folder(
            d,
            n,
            seed=seed,
            style=style,
            split=split,
            progress=True,
            select=only.get(name),
            caption=word.get(name),
        )
    return paths


def _load_images(folders: list[Path]):
    import numpy as np
    import torch
    from PIL import Image

    arrs = []
    for d in folders:
        for p in sorted(d.glob("*.png")):
            with Image.open(p) as im:
                arrs.append(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def train_vae(
    folders: list[Path],
    steps: int = VAE_STEPS,
    batch: int = VAE_BATCH,
    seed: int = SEED,
    *,
    init: dict | None = None,
    lr: float = 2e-3,
    fg_weight: float = 0.0,
    crop: int = 0,
    decoder_only: bool = False,
    fade: float = 0.0,
):
    """An SD1.x AutoencoderKL trained as a deterministic autoencoder (reconstruction from the posterior
    mean, plus a little latent noise so the decoder tolerates imperfect diffusion samples).
    ``init`` continues from a state dict; ``fg_weight`` > 0 weighs shape pixels (those unlike the image's
    corner) 1 + fg_weight times, since the background dominates a plain pixel loss; ``crop`` > 0 trains
    on random ``crop`` x ``crop`` windows (a multiple of 8, so latents stay aligned).
    ``decoder_only`` trains ``post_quant_conv`` and the decoder on a frozen encoder (the latent space,
    hence every UNet trained on it, stays as it is; no rescale); ``fade`` > 0 fades that share of
    images towards their background (corner) colour by a factor in [0.3, 1), so colours between the
    palette's decode as themselves (A1111 emphasis below 1 asks for them).
    Returns (vae state dict in diffusers layout, latent-rescaled; loss log)."""
    import torch
    from tqdm import tqdm

    from baka.models.config import make_vae

    cfg = world_config()
    torch.manual_seed(seed)
    vae = make_vae(cfg.vae)
    if init is not None:
        vae.load_state_dict(init)
    data = _load_images(folders)
    gen = torch.Generator().manual_seed(seed + (1 if init is not None else 0))
    params = list(vae.parameters())
    if decoder_only:
        vae.requires_grad_(False)
        params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
        for t in params:
            t.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    log = []
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x = data[idx]
        if crop:
            oy, ox = (
                int(v) * 8 for v in torch.randint(0, (x.shape[-1] - crop) // 8 + 1, (2,), generator=gen)
            )
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        if fade:
            bg = x[:, :, :1, :1]
            k = 0.3 + 0.7 * torch.rand(batch, 1, 1, 1, generator=gen)
            k = torch.where(torch.rand(batch, 1, 1, 1, generator=gen) < fade, k, torch.ones_like(k))
            x = bg + k * (x - bg)
        with torch.set_grad_enabled(not decoder_only):
            z = vae.encode(x).latent_dist.mean
        noisy = z + 0.1 * z.detach().std() * torch.randn(z.shape, generator=gen)
        y = vae.decode(noisy).sample
        w = 1.0
        if fg_weight:
            fg = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
            w = 1 + fg_weight * fg
        err = y - x
        loss = (w * (err.abs() + err**2)).mean() + 1e-6 * (z**2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append(float(loss.detach()))
        bar.set_postfix(loss=f"{log[-1]:.4f}")
    vae.eval()
    if not decoder_only:
        _rescale_latents(vae, data)
    return vae.state_dict(), log


def _rescale_latents(vae, data) -> None:
    """Fold an affine map into quant_conv / post_quant_conv so that ``mean * SCALING_FACTOR`` is zero-mean,
    unit-variance per channel; the decoder sees exactly the same inputs as before (1x1 convs are linear)."""
    import torch

    with torch.no_grad():
        z = torch.cat([vae.encode(data[i : i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
        m = z.mean(dim=(0, 2, 3))
        k = (1.0 / SCALING_FACTOR) / z.std(dim=(0, 2, 3))
        c = m.numel()
        q, p = vae.quant_conv, vae.post_quant_conv
        q.weight[:c] *= k[:, None, None, None]
        q.bias[:c] = (q.bias[:c] - m) * k
        q.bias[c:] += 2 * torch.log(k)  # log-variance follows the mean's scale
        p.bias += (p.weight[:, :, 0, 0] @ m).to(p.bias.dtype)
        p.weight /= k[None, :, None, None]


def vae_report(vae_sd: dict, n: int = 120, seed: int = 99) -> dict[str, float]:
    """The judge's scores on VAE reconstructions of fresh renders (both styles, the held-out split too):
    the ceiling of what any UNet on this latent space can reach."""
    import numpy as np
    import torch

    from baka.models.config import make_vae
    from baka.world.render import render_scene, scenes
    from baka.world.score import read_image, score

    vae = make_vae(world_config().vae)
    vae.load_state_dict(vae_sd)
    vae.eval()
    pairs = []
    for style in ("flat", "striped"):
        scs = list(scenes(n, seed=seed, style=style, split="all"))
        x = torch.from_numpy(np.stack([render_scene(sc) for sc in scs]).astype(np.float32) / 127.5 - 1)
        with torch.no_grad():
            y = vae.decode(vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean).sample
        imgs = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        pairs += [(read_image(im), sc) for im, sc in zip(imgs, scs, strict=True)]
    names = ("color_accuracy", "shape_accuracy", "background_accuracy", "size_accuracy", "position_accuracy")
    return {k: round(v, 3) for k, v in score(pairs, names).items()}


def _save_stage(sd: dict, path: Path) -> None:
    """A stage's weights, written last and atomically: a file that exists is a finished stage (with its
    report beside it), which is what lets an interrupted build continue."""
    from safetensors.torch import save_file

    from baka.models.safetensors_io import atomic_output

    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))


def _vae_phases(out: Path, folders: list[Path]) -> dict:
    """Phase 1: plain loss, OneCycle 2e-3; phase 2 (fresh Adam) weighs shape pixels 5x, OneCycle 1e-3,
    so shape colours come out right and not only the background; phase 3 fits the decoder alone to faded
    colours (:data:`VAE_PHASES`). Each phase's result is kept."""
    from safetensors.torch import load_file

    sd = None
    for i, kw in enumerate(VAE_PHASES, 1):
        f = out / f"vae{i}.safetensors"
        if f.exists():
            sd = load_file(f)
            continue
        t = time.time()
        sd, log = train_vae(folders, init=sd, **kw)
        secs = round(time.time() - t)
        (out / f"vae{i}_losses.json").write_text(json.dumps({"loss": log, "seconds": secs}))
        _log(f"VAE phase {i}: {len(log)} steps, loss {log[0]:.4f} -> {sum(log[-50:]) / 50:.4f}, {secs} s")
        rep = vae_report(sd)
        (out / f"vae{i}_report.json").write_text(json.dumps(rep))
        _log(f"VAE phase {i} reconstructions, judge: {rep}")
        _save_stage(sd, f)
    return sd


# the attributes a caption names, each a classification target of the text encoder's pretraining;
# "-" is "no such thing" (a one-shape scene has no second shape, a two-shape scene no position word),
# "?" is "not said" (a partial caption: a tag left out, or a shape tag cut to its colour or its shape)
UNSAID = "?"


def _caption_targets() -> dict[str, list[str]]:
    from baka.world.render import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES

    return {
        "color1": [UNSAID, *COLORS],
        "shape1": [UNSAID, *SHAPES],
        "color2": [UNSAID, "-", *COLORS],
        "shape2": [UNSAID, "-", *SHAPES],
        "background": [UNSAID, *BACKGROUNDS],
        "size": [UNSAID, *SIZES],
        "position": [UNSAID, "-", *POSITIONS],
    }


# partial captions in the text encoder's pretraining: the chance each tag stays in a partial one, and
# the chance a kept "red circle" tag is cut to "red" or to "circle"
TE_KEEP_TAG = 0.5
TE_CUT_TAG = 0.25


def _scene_labels(scene) -> dict[str, str]:
    a, b = scene.shapes[0], scene.shapes[1] if len(scene.shapes) > 1 else None
    return {
        "color1": a.color,
        "shape1": a.shape,
        "color2": b.color if b else "-",
        "shape2": b.shape if b else "-",
        "background": scene.background,
        "size": a.size,
        "position": "-" if b else a.position,
    }


def partial_caption(scene, rng) -> tuple[str, dict[str, str]]:
    """A caption that says part of ``scene``, and its labels (``UNSAID`` where it says nothing): each
    tag kept with ``TE_KEEP_TAG`` (at least one), a kept shape tag cut to its colour or its shape word
    with ``TE_CUT_TAG`` each, tags in the caption's order. Shape tags are numbered as they appear (the
    first one said is shape 1), so a caption's text alone fixes its labels. Single words ("red",
    "circle") are what a negative prompt or ``baka erase`` names, and what kohya's tag dropout
    (``caption_tag_dropout_rate``) leaves of a caption when the UNet trains."""
    # (text, label key, value); a shape tag's key is None (numbered as said, below)
    tags: list[tuple[str, str | None, object]] = [
        (f"{s.color} {s.shape}", None, (s.color, s.shape)) for s in scene.shapes
    ]
    tags += [(f"{scene.background} background", "background", scene.background)]
    tags += [(scene.shapes[0].size, "size", scene.shapes[0].size)]
    if len(scene.shapes) == 1:
        tags.append((scene.shapes[0].position, "position", scene.shapes[0].position))
    kept = [t for t in tags if rng.random() < TE_KEEP_TAG] or [tags[rng.randrange(len(tags))]]
    labels = {k: UNSAID for k in _caption_targets()}
    words, n_shapes = [], 0
    for text, key, value in kept:
        if key is not None:
            labels[key] = str(value)
            words.append(text)
            continue
        n_shapes += 1
        c, sh = value
        r = rng.random()
        c, sh = (c, UNSAID) if r < TE_CUT_TAG else (UNSAID, sh) if r < 2 * TE_CUT_TAG else (c, sh)
        labels[f"color{n_shapes}"], labels[f"shape{n_shapes}"] = c, sh
        words.append(" ".join(w for w in (c, sh) if w != UNSAID))
    return ", ".join(words), labels


def pretrain_text_encoder(
    te_sd: dict,
    steps: int = TE_STEPS,
    batch: int = 256,
    lr: float = 3e-3,
    seed: int = SEED,
    n_captions: int = 20000,
    whole: float = 1.0,
    attention_only: bool = TE_ATTENTION_ONLY,
) -> tuple[dict, list[float], dict[str, float]]:
    """Teach the (identity-initialised) text encoder to say what a caption means in every token from
    the caption's end on: linear heads read each attribute (colours, shapes, background, size,
    position) from the hidden state at the end token and at every padding token after it.

    A UNet trained from scratch on an untrained encoder must learn to pick 4-8 caption tokens out of 77
    through 4-wide attention heads, and learns it slowly (builds 1-3 followed their prompts barely above
    chance after 5500 steps: docs/world.md); real SD1 gets CLIP's pretrained states, whose end and
    padding tokens summarise the caption. This stage gives the world's encoder that property, with the
    words' order bound by the causal attention ("blue background" vs "blue square"), so any average of
    the padding states already carries the caption. Captions come from the training split only, so the
    held-out combinations stay unseen. A share of the captions is partial (:func:`partial_caption`), so
    single tags and words get a meaning too, with ``UNSAID`` for what they leave out. ``attention_only``
    keeps the MLPs at zero (their weights frozen), so states combine earlier tokens' by attention alone.
    Returns (state dict, loss log, report): on 2048 fresh captions' states, the share with every
    attribute right (``all``; ``whole``: whole captions only), each attribute's accuracy on the partial
    ones, and ``held_out``: whole captions of held-out scenes (pairs the heads never saw) read right.
    """
    import torch
    from tqdm import tqdm

    from baka.models.config import make_text_encoder
    from baka.models.tokenizer import load_tokenizer
    from baka.train.modes import plain_tokens
    from baka.world.render import sample_scene

    torch.manual_seed(seed)
    te = make_text_encoder(world_config().text_encoder)
    te.load_state_dict(te_sd)
    if attention_only:
        for name, p in te.named_parameters():
            p.requires_grad_(".mlp." not in name)
    tok = load_tokenizer()
    targets = _caption_targets()
    width = te.config.hidden_size
    head = torch.nn.Linear(width, sum(len(v) for v in targets.values()))
    slices, at = {}, 0
    for k, v in targets.items():
        slices[k] = slice(at, at + len(v))
        at += len(v)

    def data(n: int, offset: int, split: str = "train"):
        rng = random.Random(seed * 7919 + offset)
        captions, said, is_whole = [], [], []
        for i in range(n):
            sc = sample_scene(seed + 7, offset + i, style="flat", split=split)
            is_whole.append(split != "train" or rng.random() < whole)
            cap, lab = (sc.caption, _scene_labels(sc)) if is_whole[-1] else partial_caption(sc, rng)
            captions.append(cap)
            said.append(lab)
        ids = plain_tokens(None, tok, captions, "cpu")  # as baka train tokenizes
        labels = torch.tensor([[targets[k].index(lab[k]) for k in targets] for lab in said], dtype=torch.long)
        # positions from the first end token on (the tokenizer pads with it)
        first_end = (ids == tok.eos_token_id).int().argmax(1)
        mask = torch.arange(77)[None] >= first_end[:, None]
        return ids, labels, mask, torch.tensor(is_whole)

    parts = list(enumerate(slices.values()))

    def logits_and_labels(ids, labels, mask):
        h = te(input_ids=ids).last_hidden_state[mask]  # [tokens, width]
        return head(h), labels.repeat_interleave(mask.sum(1), dim=0)

    ids, labels, mask, _ = data(n_captions, 0)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in (*te.parameters(), *head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    log = []
    for _ in (bar := tqdm(range(steps), desc="text encoder")):
        i = torch.randint(0, len(ids), (batch,), generator=gen)
        logits, lab = logits_and_labels(ids[i], labels[i], mask[i])
        loss = sum(torch.nn.functional.cross_entropy(logits[:, sl], lab[:, j]) for j, sl in parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append(float(loss.detach()))
        bar.set_postfix(loss=f"{log[-1]:.4f}")

    def hits(ids, labels, mask):  # [tokens, attributes]: each attribute read right at each token
        logits, lab = logits_and_labels(ids, labels, mask)
        return torch.stack([logits[:, sl].argmax(1) == lab[:, j] for j, sl in parts], 1)

    with torch.no_grad():
        ids, labels, mask, said_all = data(2048, 10**6)
        right = hits(ids, labels, mask)
        said_all = said_all.repeat_interleave(mask.sum(1))
        report = {"all": right.all(1).float().mean(), "whole": right[said_all].all(1).float().mean()}
        if not said_all.all():
            report.update({k: right[~said_all, j].float().mean() for j, k in enumerate(targets)})
        report["held_out"] = hits(*data(512, 0, split="heldout")[:3]).all(1).float().mean()
    return te.state_dict(), log, {k: round(float(v), 4) for k, v in report.items()}


def identity_text_encoder(seed: int = SEED) -> dict:
    """A random text encoder whose residual branches (attention out_proj, MLP fc2) are zero: the
    identity on (token + position) embeddings, so every caption word starts as a distinct vector (a
    random 12-layer encoder maps all captions to nearly the same states, cosine 0.98-0.998)."""
    import torch

    from baka.models.config import make_text_encoder

    torch.manual_seed(seed)
    sd = make_text_encoder(world_config().text_encoder).state_dict()
    for k, v in sd.items():
        if ".self_attn.out_proj." in k or ".mlp.fc2." in k:
            v.zero_()
    return sd


def _text_encoder_stage(out: Path) -> dict:
    """The pretrained text encoder, phase by phase (``TE_PHASES``: ``te1.safetensors``, ...; the last
    also as ``te.safetensors``), each phase's report in ``te_report.json``."""
    from safetensors.torch import load_file

    f = out / "te.safetensors"
    if f.exists():
        return load_file(f)
    sd, reports = identity_text_encoder(), []
    for i, kw in enumerate(TE_PHASES, 1):
        fi = out / f"te{i}.safetensors"
        if fi.exists():
            sd = load_file(fi)
            reports.append(json.loads((out / f"te{i}_report.json").read_text()))
            continue
        t = time.time()
        sd, log, acc = pretrain_text_encoder(sd, **kw)
        k = max(1, len(log) // 20)
        rep = {"steps": len(log), "seconds": round(time.time() - t), "loss_first": log[0]}
        rep.update(loss_last=sum(log[-k:]) / k, caption_accuracy=acc["whole"], accuracy=acc)
        (out / f"te{i}_report.json").write_text(json.dumps(rep))
        _save_stage(sd, fi)
        _log(f"text encoder phase {i}: {rep}")
        reports.append(rep)
    total = {"steps": sum(r["steps"] for r in reports), "seconds": sum(r["seconds"] for r in reports)}
    total.update(caption_accuracy=reports[-1]["caption_accuracy"], phases=reports)
    (out / "te_report.json").write_text(json.dumps(total))
    _save_stage(sd, f)
    return sd


def weighted_caption(scene, w: float) -> str:
    """The scene's caption with its (first) shape's colour word weighted, A1111 syntax."""
    s = scene.shapes[0]
    return scene.caption.replace(f"{s.color} {s.shape}", f"({s.color}:{w:g}) {s.shape}", 1)


def render_weighted(out: Path, n: int = N_FLAT, share: float = EMPH_SHARE, seed: int = EMPH_SEED) -> int:
    """The flat training scenes (those of ``data/flat``) into ``out``, a ``share`` of the one-shape ones
    with a weighted colour word and, below 1, the colour faded towards the background by the weight.
    Returns how many are weighted."""
    import numpy as np

    from baka.world.render import BACKGROUNDS, render_folder

    rng, weighted = random.Random(seed), 0

    def weigh(sc, img, caption):
        nonlocal weighted
        if len(sc.shapes) == 1 and rng.random() < share:
            w = rng.choice(EMPH_FADED + EMPH_ABOVE)
            bg = np.array(BACKGROUNDS[sc.background], np.float32)
            img = np.clip(bg + min(w, 1.0) * (img.astype(np.float32) - bg), 0, 255).round().astype(np.uint8)
            caption, weighted = weighted_caption(sc, w), weighted + 1
        return img, caption

    render_folder(out, n, seed=0, style="flat", split="train", progress=True, edit=weigh)
    return weighted


def build_init(out: Path, vae_sd: dict, te_sd: dict, seed: int = SEED) -> Path:
    """Random UNet (seeded) + the pretrained text encoder + the trained VAE, as an LDM fp32 checkpoint."""
    import torch

    from baka.models.config import make_unet
    from baka.models.convert import diffusers_to_ldm
    from baka.models.io import save_checkpoint

    cfg = world_config()
    torch.manual_seed(seed)
    comps = {"unet": make_unet(cfg.unet).state_dict(), "text_encoder": te_sd, "vae": vae_sd}
    path = out / "init.safetensors"
    save_checkpoint(diffusers_to_ldm(comps, cfg), path, metadata={"baka_world": "init"})
    return path


def train_toml(
    out: Path,
    name: str,
    model: Path,
    data: Path,
    steps: int,
    *,
    lr: float,
    v_pred: bool = False,
    seed: int = SEED,
    ema: float = 0.995,
    extra: dict | None = None,
) -> Path:
    """The ``baka train`` config of one stage (written next to its outputs, so the run is inspectable);
    the UNet trains, the pretrained text encoder stays as it is; ``extra`` adds top-level keys (values
    as TOML literals)."""
    more = "".join(f"{k} = {v}\n" for k, v in (extra or {}).items())
    text = f"""# written by baka.world.build
model = "{model}"
output_dir = "{out / name}"
output_name = "{name}"
mode = "full"
max_steps = {steps}
learning_rate = {lr}
train_text_encoder = false
weight_decay = 0.0
seed = {seed}
min_snr_gamma = 5.0
v_prediction = {str(v_pred).lower()}
zero_terminal_snr = {str(v_pred).lower()}
ema_decay = {ema}
{more}sample_prompts = [
  "red circle, blue background, large, center",
  "yellow square, black background, medium, left",
]
sample_steps = 20
{_dataset_toml(data, BATCH, tag_dropout=TAG_DROPOUT)}"""
    path = out / f"{name}.toml"
    path.write_text(text)
    return path


def _dataset_toml(
    data: Path, batch: int, repeats: int = 1, caption_dropout: float = 0.1, tag_dropout: float = 0.0
) -> str:
    return f"""
[[datasets]]
resolution = 64
enable_bucket = false
batch_size = {batch}
validation_split = 0.0

  [[datasets.subsets]]
  image_dir = "{data}"
  caption_extension = ".txt"
  caption_dropout_rate = {caption_dropout}
  caption_tag_dropout_rate = {tag_dropout}
  num_repeats = {repeats}
"""


def _small_run_toml(
    out: Path, name: str, model: Path, data: Path, steps: int, mode_keys: str, tail: str
) -> Path:
    """A short ``baka train`` run on a 40-image set (batch 8, 10 repeats, no caption dropout)."""
    text = f"""# written by baka.world.build
model = "{model}"
output_dir = "{out / name}"
output_name = "{name}"
max_steps = {steps}
seed = {SEED}
min_snr_gamma = 5.0
lr_scheduler = "cosine"
save_precision = "fp16"
{mode_keys}{tail}{_dataset_toml(data, 8, repeats=10, caption_dropout=0.0)}"""
    path = out / f"{name}.toml"
    path.write_text(text)
    return path


def lora_toml(
    out: Path,
    name: str,
    model: Path,
    data: Path,
    *,
    steps: int = STAR_STEPS,
    network: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """The ``baka train`` config of a LoRA on the world (UNet + text encoder, fp16 file, kohya's
    layout); ``network`` adds ``[network]`` keys (dropouts, ...), ``extra`` top-level keys (values as
    TOML literals, e.g. a ``block_dropout`` inline table)."""
    more = "".join(f"{k} = {v}\n" for k, v in (extra or {}).items())
    net = "".join(f"{k} = {v}\n" for k, v in {**STAR_NETWORK, **(network or {})}.items())
    keys = 'mode = "lora"\nlearning_rate = 1e-3\ntrain_text_encoder = true\ntext_encoder_lr = 5e-4\n'
    return _small_run_toml(out, name, model, data, steps, keys + more, "\n[network]\n" + net)


def embedding_toml(out: Path, model: Path, data: Path) -> Path:
    """The ``baka train`` config of the textual-inversion embedding (``mode = "embedding"``)."""
    keys = (
        f'mode = "embedding"\ntoken_string = "{TI_WORD}"\ninit_word = "*"\nnum_vectors_per_token = 1\n'
        "learning_rate = 2e-2\n"
    )
    return _small_run_toml(out, TI_WORD, model, data, TI_STEPS, keys, "")


def _save_seconds(folder: Path, start: float) -> None:
    """A stage's wall time since ``start``, kept beside its output (``time.json``) for its card."""
    (folder / "time.json").write_text(json.dumps({"seconds": round(time.time() - start)}))


def _seconds(out: Path, name: str) -> int:
    """The wall time :func:`_save_seconds` kept for the stage ``name``."""
    return json.loads((out / name / "time.json").read_text())["seconds"]


def run_baka(*args: str | Path, threads: str = THREADS) -> None:
    """``baka ARGS`` in a subprocess, exactly as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "baka", *map(str, args)], check=True, env=env)


def run_train(toml: Path) -> None:
    run_baka("train", toml)


def erase_in_context(model: Path, erased: Path, args: list[str] = ESD_ARGS, threads: str = THREADS) -> None:
    """``baka erase`` ``ESD_PROMPTS`` from ``model`` into ``erased``, joined by the separator that
    ``args`` names (one prompt per iteration)."""
    sep = args[args.index("--separator") + 1]
    run_baka("erase", model, sep.join(ESD_PROMPTS), "-o", erased, *args, threads=threads)


def esd_u_args() -> list[str]:
    """``ESD_U_ARGS`` with the retain term's prompts (``ESD_PRESERVE``, joined by the separator)."""
    sep = ESD_U_ARGS[ESD_U_ARGS.index("--separator") + 1]
    return [*ESD_U_ARGS, "--preserve", sep.join(ESD_PRESERVE)]


def erase_stage(out: Path, model: Path) -> Path:
    """``baka erase`` the concept from ``model``, then ``baka lora extract`` the edit as a LoRA (fp16,
    rank 32, no clamping: exact on the edited layers; unchanged layers are skipped)."""
    d = out / ESD_LORA
    d.mkdir(exist_ok=True)
    erased, lora = d / "erased.safetensors", d / f"{ESD_LORA}.safetensors"
    if not erased.exists():
        t = time.time()
        _log(f"baka erase {model.name} <{len(ESD_PROMPTS)} {ESD_CONCEPT} captions> {shlex.join(ESD_ARGS)}")
        erase_in_context(model, erased)
        _save_seconds(d, t)
    if not lora.exists():
        extract = ("--dim", "32", "--clamp-quantile", "1", "--min-diff", "1e-6", "--save-precision", "fp16")
        run_baka("lora", "extract", model, erased, "-o", lora, "-q", *extract)
    return lora


def erase_u_stage(out: Path, model: Path) -> Path:
    """``baka erase`` ESD-u as a LoRA (fp32, as trained), then its fp16 copy, the shipped tensors."""
    import torch

    from baka.models.io import cast, read_raw
    from baka.models.safetensors_io import payload_sha256, save_file

    d = out / ESD_U_LORA
    d.mkdir(exist_ok=True)
    erased, lora = d / "erased.safetensors", trained(out, ESD_U_LORA)
    if not erased.exists():
        t = time.time()
        _log(f"baka erase {model.name} <{len(ESD_PROMPTS)} {ESD_CONCEPT} captions> {shlex.join(ESD_U_ARGS)}")
        erase_in_context(model, erased, esd_u_args(), threads=ESD_U_THREADS)
        _save_seconds(d, t)
    if not lora.exists():
        tensors, meta = read_raw(erased)
        half = cast(tensors, torch.float16)  # the addnet hash is over the tensors the file holds
        save_file(half, lora, {**meta, "ss_output_name": ESD_U_LORA, "sshs_model_hash": payload_sha256(half)})
    return lora


def esd_stats(out: Path, name: str) -> dict:
    """An erase LoRA's card figures: its concept, arguments, prompts and erase time."""
    args, extra = {
        ESD_LORA: (ESD_ARGS, {}),
        ESD_U_LORA: (ESD_U_ARGS, {"preserve_prompts": list(ESD_PRESERVE)}),
    }[name]
    secs = _seconds(out, name)
    stats = {"concept": ESD_CONCEPT, "erase_args": shlex.join(args), "erase_seconds": secs}
    return {**stats, "erase_prompts": list(ESD_PROMPTS), **extra}


CARDS = {
    "world-flat": "epsilon-prediction base model of the shapes world, flat fills",
    "world-striped": "world-flat fine-tuned on the striped style (hatched fills + outlines)",
    "world-vpred-ztsnr": "world-flat fine-tuned to v-prediction with zero-terminal-SNR betas",
    STAR_LORA: "a LoRA that teaches world-flat the star, a shape its training never showed",
    TI_WORD: f"a textual-inversion embedding that world-flat reads as the colour {TI_COLOR}",
    ESD_LORA: f"world-flat with the concept {ESD_CONCEPT!r} erased by ESD-x, as a LoRA",
    ESD_U_LORA: f"a LoRA that erases the concept {ESD_CONCEPT!r} from world-flat by ESD-u",
}


def _ship_meta(name: str, stats: dict) -> dict[str, str]:
    """The modelspec and build fields every shipped file carries."""
    return {
        "modelspec.title": name,
        "modelspec.description": CARDS[name],
        "modelspec.author": "baka (procedural, trained from scratch)",
        "modelspec.license": "MIT",
        "baka_world": json.dumps(stats, sort_keys=True),
    }


def ship(out: Path, name: str, stats: dict, dest: Path = WEIGHTS_DIR) -> Path:
    """fp16 copy of a trained model with modelspec metadata, plus its model card."""
    import torch

    from baka.models.io import cast, read_raw, save_checkpoint

    tensors, meta = read_raw(out / name / f"{name}.safetensors")
    tensors = cast(tensors, torch.float16)
    vpred = name == "world-vpred-ztsnr"
    meta.update(
        {
            **_ship_meta(name, stats),
            "modelspec.resolution": "64x64",
            "modelspec.prediction_type": "v" if vpred else "epsilon",
            "baka_zero_terminal_snr": str(vpred),
        }
    )
    if vpred:
        meta["modelspec.noise_schedule"] = "zero_terminal_snr"
    path = save_checkpoint(tensors, dest / f"{name}.safetensors", metadata=meta)
    _card(
        dest / f"{name}.md",
        name,
        stats,
        "SD1.x topology (exact SD1.5 LDM keys, 26 merge blocks) at toy width; 64x64 images, 8x8 latents.",
        f"Evaluate: `baka world eval {name}`.",
    )
    return path


def _card(path: Path, name: str, stats: dict, what: str, use: str) -> None:
    card = [
        f"# {name}",
        "",
        CARDS[name] + ".",
        "",
        what,
        "Trained from scratch on baka's procedural shapes world (`baka world render`), no external data.",
        f"Reproduce: `make world`. {use}",
        "",
        "```json",
        json.dumps(stats, indent=2, sort_keys=True),
        "```",
        "",
    ]
    path.write_text("\n".join(card))


SMALL_USE = {  # how a card says to use a shipped LoRA / embedding
    STAR_LORA: (
        f"kohya-layout LoCon (dim {STAR_NETWORK['dim']}, conv dim {STAR_NETWORK['conv_dim']}, UNet + text"
        " encoder) for world-flat, trained with"
        f" `baka train` on {STAR_IMAGES} large stars.",
        f"Use: `<lora:{STAR_LORA}:1>` in a prompt, e.g. `baka generate world-flat -W 64 -H 64"
        f' -p "red star, white background, large, center <lora:{STAR_LORA}:1>"`.',
    ),
    TI_WORD: (
        f"Textual-inversion embedding (1 vector, `emb_params`) for world-flat, trained with `baka train`"
        f' (`mode = "embedding"`) on {TI_IMAGES} {TI_COLOR} shapes whose captions say `{TI_WORD}` for the'
        " colour; it starts from `*`, not from the colour's word.",
        f"Use: put the file in an embeddings folder (`--embeddings DIR`) and write `{TI_WORD}` where a"
        f' colour goes, e.g. `-p "{TI_WORD} square, white background, medium, top"`, or in a negative'
        f' prompt: `-n "{TI_WORD} circle, grey background, large, center"`.',
    ),
    ESD_LORA: (
        f"kohya-layout LoRA for world-flat: `baka erase world-flat CAPTIONS {shlex.join(ESD_ARGS)}`, CAPTIONS"
        f" being {len(ESD_PROMPTS)} {ESD_CONCEPT} captions of the training set joined by `|`"
        f" (`baka.world.build.ESD_PROMPTS`: {'; '.join(ESD_PROMPTS[:2])}; ...)"
        " (cross-attention keys and values edited), turned into a rank-32 LoRA by `baka lora extract`.",
        f"Use: `<lora:{ESD_LORA}:1>` in a prompt, e.g. `baka generate world-flat -W 64 -H 64"
        f' -p "{ESD_CONCEPT} circle, grey background, large, center <lora:{ESD_LORA}:1>"`.',
    ),
    ESD_U_LORA: (
        "kohya-layout LoCon for world-flat, trained by"
        f" `baka erase world-flat CAPTIONS {shlex.join(ESD_U_ARGS)} --preserve KEPT` (every UNet layer"
        f" but cross-attention, the time embedding and the output), CAPTIONS being the {len(ESD_PROMPTS)}"
        f" {ESD_CONCEPT} captions of `{ESD_LORA}` and KEPT {len(ESD_PRESERVE)} captions of the other"
        " colours (`baka.world.build.ESD_PRESERVE`), joined by `|`.",
        f"Use: `<lora:{ESD_U_LORA}:1>` in a prompt, e.g. `baka generate world-flat -W 64 -H 64"
        f' -p "{ESD_CONCEPT} circle, grey background, large, center <lora:{ESD_U_LORA}:1>"`.',
    ),
}


def ship_small(out: Path, name: str, stats: dict, dest: Path, folder: str) -> Path:
    """A trained LoRA or embedding (already fp16, ``ss_*`` metadata) with modelspec fields and a card,
    into ``dest/folder`` (``lora``: ``<lora:NAME:1>`` finds it; ``embeddings``)."""
    from baka.models.io import read_raw
    from baka.models.safetensors_io import save_file

    tensors, meta = read_raw(out / name / f"{name}.safetensors")
    meta.update(_ship_meta(name, stats))
    (dest / folder).mkdir(parents=True, exist_ok=True)
    path = save_file(tensors, dest / folder / f"{name}.safetensors", meta)
    _card(dest / folder / f"{name}.md", name, stats, *SMALL_USE[name])
    return path


def fp16_copy(out: Path, name: str) -> Path:
    """Where a run's fp16 copy goes when a later run starts from it."""
    return out / name / f"{name}-fp16.safetensors"


def flat_start(out: Path) -> Path:
    """The later stages' start: the file shipped as ``world-flat``, byte for byte, so the base-model
    hashes the star LoRA and the embedding record (``ss_sd_model_hash``, ``ss_new_sd_model_hash``) are
    the shipped world-flat's, from scratch and ``--from-shipped`` alike."""
    return fp16_copy(out, "world-flat")


def write_fp16(source: Path, path: Path) -> Path:
    """``source`` (a trained fp32 run) in fp16 at ``path``, for the next run to start from."""
    import torch

    from baka.models.io import cast, read_raw, save_checkpoint

    tensors, meta = read_raw(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(cast(tensors, torch.float16), path, metadata=meta)


def write_flat_start(out: Path, shipped: Path) -> Path:
    """The shipped world-flat file (this build's or the installed one), copied byte for byte to
    :func:`flat_start`."""
    from baka.models.safetensors_io import atomic_output

    path = flat_start(out)
    with atomic_output(path) as tmp:
        shutil.copyfile(shipped, tmp)
    return path


def base_stats(out: Path) -> dict:
    """The VAE's and text encoder's figures every shipped card carries: from the work folder's logs, or
    (``--from-shipped``, no logs) from the shipped world-flat's ``baka_world`` metadata."""
    saved = out / "base_stats.json"
    if saved.exists():
        return json.loads(saved.read_text())
    vae_logs = [json.loads(f.read_text()) for f in sorted(out.glob("vae*_losses.json"))]
    te = json.loads((out / "te_report.json").read_text())
    base = {
        "vae_steps": sum(len(v["loss"]) for v in vae_logs),
        "vae_seconds": sum(v["seconds"] for v in vae_logs),
        "vae_loss_last": round(sum(vae_logs[-1]["loss"][-50:]) / 50, 4),
        "vae_judge": json.loads(sorted(out.glob("vae*_report.json"))[-1].read_text()),
        "text_encoder_steps": te["steps"],
        "text_encoder_seconds": te["seconds"],
        "text_encoder_caption_accuracy": te["caption_accuracy"],
    }
    held_out = te["phases"][-1]["accuracy"].get("held_out")
    if held_out is not None:  # reports from before build 7 lack it
        base["text_encoder_held_out_accuracy"] = held_out
    return base


def seed_from_shipped(out: Path, shipped: Path) -> None:
    """``--from-shipped``: the installed world-flat becomes the later stages' start, and its card's VAE /
    text-encoder figures the base of theirs."""
    from baka.models.io import read_raw

    _, meta = read_raw(shipped)
    stats = json.loads(meta["baka_world"])
    base = {k: v for k, v in stats.items() if k.startswith(("vae_", "text_encoder_"))}
    write_flat_start(out, shipped)
    (out / "base_stats.json").write_text(json.dumps(base, sort_keys=True))


def _losses(out: Path, name: str) -> dict:
    d = json.loads((out / name / "losses.json").read_text())
    tr = d["train"]
    k = max(1, len(tr) // 20)
    return {
        "steps": len(tr),
        "loss_first": round(sum(tr[:k]) / k, 4),
        "loss_last": round(sum(tr[-k:]) / k, 4),
        "val_loss_last": round(d["val"][-1][1], 4) if d["val"] else None,
    }


def model_stats(out: Path, name: str) -> dict:
    """A shipped model's card figures: the VAE / encoder's, its run's losses and time (world-flat: its
    earlier runs' too)."""
    stats = {**base_stats(out), **_losses(out, name)}
    stats["train_seconds"] = _seconds(out, name)
    if name == "world-flat":
        for run, key in EARLIER_RUNS.items():
            stats[key] = {**_losses(out, run), "seconds": _seconds(out, run)}
    return stats


def trained(out: Path, name: str) -> Path:
    """A ``baka train`` run's output."""
    return out / name / f"{name}.safetensors"


Stage = tuple[str, Path, Path, int, float, bool, dict]  # name, start, data, steps, LR, v-pred, TOML keys


def model_stages(out: Path, sets: dict[str, Path], init: Path) -> list[Stage]:
    """The UNet runs in order: world-flat's runs (the base run, the caption-free run, the two
    weighted-caption runs), then the fine-tunes from world-flat."""
    start = flat_start(out)
    weighted = sets["weighted"]
    return [
        (BASE, init, sets["flat"], FLAT_STEPS, 1e-3, False, EPS_KEYS),
        (CF_RUN, trained(out, BASE), sets["flat"], CF_STEPS, 3e-4, False, CF_KEYS),
        (WEIGHTED, fp16_copy(out, CF_RUN), weighted, EMPH_STEPS, 1e-3, False, {**EPS_KEYS, **WEIGHTED_KEYS}),
        ("world-flat", trained(out, WEIGHTED), weighted, CF_STEPS, 3e-4, False, {**CF_KEYS, **WEIGHTED_KEYS}),
        ("world-striped", start, sets["striped"], STRIPED_STEPS, 3e-4, False, CF_KEYS),
        ("world-vpred-ztsnr", start, sets["flat"], VPRED_STEPS, 5e-4, True, VPRED_CF_KEYS),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baka.world.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build/world", help="work folder (datasets, runs)")
    p.add_argument("--dest", default=str(WEIGHTS_DIR), help="where the shipped fp16 files go")
    p.add_argument("--only", choices=["vae", *ONLY], help="stop after this stage")
    p.add_argument(
        "--from-shipped",
        action="store_true",
        help="start the stages after world-flat from the installed world-flat (no VAE, encoder, base runs)",
    )
    a = p.parse_args(argv)
    if a.from_shipped and a.only in ("vae", "flat"):
        p.error(f"--only {a.only} stops before the stages --from-shipped runs")
    import torch

    torch.set_num_threads(int(THREADS))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sets = render_sets(out, weighted=not a.from_shipped)
    init = out / "init.safetensors"
    if a.from_shipped:
        if not flat_start(out).exists():
            seed_from_shipped(out, WEIGHTS_DIR / "world-flat.safetensors")
    elif not init.exists():
        vae_sd = _vae_phases(out, [sets["flat"], sets["striped"]])
        build_init(out, vae_sd, _text_encoder_stage(out))
    if a.only == "vae":
        return 0

    start = flat_start(out)
    stages = model_stages(out, sets, init)
    for name, model, data, steps, lr, vpred, extra in stages:
        if a.from_shipped and name in FLAT_CHAIN:
            continue
        if not trained(out, name).exists():
            t = time.time()
            _log(f"baka train {name}: {steps} steps from {model.name}")
            run_train(train_toml(out, name, model, data, steps, lr=lr, v_pred=vpred, extra=extra))
            _save_seconds(out / name, t)
        if name == CF_RUN and not fp16_copy(out, name).exists():
            write_fp16(trained(out, name), fp16_copy(out, name))
        if name == "world-flat" and not flat_start(out).exists():  # shipped now: later stages start from it
            write_flat_start(out, ship(out, name, model_stats(out, name), Path(a.dest)))
        if a.only and name == ONLY[a.only]:
            break
    else:  # every model trained: the LoRA and the embedding on world-flat
        small = [
            (STAR_LORA, lambda: lora_toml(out, STAR_LORA, start, sets["star"])),
            (TI_WORD, lambda: embedding_toml(out, start, sets[TI_WORD])),
        ]
        for name, toml in small:
            if not trained(out, name).exists():
                t = time.time()
                _log(f"baka train {name}: {CARDS[name]}")
                run_train(toml())
                _save_seconds(out / name, t)
        erase_stage(out, start)
        erase_u_stage(out, start)
    for name in ONLY.values():  # world-flat's earlier runs are not shipped; its card has their figures
        if trained(out, name).exists():
            stats = model_stats(out, name)
            ship(out, name, stats, Path(a.dest))
            _log(f"shipped {name}: {stats}")
    for name, folder, images in ((STAR_LORA, "lora", STAR_IMAGES), (TI_WORD, "embeddings", TI_IMAGES)):
        if trained(out, name).exists():
            stats = {**_losses(out, name), "images": images}
            stats["train_seconds"] = _seconds(out, name)
            ship_small(out, name, stats, Path(a.dest), folder)
            _log(f"shipped {name}: {stats}")
    for name in (ESD_LORA, ESD_U_LORA):
        if trained(out, name).exists():
            stats = esd_stats(out, name)
            ship_small(out, name, stats, Path(a.dest), "lora")
            _log(f"shipped {name}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
