"""baka's own routes: merge jobs and their status, the presets and methods, the live block-merge preview."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from baka.errors import BakaError, NotFound
from baka.serve.jobs import Job
from baka.serve.schemas import MergeJob, Preview, XYGrid
from baka.serve.sdapi import image_b64, png_b64
from baka.serve.state import State, get_state

router = APIRouter(prefix="/baka/v1")
StateDep = Annotated[State, Depends(get_state)]


@router.get("/presets")
def presets() -> dict:
    from baka.merge.presets import builtin_presets

    reg = builtin_presets()
    return {n: list(reg.get(n)) for n in reg.names()}


@router.get("/methods")
def methods() -> list[dict]:
    from baka.merge.methods import METHODS

    return [
        {"name": n, "needs_c": METHODS.get(n).needs_c, "formula": METHODS.get(n).doc} for n in METHODS.names()
    ]


def output_path(st: State, output_name: str, kind: str = "checkpoints") -> Path:
    """Where an output called ``output_name`` goes: a new file in the first ``kind`` folder (a merge
    or a baked model: checkpoints; an extracted or merged LoRA: loras)."""
    name = output_name if output_name.endswith(".safetensors") else output_name + ".safetensors"
    if Path(name).name != name or name.startswith(".") or "\x00" in name or len(name.encode()) > 255:
        raise BakaError("output_name must be a plain file name of at most 255 bytes")
    if not st.folders.folders[kind]:
        raise BakaError(f"no {kind} folder configured")
    out = st.folders.folders[kind][0] / name
    if out.exists():
        raise HTTPException(409, f"{name} already exists")
    return out


def _recipe(req: MergeJob, models: list[str]):
    from baka.merge.methods import METHODS
    from baka.merge.recipe import Recipe
    from baka.merge.weights import parse_weights

    method = METHODS.get(req.method)
    return Recipe(
        method.name,
        models,
        parse_weights(req.alpha),
        parse_weights(req.beta if req.beta is not None else method.beta_default),
        req.elemental,
        0,
        req.dtype,
    )


@router.post("/merge")
def merge(req: MergeJob, st: StateDep) -> dict:
    from baka.merge.engine import merge_models

    out = output_path(st, req.output_name)
    models = [str(st.resolve("checkpoints", m)) for m in (req.model_a, req.model_b, req.model_c) if m]
    recipe = _recipe(req, models)
    job = st.submit("merge", lambda job: str(merge_models(recipe, out, progress=False).path))
    return {"job": job.id}


def _job_state(job: Job) -> str:
    f = job.future
    if f.done():
        return "failed" if f.exception() else "done"
    return "running" if f.running() else "queued"


@router.get("/jobs/{job_id}")
def job_status(job_id: str, st: StateDep) -> dict:
    job = st.queue.jobs.get(job_id)
    if job is None:
        raise NotFound("no such job")
    state = _job_state(job)
    return {
        "job": job.id,
        "state": state,
        "result": job.future.result() if state == "done" else None,
        "error": str(job.future.exception()) if state == "failed" else None,
    }


@router.post("/preview")
def preview(req: Preview, st: StateDep) -> dict:
    """Live preview of a block merge: A and B stay loaded; only changed blocks are re-merged."""
    from baka.generate.engine import GenParams
    from baka.merge.weights import parse_weights

    st.check_prompts(req.prompt, req.negative_prompt)
    pa, pb = st.resolve("checkpoints", req.model_a), st.resolve("checkpoints", req.model_b)
    weights = parse_weights(req.weights)
    params = GenParams(
        req.prompt, req.negative_prompt, steps=req.steps, seed=req.seed, width=req.width, height=req.height
    )

    def work(job: Job):
        with st.preview_lock:  # one preview pair, shared by the workers
            gen, rt = st.preview_for(pa, pb, job.device, job.worker)
            changed = rt.set_weights(weights)
            gen.on_step = job.set_progress
            try:
                return gen(params)[0], changed
            finally:
                gen.on_step = None

    r, changed = st.run("preview", work)
    from baka.generate.grid import merge_infotext

    r.infotext = merge_infotext(r.infotext, pa, pb, weights)
    return {"image": png_b64(r), "info": r.infotext, "changed_blocks": changed}


@router.get("/freeu-presets")
def freeu_presets() -> dict:
    """FreeU presets by name: b1, b2, s1, s2 and the version."""
    from baka.generate.freeu import PRESETS

    return {
        n: [
            PRESETS.get(n).b1,
            PRESETS.get(n).b2,
            PRESETS.get(n).s1,
            PRESETS.get(n).s2,
            PRESETS.get(n).version,
        ]
        for n in PRESETS.names()
    }


@router.post("/xy")
def xy_grid(req: XYGrid, st: StateDep) -> dict:
    """An XY grid (``baka generate --xy``): axes such as ``cfg=5,7,9`` or, with ``merge_with``,
    ``blocks=ALL_A,GRAD_V,ALL_B`` through the runtime merge the live preview uses."""
    from baka.generate.engine import GenParams
    from baka.generate.grid import AXES, GridContext, parse_axis, run_grid

    axes = []
    for axis in (req.x, req.y, req.z):
        if axis:
            name, apply, values = parse_axis(axis)  # a bad axis is a 400 now, not a failed job later
            for kind in ("model_b", "model_c"):  # B / C by name in the checkpoints folder, never a path
                if apply is AXES.get(kind):
                    axis = f"{kind}=" + "|".join(str(st.resolve("checkpoints", v)) for v in values)
        axes.append(axis)
    x, y, z = axes
    st.check_prompts(req.prompt, req.negative_prompt)
    model = req.model or st.options.get("sd_model_checkpoint")
    if not model:
        raise BakaError("no checkpoint configured")
    pa = st.resolve("checkpoints", model)
    pb = st.resolve("checkpoints", req.merge_with) if req.merge_with else None
    pc = st.resolve("checkpoints", req.merge_c) if req.merge_c else None
    if (
        pc or req.merge_method != "weight_sum" or req.merge_beta is not None or req.merge_elemental
    ) and not pb:
        raise BakaError("merge_method / merge_c / merge_beta / merge_elemental need merge_with (model B)")
    from baka.merge.elemental import parse_rules

    parse_rules(req.merge_elemental)  # a bad rule is a 400 now
    from baka.merge.methods import METHODS
    from baka.merge.weights import parse_weights

    method = METHODS.canonical(req.merge_method)
    betas = tuple(parse_weights(req.merge_beta)) if req.merge_beta is not None else None
    params = GenParams(
        req.prompt,
        req.negative_prompt,
        steps=req.steps,
        seed=req.seed,
        width=req.width,
        height=req.height,
        sampler=req.sampler_name,
        cfg=req.cfg_scale,
    )

    def work(job: Job):
        if pb is None:
            gen = st.generator_for(model, None, job.device, job.worker)
            return run_grid(GridContext(gen), params, x, y, progress=False, z=z)
        with st.preview_lock:
            gen, rt = st.preview_for(pa, pb, job.device, job.worker)
            ctx = GridContext(gen, rt, model_b=str(pb), base_betas=betas, base_elemental=req.merge_elemental)
            if method != "weight_sum" or pc is not None:  # the shared preview pair is weighted sum
                ctx.rebuild(method=method, model_c=str(pc) if pc else "")
            try:
                return run_grid(ctx, params, x, y, progress=False, z=z)
            finally:
                # a model_b / method axis swapped the merge, or rules stayed on it: the preview pair is stale
                if ctx.merger is not rt or rt.rules:
                    st.preview = None

    grid, rows = st.run("xy", work)
    return {
        "image": image_b64(grid),
        "infotexts": [r.infotext for row in rows for r in row],
        "size": list(grid.size),
    }


@router.get("/history")
def history(st: StateDep, limit: int = 60) -> list[dict]:
    """The pictures saved under the outputs folder, newest first, with their infotext."""
    from PIL import Image

    items = []
    for path in st.outputs.history(max(1, min(limit, 500))):
        rel = path.relative_to(st.outputs.root).as_posix()
        try:
            with Image.open(path) as im:
                text = im.info.get("parameters", "")
        except OSError:
            continue  # a broken file in the folder is left out, never takes the gallery down
        items.append(
            {
                "file": rel,
                "kind": rel.split("-images/")[0],
                "url": f"/baka/v1/outputs/{rel}",
                "infotext": text,
            }
        )
    return items


@router.get("/outputs/{rel:path}")
def output_file(rel: str, st: StateDep):
    """One saved picture (inside the outputs folder only)."""
    from fastapi.responses import FileResponse

    root = st.outputs.root.resolve()
    try:
        path = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFound("no such output") from None
    if not path.is_relative_to(root) or path.suffix.lower() != ".png" or not path.is_file():
        raise NotFound("no such output")
    return FileResponse(path, media_type="image/png")
