"""ESD on the shapes world with another method or learning rate than the shipped ``world-no-red``
(issue #10 names ESD-x and ESD-u). Each run is ``baka erase`` on the shipped world-flat (or
``--model``) with the build's 16 red captions and arguments (``baka.world.build.ESD_PROMPTS`` /
``ESD_ARGS``), ``--method`` and ``--lr`` replaced; the erased checkpoint is judged as ``world_claims.py``
judges the LoRA. One command, fixed seeds; ~7-8 min per ESD-u run on 2 cores (an existing output is
judged again, not retrained; its erase time is shown only if this script made it).

    .venv/bin/python bench/world_esd.py [--method ESD-u] [--lr 5e-4 1e-3] [--n 24] [--out build/world-esd]
        [--model world-flat] [--preserve WEIGHT] [--iterations N] [--network-dim R [--conv-dim R]]

``--preserve WEIGHT`` adds ``baka erase --preserve`` with the build's ``ESD_PRESERVE`` captions (4 training
captions of each other colour) at that retain weight. ESD-u meets the issue's target (red captions <= 20%
red, other colours >= 85%) with ``--lr 1e-3 --iterations 3000 --preserve 4`` (12% / 88%, ~53 min on one
core; docs/benchmarks.md). ``--network-dim`` trains a LoRA (``baka erase --network-dim``) instead of
editing the weights; it is judged on the model at weight 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ESD-u", help="baka erase --method")
    ap.add_argument("--lr", nargs="+", default=["5e-4", "1e-3"], help="one run per learning rate")
    ap.add_argument("--n", type=int, default=24, help="seeds / red captions / other captions judged")
    ap.add_argument("--out", default="build/world-esd", help="where the erased checkpoints go")
    ap.add_argument("--model", default="world-flat", help="the model erased (a path or a shipped name)")
    ap.add_argument("--preserve", type=float, default=0.0, help="retain weight on ESD_PRESERVE (0: none)")
    ap.add_argument("--iterations", help="baka erase --iterations (default: ESD_ARGS')")
    ap.add_argument("--network-dim", help="baka erase --network-dim: train a LoRA, judged at weight 1")
    ap.add_argument("--conv-dim", help="baka erase --conv-dim (with --network-dim)")
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args()
    from world_claims import esd_figures, md_table

    from baka.generate.engine import Generator
    from baka.models.shipped import shipped_path
    from baka.world.build import ESD_ARGS, ESD_CONCEPT, ESD_PRESERVE, ESD_PROMPTS, erase_in_context

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, figures = [], {}
    for lr in a.lr:
        args = dict(zip(ESD_ARGS[::2], ESD_ARGS[1::2], strict=True))  # every option takes a value
        args.update({"--method": a.method, "--lr": lr})
        if a.iterations:
            args["--iterations"] = a.iterations
        if a.preserve:
            args.update(
                {"--preserve": args["--separator"].join(ESD_PRESERVE), "--preserve-weight": str(a.preserve)}
            )
        tags = f"{f'-it{a.iterations}' if a.iterations else ''}{f'-keep{a.preserve}' if a.preserve else ''}"
        if a.network_dim:
            args.update({"--network-dim": a.network_dim, "--conv-dim": a.conv_dim or "0"})
            tags += f"-lora{a.network_dim}c{a.conv_dim or 0}"
        erased = out / f"{a.method}-lr{lr}{tags}.safetensors"
        timing = erased.with_suffix(".json")  # the erase's wall time, kept for a later re-judging
        if not erased.exists():
            t = time.time()
            model = shipped_path(a.model) or Path(a.model)
            erase_in_context(model, erased, [x for kv in args.items() for x in kv])
            timing.write_text(json.dumps({"seconds": round(time.time() - t)}))
        seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
        if a.network_dim:  # the LoRA on the model it was trained on
            gen = Generator(a.model, lora_dirs=[out], progress=False)  # a shipped name works as a path
            m = esd_figures(gen, a.n, f"<lora:{erased.stem}:1>")
        else:
            m = esd_figures(Generator(erased, progress=False), a.n)
        m["erase_seconds"] = seconds
        figures[lr] = m
        cells = (m["word_share"], m["erased_share"], m["others_color_accuracy"])
        rows.append([lr, "-" if seconds is None else f"{seconds} s", *(f"{v:.0%}" for v in cells)])
        print(" | ".join(rows[-1]), flush=True)
    c = ESD_CONCEPT
    keep = f", `--preserve` {len(ESD_PRESERVE)} captions at {a.preserve}" if a.preserve else ""
    title = f"{a.method} erasing `{c}` ({len(ESD_PROMPTS)} captions{keep}, {a.n} seeds / captions)"
    header = ["lr", "erase time", f"prompt `{c}` drawn {c}", f"{c} captions drawn {c}", "other colours right"]
    print(md_table(title, header, rows))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
