"""``baka merge probe`` and ``baka merge search`` (also spelled ``merge-probe`` / ``merge-search``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from baka._cli import args, command, print_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_a", help="model A (alpha 0)")
    p.add_argument("model_b", help="model B (alpha 1)")
    p.add_argument(
        "--score",
        default="world",
        help="scorer: world, image-diff, or module:function / file.py:function taking (images, prompts)",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt to render (repeatable)")
    p.add_argument("--prompts-file", help="prompts, one per line")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M Karras")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--width", type=int, default=512, help="(the world scorer renders at 64)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="prompt i, image k uses seed + 1000 i + k")
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--device", help="torch device (default: the generator's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _settings(a: argparse.Namespace):
    """The render settings as the scorer will use them (its own prompts and size where it has them)."""
    from baka.errors import BakaError
    from baka.tune.scorers import RenderSettings, get_scorer

    prompts = list(a.prompt)
    if a.prompts_file:
        try:
            prompts += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise BakaError(f"{a.prompts_file}: cannot read ({e.strerror})") from None
    s = RenderSettings(
        prompts, a.negative, a.steps, a.sampler, a.cfg, a.width, a.height, a.seed, a.per_prompt
    )
    return s, s.for_scorer(get_scorer(a.score))


def _shown(s) -> dict:
    shown = dict(s.__dict__)
    if len(s.prompts) > 3:
        shown["prompts"] = [*s.prompts[:3], f"... {len(s.prompts)} prompts"]
    return shown


def _method_args(p: argparse.ArgumentParser) -> None:
    # any method runs at run time; cosineA / cosineB first make their pass over the two files
    p.add_argument(
        "-m",
        "--method",
        default="weight_sum",
        help="merge method (any; cosine_a / cosine_b first scan both files)",
    )
    p.add_argument("--model-c", help="model C, for methods that take one (add difference, TIES...)")
    p.add_argument("--beta", type=float, help="the method's beta in every block (default: its own)")


def _probe_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _method_args(p)
    p.add_argument("--blocks", help="comma-separated blocks to probe (default: all 26)")
    p.add_argument("--weight", type=float, default=1.0, help="B's weight in the probed block")
    p.add_argument(
        "--mode",
        choices=["single", "leave-out"],  # baka.tune.probe.MODES
        default="single",
        help="single: each block of B alone; leave-out: all of B but that block",
    )
    p.add_argument("--png", help="write the block x figure heatmap (one U per figure)")
    p.add_argument("--json", help="write every figure as JSON")


@command("merge-probe", "what each block carries: merge one block of B at a time and score the pictures")
@args(_probe_args)
def cmd_probe(a: argparse.Namespace) -> int:
    from baka.tune.probe import probe_blocks, probe_png

    s, shown = _settings(a)
    print_config("merge probe", {"model_a": a.model_a, "model_b": a.model_b, "score": a.score,
                                 "blocks": a.blocks or "all", "weight": a.weight, "mode": a.mode,
                                 "method": a.method, "model_c": a.model_c, "beta": a.beta,
                                 **_shown(shown)})  # fmt: skip
    r = probe_blocks(
        a.model_a,
        a.model_b,
        a.score,
        s,
        blocks=a.blocks.split(",") if a.blocks else None,
        weight=a.weight,
        mode=a.mode,
        method=a.method,
        model_c=a.model_c,
        beta=a.beta,
        device=a.device,
        progress=not a.quiet,
    )
    print(r.table())
    if a.png:
        print(f"wrote {probe_png(r, a.png)}")
    if a.json:
        from baka.models.safetensors_io import atomic_output

        with atomic_output(a.json) as tmp:
            tmp.write_text(r.to_json())
        print(f"wrote {a.json}")
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--trials", type=int, default=50, help="the study's total trials (a resume runs the rest)")
    p.add_argument("--study", default="search.db", help="SQLite file holding the study (resumable)")
    p.add_argument("--study-name", help="(default: A+B:scorer)")
    p.add_argument("--objective", help="the figure to optimise (default: the scorer's)")
    p.add_argument("--minimize", action="store_true", help="minimise the figure instead")
    p.add_argument("--blocks", help="comma-separated blocks to search (default: all 26)")
    p.add_argument("--fixed", type=float, default=0.0, help="weight of the blocks not searched")
    p.add_argument("--step", type=float, default=0.05, help="weight grid step (0: continuous)")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler")
    _method_args(p)
    p.add_argument("--search-beta", action="store_true", help="search each block's beta too")
    p.add_argument("-o", "--output", help="also write the best merge to this .safetensors")


@command("merge-search", "Bayesian search of the block weights (optuna TPE) for the best scorer figure")
@args(_search_args)
def cmd_search(a: argparse.Namespace) -> int:
    from baka.tune.search import search_weights

    s, shown = _settings(a)
    cfg = {"model_a": a.model_a, "model_b": a.model_b, "score": a.score, "trials": a.trials,
           "study": a.study, "objective": a.objective or "(scorer's)", "minimize": a.minimize,
           "blocks": a.blocks or "all", "fixed": a.fixed, "step": a.step, "search_seed": a.search_seed,
           "method": a.method, "model_c": a.model_c, "beta": a.beta, "search_beta": a.search_beta,
           **_shown(shown)}  # fmt: skip
    print_config("merge search", cfg)
    r = search_weights(
        a.model_a,
        a.model_b,
        a.score,
        s,
        trials=a.trials,
        study=a.study,
        study_name=a.study_name,
        objective=a.objective,
        minimize=a.minimize,
        blocks=a.blocks.split(",") if a.blocks else None,
        fixed=a.fixed,
        step=a.step or None,
        seed=a.search_seed,
        output=a.output,
        device=a.device,
        progress=not a.quiet,
        method=a.method,
        model_c=a.model_c,
        beta=a.beta,
        search_beta=a.search_beta,
    )
    print(f"best {r.best_value:.4f} after {r.trials} trials: " + ",".join(f"{w:g}" for w in r.best_weights))
    print("figures: " + ", ".join(f"{k}={v:.4f}" for k, v in r.best_figures.items()))
    print(f"wrote {r.recipe} and {r.plot}" + (f" and {r.model}" if r.model else ""))
    return 0
