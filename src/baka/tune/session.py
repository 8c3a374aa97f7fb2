"""One model A with a live block merge toward B: set 26 weights, render the scorer's pictures, score
them. ``baka merge probe`` and ``baka merge search`` both drive it; no file is written per setting
(the merge is a runtime patch that re-lerps only the blocks whose weight changed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from baka.merge.weights import Weights
from baka.models.blocks import N_BLOCKS
from baka.tune.scorers import Figures, RenderSettings, Scorer, get_scorer


@dataclass
class MergeSession:
    """``model_a`` loaded once, ``model_b`` resident beside it, the scorer and its render settings."""

    model_a: str | Path
    model_b: str | Path
    scorer: Scorer
    settings: RenderSettings
    device: str | None = None
    method: str = "weight_sum"
    model_c: str | Path | None = None
    beta: Weights | None = None  # the method's 26 betas (default: its own default)
    reference: list | None = field(default=None, init=False)

    @classmethod
    def open(
        cls,
        model_a: str | Path,
        model_b: str | Path,
        scorer: str,
        settings: RenderSettings,
        device=None,
        *,
        method: str = "weight_sum",
        model_c: str | Path | None = None,
        beta: Weights | None = None,
    ) -> MergeSession:
        s = get_scorer(scorer)
        session = cls(model_a, model_b, s, settings.for_scorer(s), device, method, model_c, beta)
        session._load()
        return session

    def _load(self) -> None:
        from baka.generate.engine import Generator
        from baka.merge.runtime import RuntimeBlockMerge
        from baka.world.eval import schedule_flags

        kw = {"device": self.device} if self.device else {}
        self.gen = Generator(self.model_a, progress=False, **kw)
        self.v_pred, self.zero_snr = schedule_flags(self.gen, None, None)
        merge = RuntimeBlockMerge.against(
            self.gen.ckpt, self.model_b, method=self.method, model_c=self.model_c, beta=self.beta
        )
        self.merge = self.gen.patcher.apply(merge)
        if self.scorer.needs_reference:
            self.reference = self.render((0.0,) * N_BLOCKS)

    def render(self, weights: Weights, beta: Weights | None = None) -> list:
        """The pictures of every prompt (image k of prompt i at seed + 1000 i + k) with the merge at
        ``weights`` (alpha per block; ``beta``: the method's betas, default unchanged)."""
        from baka.generate.engine import GenParams

        self.merge.set_weights(tuple(weights), tuple(beta) if beta is not None else None)
        s = self.settings
        images = []
        for i, prompt in enumerate(s.prompts):
            p = GenParams(
                prompt,
                s.negative,
                steps=s.steps,
                sampler=s.sampler,
                cfg=s.cfg,
                seed=s.seed + 1000 * i,
                width=s.width,
                height=s.height,
                batch=s.per_prompt,
                v_pred=self.v_pred,
                zero_snr=self.zero_snr,
            )
            images += [r.image for r in self.gen(p)]
        return images

    def score(self, weights: Weights, beta: Weights | None = None) -> Figures:
        images = self.render(weights, beta)
        return self.scorer.fn(images, self.settings.prompts, self.reference)

    def close(self) -> None:
        self.gen.patcher.remove(self.merge)


__all__ = ["MergeSession"]
