"""XY(Z) grids over any generation parameter and over a runtime block merge with a second model.

Axis spec: ``name=v1,v2,...`` (or ``|``-separated when values contain commas, e.g. FreeU settings).
Axes: cfg, seed, steps, sampler, clip_skip, cfg_rescale, freeu, prompt_sr; with a second model (merge
axes): blocks / alpha (26 weights: a number, a list, a preset), one block's weight by its id
(``IN05=0,0.5,1``, the other blocks as the base weights), beta (the method's second weight, 26 values),
method (any merge method; cosineA / cosineB scan both files first), model_b and model_c (another B
or C per cell), elemental (supermerger's rules, ``;``-separated; ``none`` for no rules).
``prompt_sr`` is A1111's "Prompt S/R": the first value is searched for, and each cell replaces it (in
the prompt and the negative prompt) with that cell's value, so the first cell is the prompt as given.
Between cells only the blocks whose weight changed are re-merged; every cell's infotext names the
merge it shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from baka.errors import BakaError
from baka.generate.engine import Generator, GenParams
from baka.generate.freeu import parse_freeu
from baka.registry import Registry

Apply = Callable[[GenParams, str, "GridContext"], GenParams]
AXES: Registry[Apply] = Registry("grid axis")


@dataclass
class GridContext:
    generator: Generator
    merger: object | None = None  # RuntimeBlockMerge for the merge axes, applied to the generator
    sr_search: str = ""  # Prompt S/R: the text its cells replace (its axis's first value)
    base_weights: tuple[float, ...] = (0.0,) * 26  # the merge's weights where no axis sets them
    weights: list[float] = field(default_factory=lambda: [0.0] * 26)  # the current cell's
    model_b: str = ""  # B of the runtime merge
    method: str = "weight_sum"  # its merge method
    model_c: str = ""  # its C, for methods that take one
    base_betas: tuple[float, ...] | None = None  # the method's betas where no axis sets them
    betas: list[float] | None = None  # the current cell's
    base_elemental: str = ""  # supermerger's elemental rules where no axis sets them
    elemental: str = ""  # the current cell's

    def _need_merge(self, axis: str):
        if self.merger is None:
            raise BakaError(f"the {axis} axis needs a second model (--merge-with B)")
        return self.merger

    def rebuild(self, *, model_b: str | None = None, method: str | None = None, model_c: str | None = None):
        """Merge toward another B, by another method or with another C from now on (the model goes
        back to A first); nothing happens when the cell asks for what is loaded."""
        from baka.merge.methods import METHODS
        from baka.merge.runtime import RuntimeBlockMerge

        old = self._need_merge("model_b" if model_b else "method" if method else "model_c")
        want = (model_b or self.model_b, METHODS.canonical(method) if method else self.method,
                model_c if model_c is not None else self.model_c)  # fmt: skip
        if want == (self.model_b, self.method, self.model_c):
            return
        self.generator.patcher.remove(old)  # type: ignore[arg-type]
        merge = RuntimeBlockMerge.against(
            self.generator.ckpt, want[0], method=want[1], model_c=want[2] or None, beta=self.base_betas
        )
        self.merger = self.generator.patcher.apply(merge)
        self.model_b, self.method, self.model_c = want

    def swap_b(self, model_b: str) -> None:
        """Merge toward another B from now on (the model goes back to A first)."""
        self.rebuild(model_b=model_b)

    @classmethod
    def with_merge(
        cls,
        generator: Generator,
        model_b: str | None,
        *,
        method: str = "weight_sum",
        model_c: str | None = None,
        beta=None,
        elemental: str = "",
    ) -> GridContext:
        """A grid context whose blocks axis runtime-merges ``generator``'s model with ``model_b``
        (``method``, with ``model_c`` where it takes one, ``beta`` its second weight) through the
        generator's patcher; the merge stays for the grid's life."""
        if not model_b:
            if model_c or method != "weight_sum" or elemental:
                raise BakaError(
                    "a merge method, model C or elemental rules need a second model (--merge-with B)"
                )
            return cls(generator)
        from baka.merge.methods import METHODS
        from baka.merge.runtime import RuntimeBlockMerge
        from baka.merge.weights import parse_weights

        if generator.ckpt is None:
            raise BakaError("runtime block merge needs a generator loaded from a model file")
        betas = tuple(parse_weights(beta)) if beta is not None else None
        m = METHODS.canonical(method)
        merge = RuntimeBlockMerge.against(generator.ckpt, model_b, method=m, model_c=model_c, beta=betas)
        merger = generator.patcher.apply(merge)
        if elemental:
            merger.set_elemental(elemental)
        return cls(
            generator,
            merger,
            model_b=str(model_b),
            method=m,
            model_c=str(model_c or ""),
            base_betas=betas,
            base_elemental=elemental,
        )


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


@AXES.register("blocks", aliases=("merge", "block_weights", "alpha", "preset"))
def _blocks(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    from baka.merge.weights import parse_weights

    ctx._need_merge("blocks")
    ctx.weights = list(parse_weights(v))
    return p


@AXES.register("model_b", aliases=("B", "model B"))
def _model_b(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    ctx.swap_b(v)
    return p


@AXES.register("model_c", aliases=("C", "model C"))
def _model_c(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    ctx.rebuild(model_c=v)
    return p


@AXES.register("method", aliases=("merge_method", "calcmode"))
def _method(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    ctx.rebuild(method=v)
    return p


@AXES.register("elemental", aliases=("merge_elemental",))
def _elemental(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    ctx._need_merge("elemental")
    ctx.elemental = "" if v.strip().lower() in ("none", "-") else v
    return p


@AXES.register("beta", aliases=("merge_beta",))
def _beta(p: GenParams, v: str, ctx: GridContext) -> GenParams:
    from baka.merge.weights import parse_weights

    ctx._need_merge("beta")
    ctx.betas = list(parse_weights(v))
    return p


def _block_axis(block: str) -> Apply:
    from baka.models.blocks import BLOCK_INDEX

    def apply(p: GenParams, v: str, ctx: GridContext) -> GenParams:
        ctx._need_merge(block)
        ctx.weights[BLOCK_INDEX[block]] = float(v)
        return p

    return apply


def parse_axis(spec: str) -> tuple[str, Apply, list[str]]:
    from baka.models.blocks import parse_block_id

    name, sep, values = spec.partition("=")
    if not sep or not values.strip():
        raise BakaError(
            f"bad grid axis {spec!r}; write NAME=v1,v2,... (axes: {', '.join(AXES.names())}, or a block id)"
        )
    split = "|" if "|" in values else ","
    vals = [v.strip() for v in values.split(split) if v.strip()]
    try:
        apply = AXES.get(name)
    except BakaError:
        try:  # a block id: that block's weight of the runtime merge
            block = parse_block_id(name)
        except BakaError:
            axes = ", ".join(AXES.names())
            raise BakaError(f"unknown grid axis {name.strip()!r} (axes: {axes}, or a block id)") from None
        for v in vals:
            try:
                float(v)
            except ValueError:
                raise BakaError(f"grid axis {block}: {v!r} is not a weight") from None
        return block, _block_axis(block), vals
    return name.strip(), apply, vals


def merge_infotext(
    text: str,
    model_a: str | Path,
    model_b: str | Path,
    weights,
    method: str = "weight_sum",
    model_c: str | Path | None = None,
    betas=None,
    elemental: str = "",
) -> str:
    """The infotext of a picture made with a runtime merge: it names the merge (A's hash is not its
    hash; the method, and C where there is one) and carries the 26 weights (and betas, elemental
    rules)."""
    from baka.generate import infotext

    prompt, neg, fields = infotext.parse(text)
    fields.pop("Model hash", None)
    models = " + ".join(Path(m).stem for m in (model_a, model_b, model_c) if m)
    fields["Model"] = f"{models} ({method})"
    fields["Merge weights"] = ",".join(f"{w:g}" for w in weights)
    if betas is not None:
        fields["Merge beta"] = ",".join(f"{w:g}" for w in betas)
    if elemental:
        from baka.merge.elemental import parse_rules

        fields["Merge elemental"] = "; ".join(r.text for r in parse_rules(elemental))
    return infotext.build(prompt, neg, fields)


def run_grid(
    ctx: GridContext,
    base: GenParams,
    x: str,
    y: str | None = None,
    progress: bool = True,
    z: str | None = None,
    share: tuple[int, int] = (0, 1),
    gather: Callable[[dict], dict] | None = None,
):
    """Generate every cell; returns (grid image, cell results row by row). With a Z axis the grid of
    each Z value is drawn under the previous one, headed by its value, and the rows of all of them
    come back in order.

    ``share`` = (rank, processes): this process makes cells rank, rank + processes, ... (each with its
    own model copy; every cell is set up from scratch, so a cell comes out the same on any process) and
    ``gather`` (cell index -> result, for this process's cells) returns every process's cells."""
    from tqdm import tqdm

    none: tuple[str, Apply | None, list[str]] = ("", None, [""])
    (xn, xa, xs), (yn, ya, ys), (zn, za, zs) = (parse_axis(a) if a else none for a in (x, y, z))
    for apply, values in ((xa, xs), (ya, ys), (za, zs)):
        if apply is _prompt_sr:
            ctx.sr_search = values[0]
    labels_x = [f"{xn}: {v}" for v in xs]
    labels_y = [f"{yn}: {v}" for v in ys] if y else [""]
    cells = [(zv, yv, xv) for zv in zs for yv in ys for xv in xs]
    rank, world = share
    if world > 1 and gather is None:
        raise BakaError("a grid shared between processes needs a gather function")
    mine = range(rank, len(cells), world)
    bar = tqdm(total=len(mine), desc="grid", disable=not progress, leave=False)
    done = {}
    for k in mine:
        done[k] = _cell(ctx, base, ((za, cells[k][0]), (ya, cells[k][1]), (xa, cells[k][2])))
        bar.update()
    bar.close()
    if world > 1:
        assert gather is not None
        done = gather(done)
    ordered = [done[k] for k in range(len(cells))]
    per_z = len(xs) * len(ys)
    rows, grids = [], []
    for zi in range(len(zs)):
        part = ordered[zi * per_z : (zi + 1) * per_z]
        zrows = [part[j * len(xs) : (j + 1) * len(xs)] for j in range(len(ys))]
        rows += zrows
        grids.append(draw_grid([[r.image for r in row] for row in zrows], labels_x, labels_y))
    if not z:
        return grids[0], rows
    return _stack(grids, [f"{zn}: {v}" for v in zs]), rows


def _cell(ctx: GridContext, base: GenParams, axes):
    """One cell: the base parameters and merge weights, then each axis's value (Z, Y, X), generated."""
    p = base.replace(batch=1)
    ctx.weights = list(ctx.base_weights)
    ctx.betas = list(ctx.base_betas) if ctx.base_betas is not None else None
    ctx.elemental = ctx.base_elemental
    for apply, v in axes:
        if apply is not None:
            p = apply(p, v, ctx)
    merging = ctx.merger is not None
    if merging:
        ctx.merger.set_elemental(ctx.elemental)  # type: ignore[union-attr]  # no work when unchanged
        betas = tuple(ctx.betas) if ctx.betas is not None else None
        ctx.merger.set_weights(tuple(ctx.weights), betas)  # type: ignore[union-attr]
    r = ctx.generator(p)[0]
    if merging and ctx.generator.ckpt is not None:
        r.infotext = merge_infotext(
            r.infotext,
            ctx.generator.model,
            ctx.model_b,
            ctx.weights,
            ctx.method,
            ctx.model_c or None,
            ctx.betas,
            ctx.elemental,
        )
    return r


def _stack(grids: list, labels: list[str]):
    from PIL import Image, ImageDraw

    head = 22
    out = Image.new("RGB", (max(g.width for g in grids), sum(g.height + head for g in grids)), "white")
    d = ImageDraw.Draw(out)
    y = 0
    for g, label in zip(grids, labels, strict=True):
        d.text((6, y + 5), label, fill="black")
        out.paste(g, (0, y + head))
        y += g.height + head
    return out


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
