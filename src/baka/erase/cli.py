"""``baka erase``."""

from __future__ import annotations

import argparse

from baka._cli import args, command, print_config


def _erase_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="SD1.x checkpoint to edit")
    p.add_argument("concept", help="the concept prompt to erase, e.g. 'Van Gogh'")
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    p.add_argument("-m", "--method", default="ESD-x", help="ESD-x | ESD-u | ESD-x-strict")
    p.add_argument("--eta", type=float, default=1.0, help="negative guidance strength")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta-only", action="store_true", help="write only the changed weights")


@command("erase", "erase a concept from a model (ESD-x / ESD-u / ESD-x-strict)")
@args(_erase_args)
def cmd_erase(a: argparse.Namespace) -> int:
    from baka.erase.esd import ERASE_METHODS, EraseConfig, erase

    cfg = EraseConfig(
        a.concept, ERASE_METHODS.canonical(a.method), a.eta, a.iterations, a.lr, a.ddim_steps, seed=a.seed
    )
    print_config(
        "erase",
        {
            **cfg.__dict__,
            "model": a.model,
            "output": a.output,
            "delta_only": a.delta_only,
            "parameters": ERASE_METHODS.get(a.method).__doc__,
        },
    )
    path = erase(a.model, cfg, a.output, delta_only=a.delta_only)
    print(f"wrote {path}")
    return 0
