"""Model-making tools as jobs: ``baka lora extract | bake | merge`` and ``baka merge probe | search``.

Every route queues a job (``GET /baka/v1/jobs/{id}`` reports it) and answers with its id at once. Models
and LoRAs are named inside the configured folders only; outputs are new files in the first checkpoint
folder (baked models, the best merge of a search) or the first LoRA folder (extracted and merged LoRAs),
never an existing file. Probe and search take registered scorers only (``world``, ``image-diff``): a
``module:function`` scorer would run code named by the client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends

from baka.errors import BakaError
from baka.serve.jobs import Job
from baka.serve.native import output_path
from baka.serve.schemas import LoraBake, LoraExtract, LoraMerge, LoraUse, MergeProbe, MergeSearch, Scoring
from baka.serve.sdapi import image_b64
from baka.serve.state import State, get_state

router = APIRouter(prefix="/baka/v1")
StateDep = Annotated[State, Depends(get_state)]


def _loras(st: State, uses: list[LoraUse]) -> list:
    from baka.merge.lora.common import LoraArg
    from baka.models.lbw import parse_lbw

    out = []
    for u in uses:
        if u.lbw is not None:
            parse_lbw(u.lbw)  # a bad lora-block-weight is a 400 now, not a failed job later
        out.append(LoraArg(st.resolve("loras", u.name), u.weight, u.lbw))
    return out


@router.post("/lora/extract")
def lora_extract(req: LoraExtract, st: StateDep) -> dict:
    """A kohya LoRA (LoCon with ``conv_dim``) of B - A; the job's result reports ranks and errors."""
    from baka.merge.lora.common import save_precision
    from baka.merge.lora.ranks import RankRule

    a, b = st.resolve("checkpoints", req.model_a), st.resolve("checkpoints", req.model_b)
    RankRule.parse(req.rank_rule)
    save_precision(req.save_precision)
    out = output_path(st, req.output_name, "loras")

    def work(job: Job) -> dict:
        from baka.merge.lora.extract import extract_lora

        r = extract_lora(
            a,
            b,
            out,
            dim=req.dim,
            conv_dim=req.conv_dim,
            te=req.te,
            clamp_quantile=req.clamp_quantile,
            rank_rule=req.rank_rule,
            min_diff=req.min_diff,
            precision=req.save_precision,
            device=job.device,
            progress=False,
        )
        return {"lora": r.path.name, "modules": r.modules, "unchanged": r.unchanged,
                "block_error": r.block_error}  # fmt: skip

    return {"job": st.submit("lora-extract", work).id}


@router.post("/lora/bake")
def lora_bake(req: LoraBake, st: StateDep) -> dict:
    """LoRAs merged into a checkpoint (the generator's own patch maths), as a new checkpoint."""
    model = st.resolve("checkpoints", req.model)
    loras = _loras(st, req.loras)
    if req.dtype not in (None, "fp16", "bf16", "fp32"):
        raise BakaError(f"dtype must be fp16, bf16 or fp32, not {req.dtype!r}")
    out = output_path(st, req.output_name)

    def work(job: Job) -> dict:
        from baka.merge.lora.bake import bake_loras

        r = bake_loras(model, loras, out, dtype=req.dtype, progress=False)
        return {"checkpoint": r.path.name, "applied": r.applied, "unmatched": r.unmatched}

    return {"job": st.submit("lora-bake", work).id}


@router.post("/lora/merge")
def lora_merge(req: LoraMerge, st: StateDep) -> dict:
    """Several LoRAs as one: concatenated ranks (exact) or SVD to ``dim``."""
    from baka.merge.lora.common import save_precision

    loras = _loras(st, req.loras)
    model = st.resolve("checkpoints", req.model) if req.model else None
    save_precision(req.save_precision)
    out = output_path(st, req.output_name, "loras")

    def work(job: Job) -> dict:
        from baka.merge.lora.combine import merge_loras

        r = merge_loras(
            loras,
            out,
            dim=req.dim,
            conv_dim=req.conv_dim,
            model=model,
            clamp_quantile=req.clamp_quantile,
            precision=req.save_precision,
            progress=False,
        )
        return {"lora": r.path.name, "modules": r.modules, "block_error": r.block_error}

    return {"job": st.submit("lora-merge", work).id}


