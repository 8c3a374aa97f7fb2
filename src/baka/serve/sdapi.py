"""A1111's /sdapi/v1 routes, with A1111's JSON shapes, so that existing clients work."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends

from baka.errors import BakaError
from baka.serve.jobs import Job
from baka.serve.schemas import ExtrasSingle, Img2Img, PngInfo, Txt2Img
from baka.serve.state import NO_VAE, State, get_state

router = APIRouter(prefix="/sdapi/v1")
StateDep = Annotated[State, Depends(get_state)]


def image_b64(image, infotext: str | None = None) -> str:
    """A picture as A1111 sends it: base64 PNG, the infotext (if any) in its "parameters" chunk."""
    from PIL.PngImagePlugin import PngInfo as Info

    info = Info()
    if infotext is not None:
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def png_b64(result) -> str:
    """A generated result with its infotext, as A1111 sends it."""
    return image_b64(result.image, result.infotext)


def _model_entry(st: State, name: str) -> dict:
    path = st.resolve("checkpoints", name)
    sha = st.hashes.get(path)
    return {
        "title": f"{name} [{sha[:10]}]" if sha else name,
        "model_name": Path(name).stem,
        "hash": sha[:10] if sha else None,
        "sha256": sha,
        "filename": str(path),
        "config": None,
    }


@router.get("/sd-models")
def sd_models(st: StateDep) -> list[dict]:
    """A1111's list; ``hash`` / ``sha256`` appear once the background hasher has read the file."""
    return [_model_entry(st, name) for name in st.folders.list("checkpoints")]


# routes clients call when they connect: what baka has, in A1111's shapes


@router.get("/schedulers")
def schedulers() -> list[dict]:
    """The schedule types baka builds (A1111's shape; its names are the labels, lowercased, _ for space)."""
    from baka.generate.samplers import SCHEDULES

    return [
        {
            "name": n.lower().replace(" ", "_"),
            "label": n,
            "aliases": None,
            "default_rho": SCHEDULES.get(n).rho,
            # A1111's flag: the schedule reads the model's own sigmas, not only their range
            "need_inner_model": n in ("Uniform", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta"),
        }
        for n in SCHEDULES.names()
    ]


@router.get("/upscalers")
def upscalers(st: StateDep) -> list[dict]:
    """Image upscalers for hires fix and Extras: A1111 lists "None" first, then its resamplers, then
    the model files (ESRGAN-family, by file name without its suffix, with their path)."""
    from baka.generate.model_upscale import model_upscalers
    from baka.generate.upscale import UPSCALERS

    names = [n for n in UPSCALERS.names() if not UPSCALERS.get(n).latent]  # "None" first, as A1111
    rows = [(n, None, None) for n in names]
    rows += [(n, "ESRGAN", str(p)) for n, p in model_upscalers(st.folders.folders["upscalers"]).items()]
    return [{"name": n, "model_name": m, "model_path": p, "model_url": None, "scale": 4} for n, m, p in rows]


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict]:
    from baka.generate.upscale import UPSCALERS

    return [{"name": n} for n in UPSCALERS.names() if UPSCALERS.get(n).latent]


@router.get("/sd-vae")
def sd_vae(st: StateDep) -> list[dict]:
    return [
        {"model_name": Path(n).stem, "filename": str(st.resolve("vae", n))} for n in st.folders.list("vae")
    ]


@router.get("/sd-modules")
@router.get("/hypernetworks")
@router.get("/prompt-styles")
@router.get("/face-restorers")
def nothing_here() -> list:
    """Lists of things baka does not have (no SDXL modules, no
    hypernetworks, no saved styles, no face restorers): empty, as A1111 answers without them."""
    return []


@router.get("/scripts")
def scripts() -> dict:
    """The scripts baka runs (A1111 lists titles lowercased): the alwayson ones it builds."""
    from baka.serve.fields import BUILT_SCRIPTS

    return {"txt2img": list(BUILT_SCRIPTS), "img2img": list(BUILT_SCRIPTS)}


@router.get("/script-info")
def script_info() -> list[dict]:
    from baka.serve.fields import BUILT_SCRIPTS

    return [
        {"name": n, "is_alwayson": True, "is_img2img": img, "args": []}
        for n in BUILT_SCRIPTS
        for img in (False, True)
    ]


@router.get("/cmd-flags")
def cmd_flags(st: StateDep) -> dict:
    s = st.settings
    return {"api": True, "nowebui": False, "api_auth": bool(s.api_auth), "queue": s.queue_size}


