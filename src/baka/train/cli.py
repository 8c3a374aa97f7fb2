"""``baka train CONFIG.toml`` (also under ``accelerate launch -m baka.cli train ...``)."""

from __future__ import annotations

import argparse
import dataclasses

from baka._cli import args, command, print_config


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training TOML (kohya dataset tables accepted, or dataset_config = FILE)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--max-steps", type=int, help="override max_steps")
    p.add_argument("--output-dir", help="override output_dir")


@command("train", "full fine-tune, LoRA or textual-inversion training from a TOML config")
@args(_train_args)
def cmd_train(a: argparse.Namespace) -> int:
    from baka.train.config import load_config
    from baka.train.trainer import train

    overrides = {k: v for k, v in (("max_steps", a.max_steps), ("output_dir", a.output_dir)) if v is not None}
    cfg = load_config(a.config, overrides)
    flat = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("network", "dataset")}
    flat["network"] = dataclasses.asdict(cfg.network) if cfg.mode == "lora" else "-"
    flat["dataset"] = {k: v for k, v in dataclasses.asdict(cfg.dataset).items() if k != "subsets"}
    flat["subsets"] = [s.image_dir for s in cfg.dataset.subsets]
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print_config("train", flat | {"resume": a.resume})
    res = train(cfg, resume=a.resume)
    if res.output:  # main process only
        print(f"wrote {res.output} after {res.step} steps (final loss {res.losses[-1]:.4f})")
    return 0
