"""Tiny SD1.x-topology models built in code (tests, the demo) and real-size random checkpoints
(I/O and memory tests, benchmarks). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from baka.models.config import MAKERS, SDConfig, module_keys, sd15_config, tiny_config
from baka.models.convert import COMPONENTS, POSITION_IDS, diffusers_to_ldm, key_table
from baka.models.safetensors_io import TensorSpec, write_stream


def tiny_checkpoint(seed: int = 0, cfg: SDConfig | None = None) -> dict[str, torch.Tensor]:
    """A randomly initialised tiny SD1.x model as an LDM state dict (fp32).

    Weights are the libraries' default init plus seeded noise, so different seeds differ everywhere
    (also in norms and zero-initialised layers) and merges have something to mix.
    """
    cfg = cfg or tiny_config()
    gen = torch.Generator().manual_seed(seed)
    comps = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for comp in COMPONENTS:
            sd = MAKERS[comp](getattr(cfg, comp)).state_dict()
            comps[comp] = {
                k: (v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
                for k, v in sd.items()
            }
    return diffusers_to_ldm(comps, cfg)


def model_specs(cfg: SDConfig, dtype: torch.dtype = torch.float16) -> dict[str, TensorSpec]:
    """LDM key -> spec of every tensor of an SD1.x model of config ``cfg`` (no weights built)."""
    from baka.models.meta import empty_weights

    shapes: dict[str, tuple[int, ...]] = {}
    with empty_weights():
        mods = {c: MAKERS[c](getattr(cfg, c)) for c in COMPONENTS}
    table = key_table(cfg)
    for ldm_key, (comp, dk) in table.items():
        shape = tuple(mods[comp].state_dict()[dk].shape)
        if ldm_key.endswith(
            ("attn_1.q.weight", "attn_1.k.weight", "attn_1.v.weight", "attn_1.proj_out.weight")
        ):
            shape = (*shape, 1, 1)
        shapes[ldm_key] = shape
    specs = {k: TensorSpec(dtype, shapes[k]) for k in sorted(shapes)}
    specs[POSITION_IDS] = TensorSpec(torch.int64, (1, cfg.text_encoder["max_position_embeddings"]))
    return dict(sorted(specs.items()))


def write_random_checkpoint(
    path: str | Path, seed: int = 0, *, real_size: bool = True, dtype: torch.dtype = torch.float16
) -> Path:
    """Stream a random SD1.x checkpoint to ``path`` (real size: 1.07 G parameters, ~2.1 GB in fp16)
    without ever holding it in memory."""
    cfg = sd15_config() if real_size else tiny_config()
    specs = model_specs(cfg, dtype)
    gen = torch.Generator().manual_seed(seed)

    def tensors():
        for k, s in specs.items():
            if k == POSITION_IDS:
                yield k, torch.arange(s.shape[1], dtype=torch.int64)[None]
            else:
                yield k, (torch.randn(s.shape, generator=gen) * 0.02).to(dtype)

    return write_stream(path, specs, tensors(), {"format": "pt", "baka_random": str(seed)})


__all__ = ["tiny_checkpoint", "model_specs", "write_random_checkpoint", "module_keys"]
