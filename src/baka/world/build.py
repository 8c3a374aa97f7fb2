"""Reproduce the shipped shapes-world models from nothing: ``make world`` (or ``python -m baka.world.build``).

Stages (each skipped when its output exists, so an interrupted build continues):

1. render the training sets (``flat`` and ``striped``, held-out combinations excluded);
2. train the VAE as a plain autoencoder on both styles (:func:`train_vae`), then rescale its latent
   space so SD1.x's fixed ``scaling_factor`` (0.18215) gives unit-variance, zero-mean latents;
3. assemble ``init.safetensors``: random UNet and text encoder (seeded), the trained VAE;
4. ``baka train`` (``mode = "full"``) trains ``world-flat`` from it in five runs (a-c epsilon loss at
   falling LR; d on t >= 600 and e on all t with ``v_pred_like_loss``, so the high-noise steps learn
   the caption); ``world-striped`` and ``world-vpred-ztsnr`` are fine-tuned from ``world-flat``;
5. fp16 copies with modelspec metadata and a model card go to ``src/baka/world/weights``.

Thread count: ``BAKA_WORLD_THREADS`` (default 2, the build machine's cores). On an otherwise idle
2-core machine two threads are twice as fast as one; when other jobs share the cores, 1 is much faster.
Weights are reproducible for a fixed thread count (the CPU kernels' reduction order depends on it).
"""

from __future__ import annotations

import argparse
import json
import os
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
VAE_PHASES = (
    {"steps": 2000, "lr": 2e-3, "fg_weight": 0.0, "batch": 32, "crop": 32},
    {"steps": 600, "lr": 1e-3, "fg_weight": 4.0, "batch": 16},
)
FLAT_STEPS = 2000
FLAT2_STEPS = 1000
FLAT3_STEPS = 1500
# epsilon loss is tiny at high t, so after runs a-c the UNet had not learned text -> global colour at
# t ~ 999 (right / wrong / empty caption gave the same error): run d trains t >= 600 only with
# kohya's v_pred_like_loss, run e the full range again with it (docs/world.md, build 3)
HIGHT_STEPS = 400
MIX_STEPS = 600
LATE_KEYS = {"v_pred_like_loss": 0.5, "lr_scheduler": '"cosine"', "lr_warmup_steps": 20}
STRIPED_STEPS = 300
VPRED_STEPS = 400
BATCH = 32
SEED = 0
THREADS = os.environ.get("BAKA_WORLD_THREADS", "2")


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


def render_sets(out: Path) -> dict[str, Path]:
    from baka.world.render import render_folder

    sets = {"flat": (N_FLAT, 0), "striped": (N_STRIPED, 1)}
    paths = {}
    for style, (n, seed) in sets.items():
        d = out / "data" / style
        paths[style] = d
        if (d / f"{n - 1:05d}.txt").exists():
            continue
        _log(f"render {n} {style} images -> {d}")
        render_folder(d, n, seed=seed, style=style, split="train", progress=True)
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
):
    """An SD1.x AutoencoderKL trained as a deterministic autoencoder (reconstruction from the posterior
    mean, plus a little latent noise so the decoder tolerates imperfect diffusion samples).
    ``init`` continues from a state dict; ``fg_weight`` > 0 weighs shape pixels (those unlike the image's
    corner) 1 + fg_weight times, since the background dominates a plain pixel loss; ``crop`` > 0 trains
    on random ``crop`` x ``crop`` windows (a multiple of 8, so latents stay aligned).
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
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
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
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append(float(loss.detach()))
        bar.set_postfix(loss=f"{log[-1]:.4f}")
    vae.eval()
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


def _vae_phases(out: Path, folders: list[Path]) -> dict:
    """Phase 1: plain loss, OneCycle 2e-3; phase 2 (fresh Adam) weighs shape pixels 5x, OneCycle 1e-3,
    so shape colours come out right and not only the background. Each phase's result is kept."""
    from safetensors.torch import load_file, save_file

    sd = None
    for i, kw in enumerate(VAE_PHASES, 1):
        f = out / f"vae{i}.safetensors"
        if f.exists():
            sd = load_file(f)
            continue
        t = time.time()
        sd, log = train_vae(folders, init=sd, **kw)
        secs = round(time.time() - t)
        save_file({k: v.contiguous() for k, v in sd.items()}, f)
        (out / f"vae{i}_losses.json").write_text(json.dumps({"loss": log, "seconds": secs}))
        _log(f"VAE phase {i}: {len(log)} steps, loss {log[0]:.4f} -> {sum(log[-50:]) / 50:.4f}, {secs} s")
        rep = vae_report(sd)
        (out / f"vae{i}_report.json").write_text(json.dumps(rep))
        _log(f"VAE phase {i} reconstructions, judge: {rep}")
    return sd


