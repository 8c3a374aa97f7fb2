"""Runtime (in-memory) block merge for previews: A and B stay resident, and changing block weights
re-lerps only the changed blocks straight into a live diffusers UNet (and text encoder / VAE for
BASE). It is a :class:`~baka.models.patch.Patch`: ``remove()`` writes A back, which is where the live
weights came from, so the model is restored exactly without keeping a copy of it."""

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

    def __init__(self, modules: Modules | None, a: dict, b: dict, weights: Weights | None = None):
        self.a, self.b = a, b
        self.pending = weights
        self.groups: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.weights: list[float | None] = [None] * N_BLOCKS
        if modules is not None:
            self.apply(modules)

    @classmethod
    def against(cls, a_ckpt, model_b: str | Path, weights: Weights | None = None) -> RuntimeBlockMerge:
        """A (not yet applied) merge between a loaded checkpoint A and the model file ``model_b``, over
        UNet, text encoder and VAE (BASE covers the latter two, as in merged files)."""
        from baka.models.io import load_checkpoint

        a, b = a_ckpt.components(), load_checkpoint(model_b).components()
        if not set(LIVE_COMPONENTS) <= set(a) or not set(LIVE_COMPONENTS) <= set(b):
            raise BakaError("runtime block merge needs UNet, text encoder and VAE in both models")
        return cls(None, {c: a[c] for c in LIVE_COMPONENTS}, {c: b[c] for c in LIVE_COMPONENTS}, weights)

    def apply(self, modules: Modules) -> None:
        self.groups = {bid: [] for bid in BLOCK_IDS}
        missing: list[str] = []
        for comp in self.a:
            own = dict(modules[comp].named_parameters()) | dict(modules[comp].named_buffers())
            for key, target in own.items():
                if not target.is_floating_point():
                    continue
                src_key = key if key in self.a[comp] else "text_model." + key
                if src_key not in self.a[comp] or src_key not in self.b[comp]:
                    missing.append(f"{comp}.{key}")
                    continue
                block = block_of_diffusers(comp, key) or "BASE"
                self.groups[block].append((target, self.a[comp][src_key], self.b[comp][src_key]))
        if missing:
            raise ValueError(f"{len(missing)} parameters have no A/B source (first: {missing[0]})")
        # the live weights are A's: a block at weight 0 needs no write
        self.weights = [0.0] * N_BLOCKS
        if self.pending is not None:
            self.set_weights(self.pending)

    @torch.no_grad()
    def set_weights(self, weights: Weights) -> list[str]:
        """Apply ``weights`` (26 values); returns the block ids that were recomputed."""
        if len(weights) != N_BLOCKS:
            raise ValueError(f"need {N_BLOCKS} weights")
        if not self.groups:  # not applied yet: remembered for apply()
            self.pending = tuple(weights)
            return []
        changed = []
        for i, (bid, w) in enumerate(zip(BLOCK_IDS, weights, strict=True)):
            if self.weights[i] == w:
                continue
            for target, a, b in self.groups[bid]:
                target.copy_(torch.lerp(a.float(), b.float(), float(w)))
            self.weights[i] = float(w)
            changed.append(bid)
        self.pending = tuple(float(w) for w in weights)
        return changed

    @torch.no_grad()
    def remove(self) -> None:
        for i, bid in enumerate(BLOCK_IDS):
            if self.weights[i] not in (0.0, None):
                for target, a, _b in self.groups[bid]:
                    target.copy_(a)
        self.groups = {}
        self.weights = [None] * N_BLOCKS
