"""``baka merge search A B --score SCORER --trials N``: Bayesian optimisation of the 26 block weights
(optuna's TPE sampler, seeded). Each trial is a runtime merge (only the changed blocks re-lerped, no
file written), the scorer's fixed prompt set at fixed seeds, and one figure to maximise (or minimise).
The study lives in SQLite, so an interrupted search resumes where it stopped; the best weights are
written as a merge recipe (and, asked, the merged model) with a plot of the trials and the best U."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from baka.errors import BakaError
from baka.merge.recipe import Recipe
from baka.models.blocks import BLOCK_IDS, BLOCK_INDEX, N_BLOCKS, parse_block_id
from baka.tune.scorers import Figures, RenderSettings
from baka.tune.session import MergeSession


@dataclass
class SearchResult:
    study: Path
    trials: int  # finished trials in the study
    best_value: float
    best_weights: list[float]
    best_figures: Figures
    values: list[float | None] = field(default_factory=list)  # objective per trial, in order
    best_beta: list[float] = field(default_factory=list)
    recipe: Path | None = None
    model: Path | None = None
    plot: Path | None = None


def _study(path: Path, name: str, seed: int, minimize: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{path}",
        sampler=optuna.samplers.TPESampler(seed=seed),
        direction="minimize" if minimize else "maximize",
        load_if_exists=True,
    )


def search_weights(
    model_a: str | Path,
    model_b: str | Path,
    scorer: str,
    settings: RenderSettings,
    *,
    trials: int = 50,
    study: str | Path = "search.db",
    study_name: str | None = None,
    objective: str | None = None,
    minimize: bool = False,
    blocks: list[str] | None = None,
    fixed: float = 0.0,
    step: float | None = 0.05,
    seed: int = 0,
    output: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    method: str = "weight_sum",
    model_c: str | Path | None = None,
    beta: float | None = None,
    search_beta: bool = False,
) -> SearchResult:
    """Search the block weights (alpha = B's weight) of a weighted-sum merge of A and B for the best
    ``objective`` figure of ``scorer``. ``trials`` is the study's total: a resumed study runs only what
    is missing. ``blocks`` limits the search to those blocks (the rest stay at ``fixed``). ``method``
    (with ``model_c`` where it takes one) merges by another rule; its beta is ``beta`` everywhere, or
    searched per block too with ``search_beta``."""
    from tqdm import tqdm

    if trials < 1:
        raise BakaError(f"--trials must be at least 1, not {trials}")
    searched = [parse_block_id(b) for b in blocks] if blocks else list(BLOCK_IDS)
    study_path = Path(study)
    name = study_name or f"{Path(model_a).stem}+{Path(model_b).stem}:{scorer}"
    from baka.merge.methods import METHODS

    m = METHODS.get(method)
    if search_beta and not m.uses_beta:
        raise BakaError(f"{m.name} has no beta to search")
    beta0 = beta if beta is not None else m.beta_default
    session = MergeSession.open(
        model_a, model_b, scorer, settings, device, method=m.name, model_c=model_c, beta=(beta0,) * N_BLOCKS
    )
    target = objective or session.scorer.objective
    st = _study(study_path, name, seed, minimize)
    done = [t for t in st.trials if t.state.name == "COMPLETE"]
    recorded = st.user_attrs.get("setup")
    setup = {"model_a": str(model_a), "model_b": str(model_b), "scorer": session.scorer.name,
             "objective": target, "blocks": searched, "fixed": fixed, "step": step,
             "settings": session.settings.__dict__, "method": m.name, "beta": beta0,
             "model_c": str(model_c) if model_c else None, "search_beta": search_beta}  # fmt: skip
    if recorded is not None and recorded != json.loads(json.dumps(setup)):
        session.close()
        raise BakaError(f"{study_path}: study {name!r} was run with other settings; use another --study-name")
    if recorded is None:
        st.set_user_attr("setup", setup)
        # two known points first: every alpha 0 (A itself for weighted sum) and every alpha 0.5
        for v in (0.0, 0.5):
            st.enqueue_trial(dict.fromkeys(searched, v))

    def weights_of(params: dict, suffix: str = "", default: float = fixed) -> list[float]:
        w = [default] * N_BLOCKS
        for b in searched:
            w[BLOCK_INDEX[b]] = float(params.get(b + suffix, default))
        return w

    def run(trial) -> float:
        params = {b: trial.suggest_float(b, 0.0, 1.0, step=step) for b in searched}
        if search_beta:
            params |= {f"{b}_beta": trial.suggest_float(f"{b}_beta", 0.0, 1.0, step=step) for b in searched}
        figures = session.score(weights_of(params), weights_of(params, "_beta", beta0))
        if target not in figures:
            raise BakaError(f"scorer {session.scorer.name} has no figure {target!r} ({', '.join(figures)})")
        trial.set_user_attr("figures", figures)
        return figures[target]

    left = trials - len(done)
    try:
        if left > 0:
            bar = tqdm(total=left, desc="search", disable=not progress)
            st.optimize(run, n_trials=left, callbacks=[lambda s, t: bar.update(1)], catch=())
            bar.close()
    finally:
        session.close()
    finished = [t for t in st.trials if t.state.name == "COMPLETE"]
    best = st.best_trial
    res = SearchResult(
        study_path,
        len(finished),
        float(best.value),
        weights_of(best.params),
        dict(best.user_attrs.get("figures", {})),
        [t.value if t.state.name == "COMPLETE" else None for t in st.trials],
        best_beta=weights_of(best.params, "_beta", beta0),
    )
    models = [str(model_a), str(model_b)] + ([str(model_c)] if model_c else [])
    recipe = Recipe(m.name, models, tuple(res.best_weights), tuple(res.best_beta))
    res.recipe = _write_recipe(recipe, study_path.with_suffix(".recipe.json"))
    res.plot = _write_plot(res, st.direction.name == "MINIMIZE", study_path.with_suffix(".png"), target)
    if output is not None:
        from baka.merge.engine import merge_models

        res.model = merge_models(recipe, output, progress=progress).path
    return res


def _write_recipe(recipe: Recipe, path: Path) -> Path:
    from baka.models.safetensors_io import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(recipe.to_json())
    return path


def _write_plot(res: SearchResult, minimize: bool, path: Path, target: str) -> Path:
    from PIL import Image

    from baka.tune.plots import save_png, trials_plot, u_panels

    best, run = [], None
    for v in res.values:
        if v is not None:
            run = v if run is None else (min(run, v) if minimize else max(run, v))
        best.append(run if run is not None else 0.0)
    left = trials_plot(res.values, best, f"{target} per trial (best {res.best_value:.4g})")
    right = u_panels([("best weights", dict(zip(BLOCK_IDS, res.best_weights, strict=True)))])
    img = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    img.paste(left, (0, 0))
    img.paste(right, (left.width, 0))
    return save_png(img, path)


__all__ = ["SearchResult", "search_weights"]
