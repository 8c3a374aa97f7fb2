"""``baka world render`` / ``baka world eval``."""

from __future__ import annotations

import argparse

from baka._cli import args, command, print_config


def _world_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = sub.add_parser("render", help="write shapes-world images + .txt captions (kohya folder layout)")
    r.add_argument("--n", type=int, default=1000, help="number of images")
    r.add_argument("-o", "--out", required=True, help="output folder")
    r.add_argument("--style", choices=["flat", "striped"], default="flat")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--split",
        choices=["train", "heldout", "all", "star"],  # baka.world.render.SPLITS (numpy-free here)
        default="train",
        help="train: never the held-out combinations; heldout: only them; star: single stars (the"
        " reserved shape, for a LoRA)",
    )
    e = sub.add_parser("eval", help="generate a fixed prompt suite and judge it (no neural net judge)")
    e.add_argument("model", help="model file or shipped name (world-flat, world-striped, world-vpred-ztsnr)")
    e.add_argument("--suite", choices=["quick", "full"], default="quick")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--sampler", default="DPM++ 2M Karras", help="A1111 sampler name")
    e.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    e.add_argument("--seed", type=int, default=0, help="image k of a prompt uses seed + k")
    e.add_argument("--per-prompt", type=int, help="images per prompt (default: the suite's)")
    e.add_argument("--negative", default="", help="negative prompt")
    e.add_argument("--v-pred", action="store_true", help="the model predicts v (default: from its metadata)")
    e.add_argument("--zero-snr", action="store_true", help="zero terminal SNR (default: from its metadata)")
    e.add_argument("--save", help="also write the generated images to this folder")


@command("world", "the shapes world: render the dataset, evaluate a model trained on it")
@args(_world_args)
def cmd_world(a: argparse.Namespace) -> int:
    if a.action == "eval":
        from baka.world.eval import run_eval_cli

        return run_eval_cli(a)
    from baka.errors import BakaError
    from baka.world.render import render_folder

    if a.n < 1:
        raise BakaError(f"--n must be at least 1, not {a.n}")
    print_config("world render", {"n": a.n, "out": a.out, "style": a.style, "seed": a.seed, "split": a.split})
    rep = render_folder(a.out, a.n, seed=a.seed, style=a.style, split=a.split, progress=True)
    print(f"wrote {rep.n} images + captions to {rep.folder}")
    return 0
