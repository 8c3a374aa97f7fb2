"""Image scorers: a set of pictures (and the prompts that made them) -> named figures.

A scorer names the prompts and picture size it judges by default (the shapes world has its own suite)
and the figure a search maximises. Registered: ``world`` (the shapes-world judge, ``baka.world.score``:
colour / shape / background accuracy, luminance, texture energy) and ``image-diff`` (plain statistics
against model A's pictures at the same seeds, for real models). Any ``module:function`` or
``path/file.py:function`` taking ``(images, prompts)`` and returning a float or a dict of floats is a
scorer too, e.g. an aesthetic predictor the user has locally.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from baka.errors import BakaError
from baka.registry import Registry

Figures = dict[str, float]
ScoreFn = Callable[[list, list[str], list | None], Figures]  # images, prompts, A's images -> figures


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: ScoreFn
    objective: str = "score"  # the figure a search maximises by default
    prompts: tuple[str, ...] = ()  # its own prompt set (empty: the user's prompts)
    size: tuple[int, int] | None = None  # (width, height) it judges at, if fixed
    needs_reference: bool = False  # compares against model A's pictures at the same seeds
    doc: str = ""


SCORERS: Registry[Scorer] = Registry("scorer")


def _world(images: list, prompts: list[str], reference: list | None) -> Figures:
    from baka.world.score import read_image, score

    scenes = _world_scenes()
    per = len(images) // len(prompts)
    pairs = [(read_image(img), scenes[prompts[i // per]]) for i, img in enumerate(images)]
    keys = ("color_accuracy", "shape_accuracy", "background_accuracy", "mean_luminance", "texture_energy")
    out = score(pairs, keys)
    out["score"] = float(np.mean([out["color_accuracy"], out["shape_accuracy"], out["background_accuracy"]]))
    return out


def _world_scenes() -> dict:
    from baka.world.eval import suite_scenes

    return {s.caption: s for s, _ in suite_scenes("quick")}


def _world_prompts() -> tuple[str, ...]:
    return tuple(_world_scenes())


def _arrays(images: Sequence) -> np.ndarray:
    return np.stack([np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0 for img in images])


def _edges(x: np.ndarray) -> np.ndarray:
    luma = x @ np.array([0.299, 0.587, 0.114])
    return np.abs(np.diff(luma, axis=1))[:, :, :-1] + np.abs(np.diff(luma, axis=2))[:, :-1, :]


def _image_diff(images: list, prompts: list[str], reference: list | None) -> Figures:
    if reference is None or len(reference) != len(images):
        raise BakaError("image-diff needs model A's pictures at the same seeds")
    x, r = _arrays(images), _arrays(reference)
    luma = np.array([0.299, 0.587, 0.114])
    sat_x = x.max(axis=-1) - x.min(axis=-1)
    sat_r = r.max(axis=-1) - r.min(axis=-1)
    return {
        "pixel_diff": float(np.abs(x - r).mean()),  # mean |difference| per channel, [0, 1]
        "luma_shift": float((x @ luma).mean() - (r @ luma).mean()),
        "saturation_shift": float(sat_x.mean() - sat_r.mean()),
        "edge_shift": float(_edges(x).mean() - _edges(r).mean()),  # detail / texture gained
        "score": float(1.0 - np.abs(x - r).mean()),  # closeness to A
    }


SCORERS.add(
    "world",
    Scorer(
        "world",
        _world,
        "score",
        size=(64, 64),
        doc="shapes-world judge on the quick suite: colour / shape / background accuracy, luminance, texture",
    ),
)
SCORERS.add(
    "image-diff",
    Scorer(
        "image-diff",
        _image_diff,
        "score",
        needs_reference=True,
        doc="against A's pictures at the same seeds: pixel difference, luma / saturation / edge shifts",
    ),
)


def _load_callable(spec: str) -> Callable:
    target, _, fn_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise BakaError(f"scorer {spec!r}: no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise BakaError(f"scorer {spec!r}: cannot import {target} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise BakaError(f"scorer {spec!r}: {target} has no function {fn_name!r}")
    return fn


def _user(spec: str) -> Scorer:
    fn = _load_callable(spec)

    def run(images: list, prompts: list[str], reference: list | None) -> Figures:
        per = len(images) // len(prompts)
        value = fn(images, [p for p in prompts for _ in range(per)])
        if isinstance(value, dict):
            return {str(k): float(v) for k, v in value.items()}
        return {"score": float(value)}

    return Scorer(spec, run, "score", doc=f"user scorer {spec}")


def get_scorer(spec: str) -> Scorer:
    """A registered scorer by name, or a user callable ``module:function`` / ``file.py:function``."""
    if ":" in spec:
        return _user(spec)
    s = SCORERS.get(spec)
    if s.name == "world" and not s.prompts:
        s = Scorer(**{**s.__dict__, "prompts": _world_prompts()})
    return s


@dataclass
class RenderSettings:
    """How a scorer's pictures are made: the prompts, and the generation settings shared by all."""

    prompts: list[str] = field(default_factory=list)
    negative: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M Karras"
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 0
    per_prompt: int = 1

    def for_scorer(self, scorer: Scorer) -> RenderSettings:
        """These settings with the scorer's own prompts and size where it fixes them."""
        out = RenderSettings(**self.__dict__)
        if scorer.prompts:
            if self.prompts:
                raise BakaError(f"scorer {scorer.name} judges its own prompt set; do not give prompts")
            out.prompts = list(scorer.prompts)
        if scorer.size:
            out.width, out.height = scorer.size
        if not out.prompts:
            raise BakaError(f"scorer {scorer.name} needs prompts (--prompt or --prompts-file)")
        return out


__all__ = ["SCORERS", "RenderSettings", "Scorer", "get_scorer"]
