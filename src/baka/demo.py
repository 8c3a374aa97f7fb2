"""``baka demo``: the main job on the shipped shapes-world models, end to end and offline.

Merges ``world-flat`` (base) with ``world-striped`` by a supermerger preset (streaming, to a file),
replays the recipe from the output's metadata, checks the replay is byte-identical, writes a
per-block diff heatmap, then renders a preview grid (prompts x block weights through the runtime merge:
flat, the preset, striped) judged by :mod:`baka.world.score`, and one picture of the merged file with
its A1111 infotext. With the default preset (OUT12: the OUT blocks from striped) the stripes come
with the OUT blocks while the shapes stay those of the prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from baka._cli import args, command, print_config

A, B = "world-flat", "world-striped"
PROMPTS = ("red circle", "yellow square", "orange triangle", "purple circle")
BASE_PROMPT = "red circle, blue background, large, center"


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="folder for the demo files")
    p.add_argument(
        "--preset", default="OUT12", help="block-weight preset for the merge (alpha = weight of B)"
    )


@command("demo", "run the block-merge workflow on the shipped shapes-world models")
@args(_demo_args)
def cmd_demo(a: argparse.Namespace) -> int:
    from baka.errors import BakaError
    from baka.merge.diff import block_diff, format_table, heatmap_png
    from baka.merge.engine import merge_models
    from baka.merge.recipe import Recipe
    from baka.merge.weights import parse_weights
    from baka.models.hashes import addnet_hash
    from baka.models.shipped import shipped_path

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print_config("demo", {"out": str(out), "preset": a.preset, "A (base)": A, "B": B})
    files = [shipped_path(m) for m in (A, B)]
    if None in files:
        raise BakaError(
            "the shapes-world models are missing from the package; rebuild them with `make world`"
        )
    paths = [str(f) for f in files]

    recipe = Recipe("weight_sum", paths, parse_weights(a.preset), parse_weights(0.0))
    merged = out / f"world-merged-{a.preset}.safetensors"
    res = merge_models(recipe, merged, progress=False)
    print(f"merged {A} + {B} with {a.preset}: {res.path} ({res.keys} tensors)")

    replay = out / "replayed.safetensors"
    merge_models(Recipe.from_file(merged), replay, progress=False)
    same = addnet_hash(merged) == addnet_hash(replay)
    print(f"replayed recipe from metadata: tensors identical = {same}")

    stats = block_diff(paths[0], merged)
    print(format_table(stats))
    png = heatmap_png(stats, out / "diff-A-vs-merged.png", f"{A} vs {merged.name}")
    print(f"heatmap: {png}")

    from baka.generate.engine import Generator, GenParams
    from baka.generate.grid import GridContext, run_grid
    from baka.models.safetensors_io import atomic_output
    from baka.world.score import read_image

    params = GenParams(BASE_PROMPT, steps=20, sampler="DPM++ 2M Karras", cfg=7, width=64, height=64, seed=1)
    blocks = ("ALL_A", a.preset, "ALL_B")
    ctx = GridContext.with_merge(Generator(A, progress=False), B)
    grid, rows = run_grid(
        ctx, params, "sr=" + ",".join(PROMPTS), "blocks=" + "|".join(blocks), progress=False
    )
    with atomic_output(out / "preview-grid.png") as tmp:
        grid.resize((grid.width * 2, grid.height * 2)).save(tmp, format="PNG")
    print(f"preview: {out / 'preview-grid.png'} (prompts x blocks {A} / {a.preset} / {B}); the judge reads:")
    for name, row in zip(blocks, rows, strict=True):
        seen = [read_image(r.image) for r in row]
        shapes = ", ".join(f"{r.main.color} {r.main.shape}" if r.main else "nothing" for r in seen)
        texture = sum(r.texture_energy for r in seen) / len(seen)
        print(f"  {name:<8} texture energy {texture:.4f}: {shapes}")
    one = Generator(merged, progress=False)(params)[0]
    print(f"{one.save(out / 'preview-1.png')} (the merged file) carries infotext:")
    print("  " + one.infotext.replace("\n", "\n  "))
    return 0 if same else 1