def build_init(out: Path, vae_sd: dict, seed: int = SEED) -> Path:
    """Random UNet + random text encoder + the trained VAE, as an LDM fp32 checkpoint."""
    import torch

    from baka.models.config import MAKERS
    from baka.models.convert import diffusers_to_ldm
    from baka.models.io import save_checkpoint

    cfg = world_config()
    torch.manual_seed(seed)
    comps = {c: MAKERS[c](getattr(cfg, c)).state_dict() for c in ("unet", "text_encoder")}
    # Zero-initialised residual branches (attention out_proj, MLP fc2) make the untrained text encoder
    # the identity on (token + position) embeddings, so every caption word starts as a distinct vector;
    # a random 12-layer encoder maps all captions to nearly the same states (cosine 0.98-0.998).
    for k, v in comps["text_encoder"].items():
        if ".self_attn.out_proj." in k or ".mlp.fc2." in k:
            v.zero_()
    comps["vae"] = vae_sd
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
    ``extra`` adds top-level keys (values as TOML literals)."""
    more = "".join(f"{k} = {v}\n" for k, v in (extra or {}).items())
    text = f"""# written by baka.world.build
model = "{model}"
output_dir = "{out / name}"
output_name = "{name}"
mode = "full"
max_steps = {steps}
learning_rate = {lr}
train_text_encoder = true
text_encoder_lr = {lr / 2}
freeze_embeddings = false
freeze_final_layer_norm = false
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
sample_every = 500

[[datasets]]
resolution = 64
enable_bucket = false
batch_size = {BATCH}
validation_split = 0.0

  [[datasets.subsets]]
  image_dir = "{data}"
  caption_extension = ".txt"
  caption_dropout_rate = 0.1
"""
    path = out / f"{name}.toml"
    path.write_text(text)
    return path


def run_train(toml: Path) -> None:
    """``baka train TOML`` in a subprocess, exactly as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "baka", "train", str(toml)], check=True, env=env)


