"""The star LoRA with kohya's dropouts and a per-block dropout schedule switched on (issue #10): each
variant trained with ``baka train`` exactly as ``make world`` trains the shipped ``world-star``, then
judged on the same star prompts. One command, fixed seeds; takes ~7 min per variant on 2 cores.

    .venv/bin/python bench/world_lora_dropout.py [--out build/world-lora] [--steps 2000] [--n 24]

Needs ``build/world/world-flat`` (``make world``) or falls back to the shipped world-flat.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# the lowest-resolution attention blocks (layout / shape) rest half the steps early on, none at the end
LOW_RES = ("IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05")
VARIANTS: dict[str, tuple[dict, dict]] = {  # name -> ([network] keys, top-level keys)
    "baseline": ({}, {}),
    "network_dropout 0.1": ({"dropout": 0.1}, {}),
    "rank_dropout 0.1": ({"rank_dropout": 0.1}, {}),
    "module_dropout 0.1": ({"module_dropout": 0.1}, {}),
    "block dropout IN07-OUT05 0.5 -> 0": (
        {},
        {"block_dropout": "{ " + ", ".join(f'{b} = "0:0.5, 2000:0"' for b in LOW_RES) + " }"},
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/world-lora", help="work folder (data, runs)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--n", type=int, default=24, help="star prompts judged per variant")
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args()
    from world_claims import md_table

    from baka.generate.engine import Generator
    from baka.models.shipped import shipped_path
    from baka.world.build import STAR_IMAGES, STAR_SEED, lora_toml, run_train
    from baka.world.eval import star_scores
    from baka.world.render import render_folder

    out = Path(a.out).resolve()
    built = Path("build/world/world-flat/world-flat.safetensors").resolve()
    base = built if built.is_file() else shipped_path("world-flat")
    data = out / "data" / "star"
    if not (data / f"{STAR_IMAGES - 1:05d}.txt").exists():
        render_folder(data, STAR_IMAGES, seed=STAR_SEED, split="star")
    gen = Generator("world-flat", lora_dirs=[out / f"star{i}" for i in range(len(VARIANTS))], progress=False)
    rows, figures = [], {}
    for i, (name, (network, extra)) in enumerate(VARIANTS.items()):
        tag = f"star{i}"
        lora = out / tag / f"{tag}.safetensors"
        t = time.time()
        if not lora.exists():
            run_train(lora_toml(out, tag, base, data, steps=a.steps, network=network, extra=extra))
        m = star_scores(gen, a.n, lora=f"<lora:{tag}:1>")
        loss = json.loads((out / tag / "losses.json").read_text())["train"]
        m["final_loss"] = round(sum(loss[-100:]) / len(loss[-100:]), 4)
        m["seconds"] = round(time.time() - t)
        figures[name] = m
        rows.append([name, f"{m['star_share']:.0%}", f"{m['color_accuracy']:.0%}", m["final_loss"]])
        print(" | ".join(map(str, rows[-1])), flush=True)
    title = f"Star LoRA with dropouts ({a.steps} steps, {a.n} large-star prompts, CFG 7)"
    print(md_table(title, ["variant", "stars", "colour", "train loss (last 100 steps)"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
