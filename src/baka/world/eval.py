"""``baka world eval``: a fixed prompt suite through the normal generator, judged by :mod:`baka.world.score`.

The suite is a function of its name only: single-shape scenes of the training distribution ("seen")
and scenes with a held-out colour/shape or colour/background pair ("held-out", never rendered for
training, see :mod:`baka.world.render`). Prompts are the scenes' full captions; image k of a prompt
uses seed + k, so every figure is reproducible.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from baka.world.render import Scene, sample_scene

SUITE_SEED = 1234  # the suite's scenes; independent of the training renders' seeds (0, 1)
SUITES = {  # name -> (seen prompts, held-out prompts, images per prompt)
    "quick": (12, 6, 1),
    "full": (60, 30, 2),
}
REPORT_KEYS = (
    "color_accuracy",
    "shape_accuracy",
    "background_accuracy",
    "size_accuracy",
    "position_accuracy",
    "mean_luminance",
    "texture_energy",
)


def suite_scenes(suite: str = "quick", style: str = "flat") -> list[tuple[Scene, bool]]:
    """(scene, held_out) pairs of a suite: single-shape scenes only (the judge's accuracies are per shape)."""
    from baka.errors import BakaError

    if suite not in SUITES:
        raise BakaError(f"unknown suite {suite!r} (quick or full)")
    n_seen, n_held, _ = SUITES[suite]
    out: list[tuple[Scene, bool]] = []
    for split, n, held in (("train", n_seen, False), ("heldout", n_held, True)):
        i = 0
        while sum(1 for _, h in out if h == held) < n:
            s = sample_scene(SUITE_SEED, i, style=style, split=split)
            i += 1
            if len(s.shapes) == 1:
                out.append((s, held))
    return out


@dataclass
class EvalResult:
    metrics: dict  # the JSON report
    pairs: list  # (Reading, Scene, held_out) per image


def _summary(pairs) -> dict[str, float]:
    from baka.world.score import score

    return {k: round(v, 4) for k, v in score([(r, s) for r, s, _ in pairs], REPORT_KEYS).items()}


def schedule_flags(gen, v_pred: bool | None, zero_snr: bool | None) -> tuple[bool, bool]:
    """v-prediction / zero-terminal-SNR as given, else as the model's modelspec metadata says."""
    meta = gen.ckpt.metadata if gen.ckpt is not None else {}
    if v_pred is None:
        v_pred = meta.get("modelspec.prediction_type") == "v"
    if zero_snr is None:
        zero_snr = meta.get("baka_zero_terminal_snr") == "True"
    return v_pred, zero_snr


def evaluate(
    model,
    *,
    suite: str = "quick",
    steps: int = 20,
    sampler: str = "DPM++ 2M Karras",
    cfg: float = 7.0,
    seed: int = 0,
    per_prompt: int | None = None,
    negative: str = "",
    v_pred: bool | None = None,
    zero_snr: bool | None = None,
    save: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate the suite with ``model`` (a path, a shipped name or a :class:`Generator`) and judge it.

    ``v_pred`` / ``zero_snr`` default to what the model's modelspec metadata says.
    """
    from tqdm import tqdm

    from baka.generate.engine import Generator, GenParams
    from baka.world.score import read_image

    gen = model if isinstance(model, Generator) else Generator(model, progress=False)
    v_pred, zero_snr = schedule_flags(gen, v_pred, zero_snr)
    scenes = suite_scenes(suite)
    k = per_prompt or SUITES[suite][2]
    pairs = []
    for i, (scene, held) in enumerate(tqdm(scenes, desc="eval", disable=not progress)):
        p = GenParams(
            scene.caption,
            negative,
            steps=steps,
            sampler=sampler,
            cfg=cfg,
            seed=seed + 1000 * i,
            width=64,
            height=64,
            batch=k,
            v_pred=v_pred,
            zero_snr=zero_snr,
        )
        for j, res in enumerate(gen(p)):
            pairs.append((read_image(res.image), scene, held))
            if save:
                res.save(Path(save) / f"{i:03d}-{j}{'-heldout' if held else ''}.png")
    metrics = {
        **_summary(pairs),
        "n_images": len(pairs),
        "seen": {**_summary([x for x in pairs if not x[2]]), "n_images": sum(not x[2] for x in pairs)},
        "held_out": {**_summary([x for x in pairs if x[2]]), "n_images": sum(bool(x[2]) for x in pairs)},
        "settings": {
            "model": str(gen.model),
            "suite": suite,
            "steps": steps,
            "sampler": sampler,
            "cfg": cfg,
            "seed": seed,
            "per_prompt": k,
            "v_pred": v_pred,
            "zero_snr": zero_snr,
        },
    }
    return EvalResult(metrics, pairs)


def images(
    gen,
    prompt: str,
    *,
    negative: str = "",
    n: int = 16,
    seed: int = 0,
    cfg: float = 7.0,
    steps: int = 20,
    sampler: str = "DPM++ 2M Karras",
    v_pred: bool | None = None,
    zero_snr: bool | None = None,
    freeu=None,
    emphasis: str = "Original",
) -> list:
    """``n`` 64x64 images of one prompt (image k uses seed + k). ``gen`` is a
    :class:`~baka.generate.engine.Generator`; ``v_pred`` / ``zero_snr`` default to the model's metadata,
    as in :func:`evaluate`; ``emphasis`` is A1111's emphasis mode."""
    from baka.generate.engine import GenParams

    v_pred, zero_snr = schedule_flags(gen, v_pred, zero_snr)
    p = GenParams(
        prompt,
        negative,
        steps=steps,
        sampler=sampler,
        cfg=cfg,
        seed=seed,
        width=64,
        height=64,
        batch=n,
        v_pred=v_pred,
        zero_snr=zero_snr,
        freeu=freeu,
        emphasis=emphasis,
    )
    return [r.image for r in gen(p)]


def readings(gen, prompt: str, **kw) -> list:
    """The judge's readings of :func:`images` (same arguments), for measured claims such as "a negative
    prompt removes what it names"."""
    from baka.world.score import read_image

    return [read_image(im) for im in images(gen, prompt, **kw)]


def color_strength(gen, prompt: str, color: str, background: str, **kw) -> list[float]:
    """:func:`baka.world.score.color_strength` of each of :func:`images` (same keywords): how much of
    ``color`` against ``background`` the shape shows, for A1111 emphasis (``(red:0.6)``)."""
    from baka.world.score import color_strength as strength

    return [strength(im, color, background) for im in images(gen, prompt, **kw)]


def color_share(rs: list, color: str) -> float:
    """Fraction of readings whose (first) shape has ``color``."""
    return sum(1 for r in rs if r.main is not None and r.main.color == color) / max(1, len(rs))


def shape_share(rs: list, shape: str) -> float:
    """Fraction of readings whose (first) shape is ``shape``."""
    return sum(1 for r in rs if r.main is not None and r.main.shape == shape) / max(1, len(rs))


def star_scores(gen, n: int = 24, lora: str = "", **kw) -> dict[str, float]:
    """The star claim: ``n`` star prompts (``split="star"`` scenes of the suite's seed, one image each,
    prompt k with seed 100 k), optionally with ``lora`` (e.g. ``"<lora:world-star:1>"``) appended.
    Returns the share of images the judge reads as stars and the colour / background accuracy."""
    from baka.world.score import score

    pairs = []
    for k in range(n):
        scene = sample_scene(SUITE_SEED, k, split="star")
        prompt = f"{scene.caption} {lora}".strip()
        pairs += [(r, scene) for r in readings(gen, prompt, n=1, seed=100 * k, **kw)]
    m = score(pairs, ("color_accuracy", "background_accuracy"))
    return {"star_share": shape_share([r for r, _ in pairs], "star"), **m, "n_images": len(pairs)}


def erase_scenes(color: str, n: int = 24) -> tuple[list, list]:
    """:func:`erase_scores`' prompts: ``n`` seen suite scenes whose shape is ``color`` and ``n`` that
    name ``color`` nowhere (as shape or background colour)."""
    scenes = [s for s, held in suite_scenes("full") if not held]
    asked = [s for s in scenes if s.shapes[0].color == color]
    # the full suite has ~10 scenes per colour: cycle through them with a new seed per prompt
    wanted = [asked[k % len(asked)] for k in range(n)]
    others = [s for s in scenes if color not in s.caption.replace(",", " ").split()][:n]
    return wanted, others


def erase_scores(gen, color: str, n: int = 24, lora: str = "", **kw) -> dict[str, float]:
    """The ESD claim (the paper's erased-class vs other-classes table): ``n`` seen suite prompts asking
    for ``color`` and ``n`` asking for other colours, one image each (prompt k with seed 100 k),
    optionally with ``lora`` appended (e.g. ``"<lora:world-no-red:1>"``). Returns the share of the
    ``color`` prompts' images the judge reads in ``color`` and the colour accuracy on the others
    (:func:`erase_scenes`; ``yellow square, red background`` asks for red too, so it is no "other")."""
    from baka.world.score import score

    wanted, others = erase_scenes(color, n)
    got = {}
    for name, group in (("erased", wanted), ("others", others)):
        got[name] = [
            (r, sc)
            for k, sc in enumerate(group)
            for r in readings(gen, f"{sc.caption} {lora}".strip(), n=1, seed=100 * k, **kw)
        ]
    return {
        "erased_share": color_share([r for r, _ in got["erased"]], color),
        "others_color_accuracy": score(got["others"], ("color_accuracy",))["color_accuracy"],
        "n_images": len(got["erased"]) + len(got["others"]),
    }


def colour_word_prompts(word: str, n: int = 16, avoid: str = "") -> list[str]:
    """Captions of ``n`` seen single-shape suite scenes (none in colour ``avoid``) with ``word`` where
    the colour was: for a textual-inversion embedding standing for a colour."""
    scenes = [s for s, held in suite_scenes("full") if not held and s.shapes[0].color != avoid][:n]
    return [s.caption.replace(s.shapes[0].color, word, 1) for s in scenes]


def format_table(m: dict) -> str:
    """The report as a fixed-width table: one row for all images, seen and held-out prompts."""
    cols = [
        ("color", "color_accuracy", "{:.0%}"),
        ("shape", "shape_accuracy", "{:.0%}"),
        ("background", "background_accuracy", "{:.0%}"),
        ("size", "size_accuracy", "{:.0%}"),
        ("position", "position_accuracy", "{:.0%}"),
        ("luminance", "mean_luminance", "{:.3f}"),
        ("texture", "texture_energy", "{:.4f}"),
        ("images", "n_images", "{}"),
    ]
    rows = [("all", m), ("seen", m["seen"]), ("held-out", m["held_out"])]
    lines = ["prompts   " + " ".join(f"{c:>10}" for c, _, _ in cols)]
    for name, r in rows:
        lines.append(f"{name:<9} " + " ".join(f"{f.format(r[k]):>10}" for _, k, f in cols))
    return "\n".join(lines)


def run_eval_cli(a: argparse.Namespace) -> int:
    """``baka world eval MODEL``."""
    from baka._cli import print_config

    settings = {
        "model": a.model,
        "suite": a.suite,
        "steps": a.steps,
        "sampler": a.sampler,
        "cfg": a.cfg,
        "seed": a.seed,
        "per_prompt": a.per_prompt or SUITES[a.suite][2],
        "negative": a.negative,
    }
    if not a.json:
        print_config("world eval", settings)
    res = evaluate(
        a.model,
        suite=a.suite,
        steps=a.steps,
        sampler=a.sampler,
        cfg=a.cfg,
        seed=a.seed,
        per_prompt=a.per_prompt,
        negative=a.negative,
        v_pred=True if a.v_pred else None,
        zero_snr=True if a.zero_snr else None,
        save=a.save,
        progress=not a.json,
    )
    if a.json:
        print(json.dumps(res.metrics, indent=2))
    else:
        print(format_table(res.metrics))
    return 0
