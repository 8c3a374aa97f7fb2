"""Runtime (in-memory) block merge for previews: A and B stay resident, and changing block weights
re-lerps only the changed blocks straight into a live diffusers UNet (and text encoder for BASE)."""

from __future__ import annotations

import torch

from baka.merge.weights import Weights
from baka.models.blocks import BLOCK_IDS, N_BLOCKS, block_of_diffusers


class RuntimeBlockMerge:
    """Weighted-sum block merge applied in place to live modules.

    ``modules`` maps a component name (``unet``, ``text_encoder``, ``vae``) to a module whose
    parameters will be overwritten; ``a`` and ``b`` map the same names to diffusers-layout state
    dicts of the two models. ``set_weights`` recomputes ``lerp(A, B, w)`` only for blocks whose weight
    changed, in fp32 one tensor at a time, and copies the result into the module's own dtype.

    A and B are kept as given (no copies): pass memory-mapped views (``open_source``) to keep them in
    the page cache rather than in process memory.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], a: dict, b: dict, weights: Weights | None = None):
        self.modules = modules
        self.groups: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
            bid: [] for bid in BLOCK_IDS
        }
        missing: list[str] = []
        for comp, module in modules.items():
            own = dict(module.named_parameters()) | dict(module.named_buffers())
            for key, target in own.items():
                if not target.is_floating_point():
                    continue
                src_key = key if key in a[comp] else "text_model." + key
                if src_key not in a[comp] or src_key not in b[comp]:
                    missing.append(f"{comp}.{key}")
                    continue
                block = block_of_diffusers(comp, key) or "BASE"
                self.groups[block].append((target, a[comp][src_key], b[comp][src_key]))
        if missing:
            raise ValueError(f"{len(missing)} parameters have no A/B source (first: {missing[0]})")
        self.weights: list[float | None] = [None] * N_BLOCKS
        if weights is not None:
            self.set_weights(weights)

    @torch.no_grad()
    def set_weights(self, weights: Weights) -> list[str]:
        """Apply ``weights`` (26 values); returns the block ids that were recomputed."""
        if len(weights) != N_BLOCKS:
            raise ValueError(f"need {N_BLOCKS} weights")
        changed = []
        for i, (bid, w) in enumerate(zip(BLOCK_IDS, weights, strict=True)):
            if self.weights[i] == w:
                continue
            for target, a, b in self.groups[bid]:
                target.copy_(torch.lerp(a.float(), b.float(), float(w)))
            self.weights[i] = float(w)
            changed.append(bid)
        return changed
