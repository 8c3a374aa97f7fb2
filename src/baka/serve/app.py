"""The HTTP server: A1111's /sdapi/v1 routes (so existing clients work), baka's merge and
runtime-preview routes, and the web UI page. Bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import base64
import hmac
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from baka import __version__
from baka.errors import BakaError, NotFound
from baka.serve.folders import ModelFolders
from baka.serve.jobs import Job, JobQueue, QueueFull


@dataclass
class Settings:
    folders: ModelFolders
    token: str | None = None
    queue_size: int = 8
    model: str | None = None  # default checkpoint name


@dataclass
class _State:
    settings: Settings
    queue: JobQueue
    options: dict = field(default_factory=dict)
    generator: object | None = None
    generator_key: tuple | None = None
    preview: object | None = None  # (key, Generator, RuntimeBlockMerge)


class Txt2Img(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=150)
    sampler_name: str = "Euler a"
    scheduler: str | None = None
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=8)
    override_settings: dict = Field(default_factory=dict)


class PngInfo(BaseModel):
    image: str


class MergeJob(BaseModel):
    model_a: str
    model_b: str
    model_c: str | None = None
    method: str = "weight_sum"
    alpha: str | list[float] = "0.5"
    beta: str | list[float] | None = None
    elemental: str = ""
    output_name: str
    dtype: str | None = "fp16"


class Preview(BaseModel):
    model_a: str
    model_b: str
    weights: str | list[float] = "0.5"
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(12, ge=1, le=50)
    seed: int = 1
    width: int = Field(512, ge=64, le=1024)
    height: int = Field(512, ge=64, le=1024)


def _png_b64(result) -> str:
    from PIL.PngImagePlugin import PngInfo as Info

    info = Info()
    info.add_text("parameters", result.infotext)
    buf = io.BytesIO()
    result.image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application over ``settings.folders``."""
    app = FastAPI(title="baka", version=__version__)
    st = _State(settings, JobQueue(settings.queue_size))
    st.options = {
        "sd_model_checkpoint": settings.model or next(iter(settings.folders.list("checkpoints")), None),
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
    }
    app.state.baka = st

    def auth(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if settings.token and not hmac.compare_digest(given, f"Bearer {settings.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    def resolve(kind: str, name: str) -> Path:
        try:
            return settings.folders.resolve(kind, name)
        except BakaError as e:
            raise HTTPException(404 if isinstance(e, NotFound) else 400, str(e)) from None

    def run(kind: str, fn):
        try:
            job = st.queue.submit(kind, fn)
        except QueueFull as e:
            raise HTTPException(503, str(e)) from None
        return job

    def wait(job: Job):
        try:
            return job.future.result()
        except BakaError as e:
            raise HTTPException(400, str(e)) from None

    def generator_for(name: str, vae: str | None):
        from baka.generate.engine import Generator

        path = resolve("checkpoints", name)
        vae_path = resolve("vae", vae) if vae and vae not in ("Automatic", "None") else None
        key = (path, vae_path)
        if st.generator_key != key:
            st.generator = None  # free the old model first
            st.generator = Generator(
                path,
                vae=vae_path,
                embedding_dirs=settings.folders.folders["embeddings"],
                lora_dirs=settings.folders.folders["loras"],
                progress=False,
            )
            st.generator_key = key
        return st.generator

    api = Depends(auth)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return resources.files("baka.serve").joinpath("static/index.html").read_text()

    @app.get("/sdapi/v1/sd-models", dependencies=[api])
    def sd_models() -> list[dict]:
        out = []
        for name in settings.folders.list("checkpoints"):
            p = settings.folders.resolve("checkpoints", name)
            out.append(
                {
                    "title": name,
                    "model_name": Path(name).stem,
                    "hash": None,
                    "sha256": None,
                    "filename": str(p),
                    "config": None,
                }
            )
        return out

    @app.get("/sdapi/v1/samplers", dependencies=[api])
    def samplers() -> list[dict]:
        from baka.generate.samplers import SAMPLERS

        return [
            {"name": n, "aliases": [], "options": dict(SAMPLERS.get(n).options)} for n in SAMPLERS.names()
        ]

    @app.get("/sdapi/v1/loras", dependencies=[api])
    def loras() -> list[dict]:
        return [
            {
                "name": Path(n).stem,
                "alias": Path(n).stem,
                "path": str(settings.folders.resolve("loras", n)),
                "metadata": {},
            }
            for n in settings.folders.list("loras")
        ]

    @app.get("/sdapi/v1/embeddings", dependencies=[api])
    def embeddings() -> dict:
        from baka.generate.embeddings import load_embedding

        loaded, skipped = {}, {}
        for n in settings.folders.list("embeddings"):
            try:
                e = load_embedding(settings.folders.resolve("embeddings", n))
                loaded[e.name] = {
                    "step": None,
                    "sd_checkpoint": None,
                    "sd_checkpoint_name": None,
                    "shape": e.vectors.shape[-1],
                    "vectors": e.vectors.shape[0],
                }
            except BakaError as err:
                skipped[Path(n).stem] = {"error": str(err)}
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/sdapi/v1/options", dependencies=[api])
    def get_options() -> dict:
        return st.options

    @app.post("/sdapi/v1/options", dependencies=[api])
    def set_options(body: dict) -> dict:
        if "sd_model_checkpoint" in body:
            resolve("checkpoints", body["sd_model_checkpoint"])
        if body.get("sd_vae") not in (None, "Automatic", "None"):
            resolve("vae", body["sd_vae"])
        st.options.update({k: v for k, v in body.items() if k in st.options})
        return st.options

    @app.get("/sdapi/v1/progress", dependencies=[api])
    def progress() -> dict:
        job = st.queue.current
        frac = job.step / job.total if job and job.total else 0.0
        return {
            "progress": frac,
            "eta_relative": 0.0,
            "current_image": None,
            "textinfo": None,
            "state": {
                "job": job.id if job else "",
                "job_count": st.queue.pending() + (1 if job else 0),
                "sampling_step": job.step if job else 0,
                "sampling_steps": job.total if job else 0,
                "interrupted": False,
                "skipped": False,
            },
        }

    @app.post("/sdapi/v1/png-info", dependencies=[api])
    def png_info(body: PngInfo) -> dict:
        from PIL import Image

        from baka.generate import infotext

        data = body.image.split(",", 1)[1] if body.image.startswith("data:") else body.image
        try:
            with Image.open(io.BytesIO(base64.b64decode(data))) as im:
                text = im.info.get("parameters", "")
        except (ValueError, OSError) as e:
            raise HTTPException(400, f"not an image: {e}") from None
        prompt, neg, params = infotext.parse(text) if text else ("", "", {})
        return {
            "info": text,
            "items": {"parameters": text} if text else {},
            "parameters": {"Prompt": prompt, "Negative prompt": neg, **params},
        }

    @app.post("/sdapi/v1/txt2img", dependencies=[api])
    def txt2img(req: Txt2Img) -> dict:
        from baka.generate.engine import GenParams

        opts = {**st.options, **req.override_settings}
        if not opts.get("sd_model_checkpoint"):
            raise HTTPException(400, "no checkpoint configured")
        sampler = req.sampler_name
        if req.scheduler and req.scheduler.lower() not in ("automatic", ""):
            sampler = f"{sampler} {req.scheduler}"
        params = GenParams(
            req.prompt,
            req.negative_prompt,
            req.steps,
            sampler,
            req.cfg_scale,
            req.seed,
            req.width,
            req.height,
            req.batch_size,
            int(opts.get("CLIP_stop_at_last_layers", 1)),
        )

        def work(job: Job):
            gen = generator_for(opts["sd_model_checkpoint"], opts.get("sd_vae"))
            gen.on_step = lambda i, n: (setattr(job, "step", i), setattr(job, "total", n))
            results = []
            p = params
            for _ in range(req.n_iter):
                batch = gen(p)
                results += batch
                p = p.replace(seed=batch[-1].seed + 1)
            return results

        results = wait(run("txt2img", work))
        info = {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "seed": results[0].seed,
            "all_seeds": [r.seed for r in results],
            "infotexts": [r.infotext for r in results],
            "sd_model_name": Path(opts["sd_model_checkpoint"]).stem,
            "sampler_name": req.sampler_name,
            "steps": req.steps,
            "cfg_scale": req.cfg_scale,
            "width": req.width,
            "height": req.height,
        }
        return {
            "images": [_png_b64(r) for r in results],
            "parameters": req.model_dump(),
            "info": json.dumps(info),
        }

    # -------------------------------------------------------------------------------------------- native

    @app.get("/baka/v1/presets", dependencies=[api])
    def presets() -> dict:
        from baka.merge.presets import builtin_presets

        reg = builtin_presets()
        return {n: list(reg.get(n)) for n in reg.names()}

    @app.get("/baka/v1/methods", dependencies=[api])
    def methods() -> list[dict]:
        from baka.merge.methods import METHODS

        return [
            {"name": n, "needs_c": METHODS.get(n).needs_c, "formula": METHODS.get(n).doc}
            for n in METHODS.names()
        ]

    @app.post("/baka/v1/merge", dependencies=[api])
    def merge(req: MergeJob) -> dict:
        from baka.merge.engine import merge_models
        from baka.merge.methods import METHODS
        from baka.merge.recipe import Recipe
        from baka.merge.weights import parse_weights

        name = (
            req.output_name if req.output_name.endswith(".safetensors") else req.output_name + ".safetensors"
        )
        if Path(name).name != name or name.startswith("."):
            raise HTTPException(400, "output_name must be a plain file name")
        if not settings.folders.folders["checkpoints"]:
            raise HTTPException(400, "no checkpoint folder configured")
        out = settings.folders.folders["checkpoints"][0] / name
        if out.exists():
            raise HTTPException(409, f"{name} already exists")
        models = [str(resolve("checkpoints", m)) for m in (req.model_a, req.model_b, req.model_c) if m]
        try:
            method = METHODS.get(req.method)
            recipe = Recipe(
                method.name,
                models,
                parse_weights(req.alpha),
                parse_weights(req.beta if req.beta is not None else method.beta_default),
                req.elemental,
                0,
                req.dtype,
            )
        except BakaError as e:
            raise HTTPException(400, str(e)) from None
        job = run("merge", lambda job: str(merge_models(recipe, out, progress=False).path))
        return {"job": job.id}

    @app.get("/baka/v1/jobs/{job_id}", dependencies=[api])
    def job_status(job_id: str) -> dict:
        job = st.queue.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        f = job.future
        state = (
            "done"
            if f.done() and not f.exception()
            else "failed"
            if f.done()
            else ("running" if f.running() else "queued")
        )
        return {
            "job": job.id,
            "state": state,
            "result": f.result() if state == "done" else None,
            "error": str(f.exception()) if state == "failed" else None,
        }

    @app.post("/baka/v1/preview", dependencies=[api])
    def preview(req: Preview) -> dict:
        """Live preview of a block merge: A and B stay loaded; only changed blocks are re-merged."""
        from baka.generate.engine import Generator, GenParams
        from baka.merge.weights import parse_weights

        pa, pb = resolve("checkpoints", req.model_a), resolve("checkpoints", req.model_b)
        try:
            weights = parse_weights(req.weights)
        except BakaError as e:
            raise HTTPException(400, str(e)) from None

        def work(job: Job):
            if st.preview is None or st.preview[0] != (pa, pb):
                st.preview = None
                gen = Generator(pa, progress=False)
                st.preview = ((pa, pb), gen, gen.block_merger(pb))
            _, gen, rt = st.preview
            changed = rt.set_weights(weights)
            gen.on_step = lambda i, n: (setattr(job, "step", i), setattr(job, "total", n))
            r = gen(
                GenParams(
                    req.prompt,
                    req.negative_prompt,
                    req.steps,
                    seed=req.seed,
                    width=req.width,
                    height=req.height,
                )
            )[0]
            return r, changed

        r, changed = wait(run("preview", work))
        return {"image": _png_b64(r), "info": r.infotext, "changed_blocks": changed}

    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
