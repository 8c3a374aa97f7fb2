"""``baka erase``."""

from __future__ import annotations

import argparse

from baka._cli import args, command, print_config


def _erase_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="SD1.x checkpoint to edit")
    p.add_argument("concept", help="the concept prompt to erase, e.g. 'Van Gogh'")
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    p.add_argument(
        "-m",
        "--method",
        default="ESD-x",
        help="parameters to train: ESD-x (xattn), ESD-u (noxattn), ESD-x-strict, selfattn, full, notime,"
        " xlayer, selflayer",
    )
    p.add_argument(
        "--preset",
        default="paper",
        help="settings the options below override: paper (1000 iterations, lr 1e-5, eta 1) or esd-2025"
        " (the 2025 release: 200 iterations, lr 5e-5, eta 2, x_t sampled with the original model)",
    )
    p.add_argument("--eta", type=float, help="negative guidance strength (preset's)")
    p.add_argument("--iterations", type=int, help="(preset's)")
    p.add_argument("--lr", type=float, help="(preset's)")
    p.add_argument("--ddim-steps", type=int, help="(preset's)")
    p.add_argument("--start-guidance", type=float, help="CFG while sampling x_t (preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--separator",
        help="the concept is several prompts split at this string (e.g. '|'), one drawn per iteration,"
        " as the original train-esd.py's --seperator (default: one prompt)",
    )
    p.add_argument(
        "--preserve",
        help="prompts the edit must leave as the original draws them (split at --separator like the"
        " concept); adds a retain term on them, not in ESD (default: none)",
    )
    p.add_argument(
        "--preserve-weight", type=float, default=1.0, help="weight of the retain term (with --preserve)"
    )
    p.add_argument(
        "--preserve-batch",
        type=int,
        help="preserved prompts per iteration, drawn at random (default: all; fewer bound memory)",
    )
    p.add_argument(
        "--network-dim",
        type=int,
        help="train a kohya LoRA of this rank (alpha = rank) on the method's layers and write it as a"
        " LoRA file, instead of editing the weights (LECO's way) (default: edit the weights)",
    )
    p.add_argument(
        "--conv-dim",
        type=int,
        default=0,
        help="with --network-dim: the LoRA's rank on the 3x3 convs (ESD-u's resnets); 0: none",
    )
    p.add_argument(
        "--save-precision",
        default="float",
        help="with --network-dim: the LoRA file's dtype, kohya's names: float (fp32), fp16, bf16",
    )
    p.add_argument("--delta-only", action="store_true", help="write only the changed weights")


@command("erase", "erase a concept from a model (ESD-x / ESD-u / ESD-x-strict / ...)")
@args(_erase_args)
def cmd_erase(a: argparse.Namespace) -> int:
    from baka.erase.esd import ERASE_METHODS, PRESETS, EraseConfig, erase

    given = {
        k: v
        for k, v in {
            "eta": a.eta,
            "iterations": a.iterations,
            "lr": a.lr,
            "ddim_steps": a.ddim_steps,
            "start_guidance": a.start_guidance,
        }.items()
        if v is not None
    }
    settings = {**PRESETS.get(a.preset), **given}
    cfg = EraseConfig(
        a.concept,
        ERASE_METHODS.canonical(a.method),
        seed=a.seed,
        separator=a.separator,
        preserve=a.preserve,
        preserve_weight=a.preserve_weight,
        preserve_batch=a.preserve_batch,
        network_dim=a.network_dim,
        conv_dim=a.conv_dim,
        save_precision=a.save_precision,
        **settings,
    )
    cfg.prompts()  # an empty split fails here, before the model loads
    cfg.preserved()
    print_config(
        "erase",
        {
            **cfg.__dict__,
            "preset": PRESETS.canonical(a.preset),
            "model": a.model,
            "output": a.output,
            "delta_only": a.delta_only,
            "parameters": ERASE_METHODS.get(a.method).__doc__,
        },
    )
    path = erase(a.model, cfg, a.output, delta_only=a.delta_only)
    print(f"wrote {path}")
    return 0