def _scoring(st: State, req: Scoring) -> tuple[Path, Path, Path | None, object]:
    """The models (inside the folders), a registered scorer and the render settings, checked now."""
    from baka.generate.samplers import SAMPLERS
    from baka.merge.methods import METHODS
    from baka.models.blocks import parse_block_id
    from baka.tune.scorers import SCORERS, RenderSettings

    if req.score not in SCORERS:
        SCORERS.get(req.score)  # raises with the nearest names
    METHODS.get(req.method)
    SAMPLERS.get(req.sampler_name)
    for b in req.blocks or []:
        parse_block_id(b)
    for text in (*req.prompts, req.negative_prompt):
        st.check_prompts(text)
    a, b = st.resolve("checkpoints", req.model_a), st.resolve("checkpoints", req.model_b)
    c = st.resolve("checkpoints", req.model_c) if req.model_c else None
    settings = RenderSettings(
        list(req.prompts),
        req.negative_prompt,
        req.steps,
        req.sampler_name,
        req.cfg_scale,
        req.width,
        req.height,
        req.seed,
        req.per_prompt,
    )
    settings.for_scorer(SCORERS.get(req.score))  # prompts / size rules of the scorer, checked now
    return a, b, c, settings


@router.get("/scorers")
def scorers() -> list[dict]:
    """The registered scorers probe and search take: what each measures, the figure a search
    maximises, whether it judges its own prompts (then the request gives none) and its fixed size."""
    from baka.tune.scorers import SCORERS, get_scorer

    out = []
    for name in SCORERS.names():
        s = get_scorer(name)
        out.append({"name": s.name, "doc": s.doc, "objective": s.objective, "own_prompts": bool(s.prompts),
                    "size": list(s.size) if s.size else None})  # fmt: skip
    return out


@router.post("/merge/probe")
def merge_probe(req: MergeProbe, st: StateDep) -> dict:
    """What each block carries: one block of B at a time (or all but one), scored. The result holds
    the figures, each block's effect and the heatmap (one U of blocks per figure) as base64 PNG."""
    from baka.tune.probe import MODES

    if req.mode not in MODES:
        raise BakaError(f"probe mode {req.mode!r}: one of {', '.join(MODES)}")
    a, b, c, settings = _scoring(st, req)

    def work(job: Job) -> dict:
        from baka.tune.plots import u_panels
        from baka.tune.probe import probe_blocks

        r = probe_blocks(
            a,
            b,
            req.score,
            settings,
            blocks=req.blocks,
            weight=req.weight,
            mode=req.mode,
            device=job.device,
            progress=False,
            method=req.method,
            model_c=c,
            beta=req.beta,
        )
        eff = r.effects()
        panels = [(k, {blk: e[k] for blk, e in eff.items()}) for k in r.base]
        heat = u_panels(panels, f"block effects ({r.scorer}, {r.mode}, weight {r.weight:g})")
        return {"scorer": r.scorer, "mode": r.mode, "weight": r.weight, "base": r.base,
                "full": r.full, "blocks": r.blocks, "effects": eff, "table": r.table(),
                "heatmap": image_b64(heat)}  # fmt: skip

    return {"job": st.submit("merge-probe", work).id}


@router.post("/merge/search")
def merge_search(req: MergeSearch, st: StateDep) -> dict:
    """optuna's TPE over the block weights for the best scorer figure. The study lives under the
    outputs folder (``searches/<job>.db``); the result holds the best weights, every trial's value,
    the plot (base64 PNG) and, with ``output_name``, the best merge as a new checkpoint."""
    a, b, c, settings = _scoring(st, req)
    out = output_path(st, req.output_name) if req.output_name else None
    folder = st.outputs.root / "searches"

    def work(job: Job) -> dict:
        from PIL import Image

        from baka.tune.search import search_weights

        folder.mkdir(parents=True, exist_ok=True)
        r = search_weights(
            a,
            b,
            req.score,
            settings,
            trials=req.trials,
            study=folder / f"{job.id}.db",
            objective=req.objective,
            minimize=req.minimize,
            blocks=req.blocks,
            fixed=req.fixed,
            step=req.step or None,
            seed=req.search_seed,
            output=out,
            device=job.device,
            progress=False,
            method=req.method,
            model_c=c,
            beta=req.beta,
            search_beta=req.search_beta,
        )
        plot = None
        if r.plot is not None:
            with Image.open(r.plot) as im:
                plot = image_b64(im)
        return {"trials": r.trials, "best_value": r.best_value, "best_weights": r.best_weights,
                "best_beta": r.best_beta, "best_figures": r.best_figures, "values": r.values,
                "checkpoint": r.model.name if r.model else None, "plot": plot}  # fmt: skip

    return {"job": st.submit("merge-search", work).id}
