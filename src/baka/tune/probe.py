"""``baka merge probe A B``: what each block carries. ``single`` (the default): every block is merged
alone (B's weights in that block, A's everywhere else; a runtime merge), the scorer's pictures rendered
at fixed seeds and scored, and a block's effect is its figures minus A's. ``leave-out``: every block but
one at B, and the effect is the figures minus the whole merge's (what B loses without that block), for
traits no single block carries alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS, BLOCK_INDEX, N_BLOCKS, parse_block_id
from baka.tune.scorers import Figures, RenderSettings
from baka.tune.session import MergeSession

MODES = ("single", "leave-out")


@dataclass
class ProbeResult:
    scorer: str
    weight: float
    mode: str  # single | leave-out
    base: Figures  # model A (every block at 0)
    full: Figures  # every block at the weight (model B at weight 1)
    blocks: dict[str, Figures]  # block -> figures with only that block at the weight
    settings: dict

    def effects(self) -> dict[str, dict[str, float]]:
        """block -> figure -> change against A (single) or against the whole merge (leave-out)."""
        ref = self.base if self.mode == "single" else self.full
        return {b: {k: v - ref[k] for k, v in f.items()} for b, f in self.blocks.items()}

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "effects": self.effects()}, indent=1)

    def table(self) -> str:
        keys = list(self.base)
        head = f"{'block':<6} " + " ".join(f"{k[:16]:>16}" for k in keys)
        rows = [head, f"{'A':<6} " + " ".join(f"{self.base[k]:>16.4f}" for k in keys)]
        rows.append(f"{'all':<6} " + " ".join(f"{self.full[k]:>16.4f}" for k in keys))
        rows.append(f"effect ({'block alone - A' if self.mode == 'single' else 'all but the block - all'}):")
        for b, eff in self.effects().items():
            rows.append(f"{b:<6} " + " ".join(f"{eff[k]:>+16.4f}" for k in keys))
        return "\n".join(rows)


def probe_blocks(
    model_a: str | Path,
    model_b: str | Path,
    scorer: str,
    settings: RenderSettings,
    *,
    blocks: list[str] | None = None,
    weight: float = 1.0,
    mode: str = "single",
    device: str | None = None,
    progress: bool = True,
    method: str = "weight_sum",
    model_c: str | Path | None = None,
    beta: float | None = None,
) -> ProbeResult:
    """Score A, the merge of every block at ``weight``, and each block (all 26, or ``blocks``) alone
    (``single``) or left out of the whole merge (``leave-out``)."""
    if mode not in MODES:
        raise BakaError(f"probe mode {mode!r}: one of {', '.join(MODES)}")
    chosen = [parse_block_id(b) for b in blocks] if blocks else list(BLOCK_IDS)
    if len(set(chosen)) != len(chosen):
        raise BakaError("a block is named twice")
    betas = (beta,) * N_BLOCKS if beta is not None else None
    session = MergeSession.open(
        model_a, model_b, scorer, settings, device, method=method, model_c=model_c, beta=betas
    )
    try:
        zeros = [0.0] * N_BLOCKS
        base = session.score(zeros)
        per: dict[str, Figures] = {}
        full = session.score([weight] * N_BLOCKS)
        for b in tqdm(chosen, desc="probe", disable=not progress):
            w = list(zeros) if mode == "single" else [weight] * N_BLOCKS
            w[BLOCK_INDEX[b]] = weight if mode == "single" else 0.0
            per[b] = session.score(w)
    finally:
        session.close()
    return ProbeResult(session.scorer.name, weight, mode, base, full, per, dict(session.settings.__dict__))


def probe_png(result: ProbeResult, path: str | Path) -> Path:
    """One U per figure: each block's effect (red: raises it, blue: lowers it)."""
    from baka.tune.plots import save_png, u_panels

    eff = result.effects()
    panels = [(k, {b: e[k] for b, e in eff.items()}) for k in result.base]
    title = f"block effects ({result.scorer}, {result.mode}, weight {result.weight:g})"
    return save_png(u_panels(panels, title), path)


__all__ = ["ProbeResult", "probe_blocks", "probe_png"]