@router.post("/refresh-checkpoints")
@router.post("/refresh-loras")
@router.post("/refresh-embeddings")
@router.post("/refresh-vae")
def refresh() -> None:
    """Folders are read on every listing, so there is nothing to refresh; answered as A1111 does."""
    return None


@router.get("/memory")
def memory() -> dict:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    out: dict = {"ram": {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["cuda"] = {"system": {"free": free, "used": total - free, "total": total}}
    else:
        out["cuda"] = {"error": "no CUDA device"}
    return out


@router.post("/interrupt")
def interrupt(st: StateDep) -> None:
    """Stop the running jobs (one per worker) within one sampler step; each answers with its images so far."""
    for job in st.queue.running_jobs():
        job.interrupt()


@router.post("/skip")
def skip(st: StateDep) -> None:
    """Stop the running batches within one sampler step; each job goes on with its next batch."""
    for job in st.queue.running_jobs():
        job.interrupt(skip=True)


@router.get("/samplers")
def samplers() -> list[dict]:
    from baka.generate.samplers import SAMPLERS

    return [{"name": n, "aliases": [], "options": dict(SAMPLERS.get(n).options)} for n in SAMPLERS.names()]


@router.get("/loras")
def loras(st: StateDep) -> list[dict]:
    return [
        {
            "name": Path(n).stem,
            "alias": Path(n).stem,
            "path": str(st.resolve("loras", n)),
            "metadata": {},
        }
        for n in st.folders.list("loras")
    ]


@router.get("/embeddings")
def embeddings(st: StateDep) -> dict:
    from baka.generate.embeddings import try_load_embedding

    loaded, skipped = {}, {}
    for n in st.folders.list("embeddings"):
        e = try_load_embedding(st.resolve("embeddings", n))
        if isinstance(e, str):  # a bad file is listed as skipped, as A1111 does
            skipped[Path(n).stem] = {"error": e}
            continue
        loaded[e.name] = {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": e.vectors.shape[-1],
            "vectors": e.vectors.shape[0],
        }
    return {"loaded": loaded, "skipped": skipped}


@router.get("/options")
def get_options(st: StateDep) -> dict:
    return st.options


@router.post("/options")
def set_options(body: dict, st: StateDep) -> dict:
    clip = body.get("CLIP_stop_at_last_layers", 1)
    if isinstance(clip, bool) or not isinstance(clip, int) or not 1 <= clip <= 12:
        raise BakaError(f"CLIP_stop_at_last_layers must be a whole number from 1 to 12, not {clip!r}")
    if "sd_model_checkpoint" in body:
        st.resolve("checkpoints", body["sd_model_checkpoint"])
    if body.get("sd_vae") not in (None, *NO_VAE):
        st.resolve("vae", body["sd_vae"])
    st.options.update({k: v for k, v in body.items() if k in st.options})
    return st.options


@router.get("/progress")
def progress(st: StateDep, skip_current_image: bool = False) -> dict:
    """A1111's progress: the running job's share done, the seconds left (``eta_relative``), its
    state, and a ``current_image`` preview (A1111's cheap latent approximation, latent-sized)."""
    import time

    job = st.queue.current
    current_image, textinfo = None, None
    if job is None:
        frac, eta, job_id, job_count, step, total = 0.0, 0.0, "", st.queue.pending(), 0, 0
    else:
        frac, eta = job.fraction(), job.eta_relative(time.monotonic())
        job_id, job_count, step, total = job.id, st.queue.pending() + 1, job.step, job.total
        textinfo = job.textinfo
        latents = job.latents
        if latents is not None and not skip_current_image:
            from baka.generate.preview import preview_image

            current_image = image_b64(preview_image(latents))
    return {
        "progress": frac,
        "eta_relative": eta,
        "current_image": current_image,
        "textinfo": textinfo,
        "state": {
            "job": job_id,
            "job_count": job_count,
            "job_no": job.batch_no if job else 0,
            "sampling_step": step,
            "sampling_steps": total,
            "interrupted": bool(job and job.interrupted),
            "skipped": bool(job and job.skipped),
        },
    }


def _decode_image(image: str):
    """A base64 (or data: URL) image, loaded; BakaError if it is not an image."""
    from PIL import Image

    head, comma, rest = image.partition(",")
    if image.startswith("data:") and not comma:
        raise BakaError("not an image: a data: URL without a comma")
    data = rest if image.startswith("data:") else image
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data)))
        im.load()
        return im
    except (ValueError, OSError, Image.DecompressionBombError) as e:
        raise BakaError(f"not an image: {e}") from None


def _decode_image_text(image: str) -> str:
    """The "parameters" text of a base64 (or data: URL) image; BakaError if it is not an image."""
    return _decode_image(image).info.get("parameters", "")


