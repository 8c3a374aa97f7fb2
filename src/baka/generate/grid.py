"""XY grids over any generation parameter, including block-merge presets via the runtime merge.

Axis spec: ``name=v1,v2,...`` (or ``|``-separated when values contain commas, e.g. FreeU settings).
Axes: cfg, seed, steps, sampler, clip_skip, cfg_rescale, freeu, prompt_sr, blocks (needs a second model).
``prompt_sr`` is A1111's "Prompt S/R": the first value is searched for, and each cell replaces it (in
the prompt and the negative prompt) with that cell's value, so the first cell is the prompt as given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from baka.errors import BakaError
from baka.generate.engine import Generator, GenParams
from baka.generate.freeu import parse_freeu
from baka.registry import Registry

Apply = Callable[[GenParams, str, "GridContext"], GenParams]
AXES: Registry[Apply] = Registry("grid axis")


@dataclass
class GridContext:
    generator: Generator
    merger: object | None = None  # RuntimeBlockMerge for the blocks axis, applied to the generator
    sr_search: str = ""  # Prompt S/R: the text its cells replace (its axis's first value)

    @classmethod
    def with_merge(cls, generator: Generator, model_b: str | None) -> GridContext:
        """A grid context whose blocks axis runtime-merges ``generator``'s model with ``model_b``
        (the merge is applied through the generator's patcher and stays for the grid's life)."""
        if not model_b:
            return cls(generator)
        from baka.merge.runtime import RuntimeBlockMerge

        if generator.ckpt is None:
            raise BakaError("runtime block merge needs a generator loaded from a model file")
        return cls(generator, generator.patcher.apply(RuntimeBlockMerge.against(generator.ckpt, model_b)))


def _field(name: str, conv) -> Apply:
    def apply(p: GenParams, v: str, ctx: GridContext) -> GenParams:
        return p.replace(**{name: conv(v)})

    return apply


AXES.add("cfg", _field("cfg", float), ("CFG scale",))
AXES.add("seed", _field("seed", int))
AXES.add("steps", _field("steps", int))
AXES.add("sampler", _field("sampler", str))
AXES.add("clip_skip", _field("clip_skip", int), ("Clip skip",))
AXES.add("cfg_rescale", _field("guidance_rescale", float))
AXES.add("freeu", _field("freeu", parse_freeu))


@AXES.register("prompt_sr", aliases=("Prompt S/R", "sr"))
def _prompt_sr(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    search = ctx.sr_search
    if search not in p.prompt and search not in p.negative:
        raise BakaError(f"Prompt S/R: {search!r} is not in the prompt or the negative prompt")
    return p.replace(prompt=p.prompt.replace(search, v), negative=p.negative.replace(search, v))


@AXES.register("blocks", aliases=("merge", "block_weights"))
def _blocks(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    from baka.merge.weights import parse_weights

    if ctx.merger is None:
        raise BakaError("the blocks axis needs a second model (--merge-with B)")
    ctx.merger.set_weights(parse_weights(v))
    return p


def parse_axis(spec: str) -> tuple[str, Apply, list[str]]:
    name, sep, values = spec.partition("=")
    if not sep or not values.strip():
        raise BakaError(f"bad grid axis {spec!r}; write NAME=v1,v2,... (axes: {', '.join(AXES.names())})")
    split = "|" if "|" in values else ","
    return name.strip(), AXES.get(name), [v.strip() for v in values.split(split) if v.strip()]


def run_grid(ctx: GridContext, base: GenParams, x: str, y: str | None = None, progress: bool = True):
    """Generate every cell; returns (grid image, cell results row by row)."""
    from tqdm import tqdm

    xn, xa, xs = parse_axis(x)
    yn, ya, ys = parse_axis(y) if y else ("", None, [""])
    for apply, values in ((xa, xs), (ya, ys)):
        if apply is _prompt_sr:
            ctx.sr_search = values[0]
    rows = []
    bar = tqdm(total=len(xs) * len(ys), desc="grid", disable=not progress, leave=False)
    for yv in ys:
        row = []
        for xv in xs:
            p = base.replace(batch=1)
            if ya is not None:
                p = ya(p, yv, ctx)
            p = xa(p, xv, ctx)
            row.append(ctx.generator(p)[0])
            bar.update()
        rows.append(row)
    bar.close()
    labels_x = [f"{xn}: {v}" for v in xs]
    labels_y = [f"{yn}: {v}" for v in ys] if y else [""]
    return draw_grid([[r.image for r in row] for row in rows], labels_x, labels_y), rows


def draw_grid(images: list[list], labels_x: list[str], labels_y: list[str]):
    from PIL import Image, ImageDraw

    w, h = images[0][0].size
    left = 8 + 7 * max(len(s) for s in labels_y) if any(labels_y) else 0
    top = 24
    grid = Image.new("RGB", (left + w * len(labels_x), top + h * len(labels_y)), "white")
    d = ImageDraw.Draw(grid)
    for i, s in enumerate(labels_x):
        d.text((left + i * w + 4, 6), s, fill="black")
    for j, row in enumerate(images):
        if labels_y[j]:
            d.text((4, top + j * h + h // 2 - 6), labels_y[j], fill="black")
        for i, img in enumerate(row):
            grid.paste(img, (left + i * w, top + j * h))
    return grid
