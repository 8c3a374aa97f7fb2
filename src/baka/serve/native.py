"""baka's own routes: merge jobs and their status, the presets and methods, the live block-merge preview."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from baka.errors import BakaError, NotFound
from baka.serve.jobs import Job
from baka.serve.schemas import MergeJob, Preview
from baka.serve.sdapi import png_b64
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


def _output_path(st: State, output_name: str) -> Path:
    """Where a merge called ``output_name`` goes: a new file in the first checkpoint folder."""
    name = output_name if output_name.endswith(".safetensors") else output_name + ".safetensors"
    if Path(name).name != name or name.startswith(".") or "\x00" in name or len(name.encode()) > 255:
        raise BakaError("output_name must be a plain file name of at most 255 bytes")
    if not st.folders.folders["checkpoints"]:
        raise BakaError("no checkpoint folder configured")
    out = st.folders.folders["checkpoints"][0] / name
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

    out = _output_path(st, req.output_name)
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
            gen, rt = st.preview_for(pa, pb, job.device)
            changed = rt.set_weights(weights)
            gen.on_step = job.set_progress
            try:
                return gen(params)[0], changed
            finally:
                gen.on_step = None

    r, changed = st.run("preview", work)
    return {"image": png_b64(r), "info": r.infotext, "changed_blocks": changed}