@router.post("/extra-single-image")
def extra_single_image(body: ExtrasSingle, st: StateDep) -> dict:
    """A1111's Extras upscale with baka's image upscalers; face restorers are not built (422)."""
    from baka.generate.extras import Upscale, upscale
    from baka.serve.fields import Unsupported

    if body.gfpgan_visibility or body.codeformer_visibility:
        raise Unsupported("gfpgan_visibility / codeformer_visibility: baka has no face restorers (send 0)")
    to = (body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode == 1 else None
    u = Upscale(
        body.upscaler_1,
        body.upscaling_resize,
        to,
        body.upscaling_crop,
        body.upscaler_2,
        body.extras_upscaler_2_visibility,
        tuple(st.folders.folders["upscalers"]),
    )
    img = _decode_image(body.image)
    out = st.run("extras", lambda job: upscale(img, u))
    return {"html_info": "", "image": image_b64(out)}


@router.post("/png-info")
def png_info(body: PngInfo) -> dict:
    from baka.generate import infotext

    text = _decode_image_text(body.image)
    prompt, neg, params = infotext.parse(text) if text else ("", "", {})
    return {
        "info": text,
        "items": {"parameters": text} if text else {},
        "parameters": {"Prompt": prompt, "Negative prompt": neg, **params},
    }


def _gen_params(req: Txt2Img, opts: dict):
    from baka.generate.params import GenParams

    body = req.model_dump()
    body["sampler_name"] = req.sampler()
    if isinstance(req, Img2Img):
        body["mask_blur"] = req.blur()
    return GenParams.from_api(body, opts)


def _txt2img_info(req: Txt2Img, opts: dict, results: list) -> dict:
    return {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "seed": results[0].seed if results else req.seed,
        "all_seeds": [r.seed for r in results],
        "infotexts": [r.infotext for r in results],
        "sd_model_name": Path(opts["sd_model_checkpoint"]).stem,
        "sampler_name": req.sampler(),
        "steps": req.steps,
        "cfg_scale": req.cfg_scale,
        "width": req.width,
        "height": req.height,
    }


def _generate(req: Txt2Img, st: State, kind: str, init=None, mask=None) -> dict:
    from baka.serve.fields import check

    ignored = check(req.model_dump(), req.model_extra or {}, lenient=st.settings.lenient, options=st.options)
    st.check_prompts(req.prompt, req.negative_prompt)
    opts = {**st.options, **req.override_settings}
    if not opts.get("sd_model_checkpoint"):
        raise BakaError("no checkpoint configured")
    params = _gen_params(req, opts)

    def work(job: Job) -> list:
        job.textinfo = f"Loading {opts['sd_model_checkpoint']}"
        gen = st.generator_for(opts["sd_model_checkpoint"], opts.get("sd_vae"), job.device, job.worker)
        job.textinfo = None
        gen.on_step, gen.on_preview = job.set_progress, job.set_latents
        job.on_interrupt = gen.interrupt
        job.batch_count = req.n_iter
        results, p = [], params
        try:
            for i in range(req.n_iter):  # A1111's batch count: each batch goes on from the last seed
                if job.interrupted:
                    break
                job.skipped, job.batch_no = False, i
                batch = gen(p, init_image=init, mask=mask)
                results += batch
                p = p.replace(seed=batch[-1].seed + 1)
        finally:
            gen.on_step = gen.on_preview = None  # the loaded generator keeps no finished job alive
        if req.save_images:
            st.outputs.save(kind, results)
        return results

    results = st.run(kind, work)
    if not req.override_settings_restore_afterwards:  # A1111: the overrides become the options
        st.options.update({k: v for k, v in req.override_settings.items() if k in st.options})
    body = req.model_dump()
    if not getattr(req, "include_init_images", False):
        body.pop("init_images", None)  # A1111 echoes the input pictures only when asked
        body.pop("mask", None)
    info = _txt2img_info(req, opts, results)
    if ignored:
        info["ignored_fields"] = ignored
    return {
        "images": [png_b64(r) for r in results] if req.send_images else [],
        "parameters": body,
        "info": json.dumps(info),
    }


@router.post("/txt2img")
def txt2img(req: Txt2Img, st: StateDep) -> dict:
    return _generate(req, st, "txt2img")


@router.post("/img2img")
def img2img(req: Img2Img, st: StateDep) -> dict:
    """A1111's img2img with the first of ``init_images``; inpainting when ``mask`` is given."""
    if not req.init_images:
        raise BakaError("img2img: init_images is empty")
    mask = _decode_image(req.mask) if req.mask else None
    return _generate(req, st, "img2img", _decode_image(req.init_images[0]), mask)