CARDS = {
    "world-flat": "epsilon-prediction base model of the shapes world, flat fills",
    "world-striped": "world-flat fine-tuned on the striped style (hatched fills + outlines)",
    "world-vpred-ztsnr": "world-flat fine-tuned to v-prediction with zero-terminal-SNR betas",
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
            "modelspec.title": name,
            "modelspec.description": CARDS[name],
            "modelspec.author": "baka (procedural, trained from scratch)",
            "modelspec.license": "MIT",
            "modelspec.resolution": "64x64",
            "modelspec.prediction_type": "v" if vpred else "epsilon",
            "baka_world": json.dumps(stats, sort_keys=True),
            "baka_zero_terminal_snr": str(vpred),
        }
    )
    if vpred:
        meta["modelspec.noise_schedule"] = "zero_terminal_snr"
    path = save_checkpoint(tensors, dest / f"{name}.safetensors", metadata=meta)
    card = [
        f"# {name}",
        "",
        CARDS[name] + ".",
        "",
        "SD1.x topology (exact SD1.5 LDM keys, 26 merge blocks) at toy width; 64x64 images, 8x8 latents.",
        "Trained from scratch on baka's procedural shapes world (`baka world render`), no external data.",
        "Reproduce: `make world`. Evaluate: `baka world eval " + name + "`.",
        "",
        "```json",
        json.dumps(stats, indent=2, sort_keys=True),
        "```",
        "",
    ]
    (dest / f"{name}.md").write_text("\n".join(card))
    return path


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baka.world.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build/world", help="work folder (datasets, runs)")
    p.add_argument("--dest", default=str(WEIGHTS_DIR), help="where the shipped fp16 files go")
    p.add_argument(
        "--only", choices=["vae", "flat", "striped", "vpred", "ship"], help="stop after this stage"
    )
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(THREADS))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    sets = render_sets(out)
    init = out / "init.safetensors"
    if not init.exists():
        vae_sd = _vae_phases(out, [sets["flat"], sets["striped"]])
        build_init(out, vae_sd)
    if a.only == "vae":
        return 0

    def trained(name: str) -> Path:
        return out / name / f"{name}.safetensors"

    flat = sets["flat"]
    stages: list[tuple[str, Path, Path, int, float, bool, dict | None]] = [
        # world-flat is five consecutive baka train runs: a-c at falling constant LR (build 2's recipe),
        # then d (high t only) and e (full range) with v_pred_like_loss and a cosine schedule
        ("world-flat-a", init, flat, FLAT_STEPS, 1e-3, False, None),
        ("world-flat-b", trained("world-flat-a"), flat, FLAT2_STEPS, 5e-4, False, None),
        ("world-flat-c", trained("world-flat-b"), flat, FLAT3_STEPS, 3e-4, False, None),
        (
            "world-flat-d",
            trained("world-flat-c"),
            flat,
            HIGHT_STEPS,
            3e-4,
            False,
            {**LATE_KEYS, "min_timestep": 600},
        ),
        ("world-flat", trained("world-flat-d"), flat, MIX_STEPS, 3e-4, False, LATE_KEYS),
        ("world-striped", trained("world-flat"), sets["striped"], STRIPED_STEPS, 3e-4, False, None),
        ("world-vpred-ztsnr", trained("world-flat"), flat, VPRED_STEPS, 3e-4, True, None),
    ]
    for name, model, data, steps, lr, vpred, extra in stages:
        if not trained(name).exists():
            t = time.time()
            _log(f"baka train {name}: {steps} steps from {model.name}")
            run_train(train_toml(out, name, model, data, steps, lr=lr, v_pred=vpred, extra=extra))
            timings[f"{name}_s"] = round(time.time() - t)
            (out / name / "time.json").write_text(json.dumps({"seconds": timings[f"{name}_s"]}))
        if a.only and name.endswith(a.only):
            break
    vae_logs = [json.loads(f.read_text()) for f in sorted(out.glob("vae*_losses.json"))]
    vae_stats = {
        "vae_steps": sum(len(v["loss"]) for v in vae_logs),
        "vae_seconds": sum(v["seconds"] for v in vae_logs),
        "vae_loss_last": round(sum(vae_logs[-1]["loss"][-50:]) / 50, 4),
    }
    for name, *_ in stages:
        if name in CARDS and trained(name).exists():
            stats = {**vae_stats, **_losses(out, name)}
            if name == "world-flat":  # the earlier runs
                stats["earlier_runs"] = [
                    {
                        **_losses(out, r),
                        "train_seconds": json.loads((out / r / "time.json").read_text())["seconds"],
                    }
                    for r in ("world-flat-a", "world-flat-b", "world-flat-c", "world-flat-d")
                ]
            tf = out / name / "time.json"
            if tf.exists():
                stats["train_seconds"] = json.loads(tf.read_text())["seconds"]
            ship(out, name, stats, Path(a.dest))
            _log(f"shipped {name}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
