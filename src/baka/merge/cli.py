"""``baka merge``, ``baka diff``, ``baka presets``, ``baka methods``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from baka._cli import args, command, print_config
from baka.errors import BakaError


def _read_arg(text: str | None) -> str | None:
    """``@file`` reads the text from a file (for elemental rules)."""
    if text and text.startswith("@"):
        try:
            return Path(text[1:]).read_text()
        except OSError as e:
            raise BakaError(f"{text[1:]}: cannot read ({e.strerror})") from None
    return text


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", help="model A, model B [, model C]")
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    p.add_argument("-m", "--method", default="weight_sum", help="merge method (see `baka methods`)")
    p.add_argument(
        "-a", "--alpha", default="0.5", help="alpha: one number, 25/26 comma-separated, or a preset name"
    )
    p.add_argument("-b", "--beta", default=None, help="beta, same forms as alpha (methods that use it)")
    p.add_argument(
        "--block", action="append", default=[], metavar="BLOCK=V", help="override one block's alpha"
    )
    p.add_argument(
        "--beta-block", action="append", default=[], metavar="BLOCK=V", help="override one block's beta"
    )
    p.add_argument(
        "--elemental", help="elemental rules 'Blocks:Elements:Ratio' (newline/comma separated, or @file)"
    )
    p.add_argument("--preset-file", action="append", default=[], help="extra preset TSV (supermerger format)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output dtype (default: model A's)")
    p.add_argument("--seed", type=int, default=0, help="seed for DARE and for R / U / X random block weights")
    p.add_argument("--gamma", type=float, default=0.3, help="extract: supermerger's option(gamma)")
    p.add_argument(
        "--adjust",
        help="supermerger's Adjust: IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3 (detail, colour, brightness offsets)",
    )
    p.add_argument("--recipe", help="replay a recipe (.json, or a merged .safetensors carrying one)")
    p.add_argument("--no-hash-inputs", action="store_true", help="do not record input sha256 in the metadata")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


@command("merge", "block-weighted merge of SD1.x checkpoints (streaming)")
@args(_merge_args)
def cmd_merge(a: argparse.Namespace) -> int:
    from baka.merge.engine import merge_models
    from baka.merge.methods import METHODS
    from baka.merge.presets import presets
    from baka.merge.recipe import Recipe
    from baka.merge.weights import BETA_OFFSET, describe_weights, parse_weights

    if a.recipe:
        recipe = Recipe.from_file(a.recipe)
        if a.models:
            recipe.models = list(a.models)
    else:
        if len(a.models) < 2:
            raise BakaError("merge needs at least models A and B (or --recipe)")
        method = METHODS.get(a.method)
        reg = presets(tuple(a.preset_file))
        alpha = parse_weights(a.alpha, overrides=a.block, presets=reg, base=None, seed=a.seed)
        beta_spec = a.beta if a.beta is not None else method.beta_default
        beta = parse_weights(beta_spec, overrides=a.beta_block, presets=reg, seed=a.seed, offset=BETA_OFFSET)
        recipe = Recipe(
            method.name,
            list(a.models),
            alpha,
            beta,
            _read_arg(a.elemental) or "",
            a.seed,
            a.dtype,
            gamma=a.gamma,
            adjust=a.adjust or "",
        )
    method = METHODS.get(recipe.method)
    cfg: dict[str, object] = {
        "method": method.name,
        "formula": method.doc,
        "A": recipe.models[0],
        "B": recipe.models[1],
    }
    if len(recipe.models) > 2:
        cfg["C"] = recipe.models[2]
    cfg["alpha"] = describe_weights(recipe.alpha)
    if method.uses_beta:
        cfg["beta"] = describe_weights(recipe.beta)
    cfg |= {
        "elemental": recipe.elemental.strip().replace("\n", " | ") or "-",
        "adjust": recipe.adjust or "-",
        "dtype": recipe.dtype or "as A",
        "seed": recipe.seed,
        "output": a.output,
    }
    print_config("merge", cfg)
    res = merge_models(recipe, a.output, progress=not a.quiet, hash_inputs=not a.no_hash_inputs)
    print(
        f"wrote {res.path}: {res.keys} tensors, {res.copied_from_a} taken unchanged from A"
        + (f", {len(res.dropped)} non-model keys dropped" if res.dropped else "")
        + (f", {len(res.filled_from_b)} keys model A lacks taken from B" if res.filled_from_b else "")
    )
    return 0


def _diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--png", help="write a heatmap PNG here")
    p.add_argument("--json", action="store_true")


@command("diff", "per-block cosine similarity / relative change of two models, optional heatmap PNG")
@args(_diff_args)
def cmd_diff(a: argparse.Namespace) -> int:
    from baka.merge.diff import block_diff, format_table, heatmap_png

    stats = block_diff(a.a, a.b, progress=True)
    if a.json:
        print(json.dumps([s.__dict__ for s in stats], indent=2))
    else:
        print(format_table(stats))
    if a.png:
        heatmap_png(stats, a.png, f"{Path(a.a).name} vs {Path(a.b).name}")
        print(f"wrote {a.png}")
    return 0


def _presets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset-file", action="append", default=[], help="also list presets of this TSV")


@command("presets", "list block-weight presets")
@args(_presets_args)
def cmd_presets(a: argparse.Namespace) -> int:
    from baka.merge.presets import presets
    from baka.merge.weights import format_weights

    reg = presets(tuple(a.preset_file))
    for name in reg.names():
        print(f"{name:<28} {format_weights(reg.get(name))}")
    return 0


@command("methods", "list merge methods and their formulas")
def cmd_methods(a: argparse.Namespace) -> int:
    from baka.merge.methods import METHODS

    for name in METHODS.names():
        m = METHODS.get(name)
        need = "A,B,C" if m.needs_c else "A,B"
        print(f"{name:<22} {need:<6} {'alpha,beta' if m.uses_beta else 'alpha':<11} {m.doc}")
    return 0
