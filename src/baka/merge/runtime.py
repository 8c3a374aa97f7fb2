"""Runtime (in-memory) block merge for previews: A and B (and C) stay resident, and changing block
weights re-merges only the changed blocks straight into a live diffusers UNet (and text encoder / VAE
for BASE). Weighted sum by default; any merge method (add difference, TIES, DARE, cosineA / cosineB,
whose whole-model pass ``against`` runs over the two files first...) with its alpha and beta, each
key computed by the same function as the file merge, and supermerger's elemental rules with number
ratios (``set_elemental``; a key's alpha as the file merge gives it). It is a
:class:`~baka.models.patch.Patch`: ``remove()`` writes A back, which is where the live weights came
from, so the model is restored exactly without keeping a copy of it."""

from __future__ import annotations

from pathlib import Path

import torch

from baka.errors import BakaError
from baka.merge.weights import Weights
from baka.models.blocks import BLOCK_IDS, N_BLOCKS, block_of_diffusers
from baka.models.patch import Modules, Patch

LIVE_COMPONENTS = ("unet", "text_encoder", "vae")


class RuntimeBlockMerge(Patch):
    """Weighted-sum block merge applied in place to live modules.

    ``a`` and ``b`` map component names (``unet``, ``text_encoder``, ``vae``) to diffusers-layout
    state dicts of the two models; the live modules must hold A's weights when the patch is applied.
    ``set_weights`` recomputes ``lerp(A, B, w)`` only for blocks whose weight changed, in fp32 one
    tensor at a time, and copies the result into the module's own dtype.

    A and B are kept as given (no copies): pass memory-mapped views (``open_source``) to keep them in
    the page cache rather than in process memory. Given ``modules``, the patch is applied at once.
    """

    def __init__(
        self,
        modules: Modules | None,
        a: dict,
        b: dict,
        weights: Weights | None = None,
        *,
        method: str = "weight_sum",
        c: dict | None = None,
        beta: Weights | None = None,
        seed: int = 0,
        elemental: str = "",
        state: object = None,
    ):
        from baka.merge.methods import METHODS

        self.a, self.b, self.c = a, b, c
        self.method = METHODS.get(method)
        if self.method.prepare is not None and state is None:
            raise BakaError(
                f"{self.method.name} needs a pass over the whole model files: use RuntimeBlockMerge.against"
                " (or give its state)"
            )
        self.state = state  # the method's whole-model pass (cosine's similarity range), from the files
        if self.method.needs_c and c is None:
            raise BakaError(f"{self.method.name} needs model C")
        self.seed = seed
        self.pending = weights
        self.beta: tuple[float, ...] = (
            tuple(beta) if beta is not None else (self.method.beta_default,) * N_BLOCKS
        )
        self.groups: dict[str, list[tuple]] = {}
        self.weights: list[float | None] = [None] * N_BLOCKS
        self._betas: list[float | None] = [None] * N_BLOCKS
        self.rules: list = []
        self.fixed: dict[str, float] = {}  # LDM key -> the alpha an elemental rule gives it
        self.set_elemental(elemental)
        if modules is not None:
            self.apply(modules)

    def set_elemental(self, text: str) -> None:
        """supermerger's elemental rules (``Blocks:Elements:Ratio``, last match wins) from now on; number
        ratios only (the random R / U / X draw by a key's index in A's file: merge to a file for them).
        Every block is merged again at the next ``set_weights``."""
        from baka.merge.elemental import parse_rules

        rules = parse_rules(text)
        if any(isinstance(r.ratio, str) for r in rules):
            raise BakaError(
                "random elemental ratios (R, U, X) need a file merge; the runtime merge takes numbers"
            )
        if rules == self.rules:  # the rules the live merge holds already
            return
        self.rules = rules
        self.fixed = {}
        self.weights = [None] * N_BLOCKS  # everything again
        if self.groups:
            self._fix_keys()

    def _fix_keys(self) -> None:
        from baka.merge.elemental import override
        from baka.models.blocks import block_of

        nan = float("nan")
        for entries in self.groups.values():
            for *_, ldm_key in entries:
                v = override(self.rules, block_of(ldm_key), ldm_key, nan)
                if v == v:  # a rule matched (NaN never equals itself)
                    self.fixed[ldm_key] = v

    @classmethod
    def against(
        cls,
        a_ckpt,
        model_b: str | Path,
        weights: Weights | None = None,
        *,
        method: str = "weight_sum",
        model_c: str | Path | None = None,
        beta: Weights | None = None,
        seed: int = 0,
    ) -> RuntimeBlockMerge:
        """A (not yet applied) merge between a loaded checkpoint A and the model file ``model_b`` (and
        ``model_c``), over UNet, text encoder and VAE (BASE covers the latter two, as in merged files).
        A method with a whole-model pass (cosine A / B) runs it over the two files first."""
        from baka.merge.methods import METHODS
        from baka.models.io import load_checkpoint
        from baka.models.sources import open_source

        loaded = [a_ckpt.components(), load_checkpoint(model_b).components()]
        if model_c is not None:
            loaded.append(load_checkpoint(model_c).components())
        if any(not set(LIVE_COMPONENTS) <= set(m) for m in loaded):
            raise BakaError("runtime block merge needs UNet, text encoder and VAE in every model")
        a, b, *c = ({comp: m[comp] for comp in LIVE_COMPONENTS} for m in loaded)
        state, m = None, METHODS.get(method)
        if m.prepare is not None:  # cosine: its range over the files, as merged
            if a_ckpt.path is None:
                raise BakaError(f"{method} needs model A's file for its whole-model pass")
            with open_source(a_ckpt.path) as sa, open_source(model_b) as sb:
                state = m.state_of(sa, sb)
        return cls(
            None, a, b, weights, method=method, c=c[0] if c else None, beta=beta, seed=seed, state=state
        )

    def apply(self, modules: Modules) -> None:
        self.groups = {bid: [] for bid in BLOCK_IDS}
        missing: list[str] = []
        sources = [self.a, self.b] + ([self.c] if self.c is not None else [])
        for comp in self.a:
            own = dict(modules[comp].named_parameters()) | dict(modules[comp].named_buffers())
            for key, target in own.items():
                if not target.is_floating_point():
                    continue
                src_key = key if key in self.a[comp] else "text_model." + key
                if any(src_key not in m[comp] for m in sources):
                    missing.append(f"{comp}.{key}")
                    continue
                block = block_of_diffusers(comp, key) or "BASE"
                c = self.c[comp][src_key] if self.c is not None else None
                self.groups[block].append(
                    (target, self.a[comp][src_key], self.b[comp][src_key], c, _ldm(comp, src_key))
                )
        if missing:
            raise ValueError(f"{len(missing)} parameters have no A/B source (first: {missing[0]})")
        if self.rules:
            self._fix_keys()
        # the live weights are A's: a block at weight 0 needs no write when the method gives A there
        self.weights = [0.0] * N_BLOCKS
        self._betas = list(self.beta)
        if self.method.shortcut(0.0, 0.0) != "A" or self.rules:  # triple sum moves with beta alone;
            self.weights = [None] * N_BLOCKS  # an elemental rule can move a key of a block at 0
        if self.pending is not None:
            self.set_weights(self.pending)

    @torch.no_grad()
    def set_weights(self, weights: Weights, beta: Weights | None = None) -> list[str]:
        """Apply ``weights`` (26 alphas; ``beta``: 26 betas, default as before); returns the block ids
        that were recomputed."""
        if len(weights) != N_BLOCKS or (beta is not None and len(beta) != N_BLOCKS):
            raise ValueError(f"need {N_BLOCKS} weights")
        if beta is not None:
            self.beta = tuple(float(v) for v in beta)
        if not self.groups:  # not applied yet: remembered for apply()
            self.pending = tuple(weights)
            return []
        from baka.merge.methods import Ctx

        lerp = self.method.name == "weight_sum"
        changed = []
        for i, (bid, w) in enumerate(zip(BLOCK_IDS, weights, strict=True)):
            if self.weights[i] == w and self._betas[i] == self.beta[i]:
                continue
            for target, a, b, c, ldm_key in self.groups[bid]:
                wk = self.fixed.get(ldm_key, float(w))
                if lerp:  # the fast path: one fused op
                    target.copy_(torch.lerp(a.float(), b.float(), wk))
                elif self.method.keeps(ldm_key, tuple(a.shape), wk):
                    target.copy_(a)
                else:
                    ctx = Ctx(ldm_key, wk, self.beta[i], self.seed, self.state)
                    cf = None if c is None else c.float()
                    target.copy_(self.method.fn(a.float(), b.float(), cf, ctx))
            self.weights[i] = float(w)
            self._betas[i] = self.beta[i]
            changed.append(bid)
        self.pending = tuple(float(w) for w in weights)
        return changed

    @torch.no_grad()
    def remove(self) -> None:
        for i, bid in enumerate(BLOCK_IDS):
            moved = self.weights[i] != 0.0 or self.method.shortcut(0.0, self._betas[i] or 0.0) != "A"
            if moved or self.fixed:
                for target, a, *_ in self.groups[bid]:
                    target.copy_(a)
        self.groups = {}
        self.weights = [None] * N_BLOCKS


def _ldm(component: str, key: str) -> str:
    """The LDM key of a diffusers-layout key (the file merge's key names: seeded methods such as DARE
    draw the same masks live and in a file)."""
    from baka.models.keymap import (
        TE_PREFIX,
        UNET_PREFIX,
        VAE_PREFIX,
        te_key_to_ldm,
        unet_key_to_ldm,
        vae_key_to_ldm,
    )

    if component == "unet":
        return UNET_PREFIX + unet_key_to_ldm(key)
    if component == "vae":
        return VAE_PREFIX + vae_key_to_ldm(key)
    return TE_PREFIX + te_key_to_ldm(key)
