"""``baka demo``: the main job on built-in tiny SD1.x models, end to end and offline.

Builds two tiny models, merges them with a supermerger preset (streaming), replays the recipe from
the output's metadata, checks the replay is byte-identical, writes a per-block diff heatmap, and
renders a preview grid of the merged model (A1111 prompt syntax, FreeU off/on) with infotext.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from baka._cli import args, command, print_config


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="folder for the demo files")
    p.add_argument("--preset", default="GRAD_V", help="block-weight preset for the merge")


@command("demo", "run the block-merge workflow on built-in tiny models")
@args(_demo_args)
def cmd_demo(a: argparse.Namespace) -> int:
    from baka.merge.diff import block_diff, format_table, heatmap_png
    from baka.merge.engine import merge_models
    from baka.merge.recipe import Recipe
    from baka.merge.weights import parse_weights
    from baka.models.hashes import addnet_hash
    from baka.models.info import describe
    from baka.models.io import save_checkpoint
    from baka.models.tiny import tiny_checkpoint

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print_config(
        "demo", {"out": str(out), "preset": a.preset, "models": "tiny SD1.x topology, seeds 1 and 2"}
    )
    paths = []
    for seed in (1, 2):
        p = out / f"tiny-{seed}.safetensors"
        save_checkpoint(tiny_checkpoint(seed), p)
        paths.append(str(p))
    info = describe(paths[0], hashes=False)
    print(f"built {paths[0]}, {paths[1]}: {info['keys']} keys each, kind {info['kind']} ({info.get('size')})")

    recipe = Recipe("weight_sum", paths, parse_weights(a.preset), parse_weights(0.0))
    merged = out / f"merged-{a.preset}.safetensors"
    res = merge_models(recipe, merged, progress=False)
    print(f"merged with {a.preset}: {res.path} ({res.keys} tensors)")

    replay = out / "replayed.safetensors"
    merge_models(Recipe.from_file(merged), replay, progress=False)
    same = addnet_hash(merged) == addnet_hash(replay)
    print(f"replayed recipe from metadata: tensors identical = {same}")

    stats = block_diff(paths[0], merged)
    print(format_table(stats))
    png = heatmap_png(stats, out / "diff-A-vs-merged.png", f"A vs {merged.name}")
    print(f"heatmap: {png}")

    from baka.generate.engine import Generator, GenParams
    from baka.generate.grid import GridContext, run_grid
    from baka.models.safetensors_io import atomic_output

    gen = Generator(merged, progress=False)
    params = GenParams("a (cat:1.2) on a mat, masterpiece", "lowres", steps=8, width=64, height=64, seed=1)
    grid, rows = run_grid(GridContext(gen), params, "seed=1,2,3", "freeu=off|sd1-v2", progress=False)
    with atomic_output(out / "preview-grid.png") as tmp:
        grid.save(tmp, format="PNG")
    first = rows[0][0].save(out / "preview-1.png")
    print(f"preview: {out / 'preview-grid.png'} (seeds x FreeU off/on); {first} carries infotext:")
    print("  " + rows[0][0].infotext.replace("\n", "\n  "))
    return 0 if same else 1
