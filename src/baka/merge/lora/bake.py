"""``baka lora bake MODEL LORA[:W[:LBW]] ...``: LoRA / LyCORIS networks merged into a checkpoint.

Each layer gets exactly what the live patch gives it (``baka.models.networks.patched_weight``: the
same delta maths, the same fp32 sum and cast, networks in the order given, IA3 / GLoRA / DoRA reading
the layer's original weight), so the baked model and the model with the live LoRAs produce the same
image. The checkpoint is streamed tensor by tensor; every other tensor is copied unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from baka.errors import BakaError
from baka.merge.lora.common import LoraArg
from baka.models import detect
from baka.models.io import DTYPE_BY_NAME
from baka.models.lbw import parse_lbw
from baka.models.networks import Module, load_network, multiplier, patched_bias, patched_weight
from baka.models.safetensors_io import TensorSpec, write_stream
from baka.models.sources import open_source, shapes_of_source
from baka.models.targets import checkpoint_targets


@dataclass
class BakeReport:
    path: Path
    applied: int  # module applications (a layer two networks patch counts twice)
    unmatched: list[str] = field(default_factory=list)  # "network: module (why)"


def bake_loras(
    model: str | Path,
    loras: list[LoraArg],
    output: str | Path,
    *,
    dtype: str | None = None,
    progress: bool = True,
) -> BakeReport:
    """Write ``model`` with ``loras`` merged in to ``output`` (.safetensors). ``dtype`` (fp16, bf16,
    fp32) casts the floating tensors; by default they keep the model's dtypes."""
    if not loras:
        raise BakaError("name at least one LoRA to bake")
    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise BakaError(f"{out}: the baked model is written as a .safetensors file")
    want = DTYPE_BY_NAME[dtype] if dtype else None
    nets = [(arg, load_network(arg.path), parse_lbw(arg.lbw)) for arg in loras]
    report = BakeReport(out, 0)
    with open_source(model) as src:
        shapes = shapes_of_source(src)
        detect.require_sd1(model, detect.classify(shapes), inpaint=True)
        targets = checkpoint_targets(shapes)
        plan: dict[str, list[tuple[Module, float]]] = {}  # LDM weight key -> (module, multiplier)
        for arg, net, blocks in nets:
            for name, m in net.modules.items():
                t = targets.get(name)
                extra = m.unsupported()
                if t is None or extra:
                    why = f" (unsupported {', '.join(extra)})" if t is not None else ""
                    report.unmatched.append(f"{net.name}: {name}{why}")
                    continue
                mult = multiplier(t.component, t.block, arg.weight, arg.weight, blocks)
                if mult != 0:
                    plan.setdefault(t.key, []).append((m, mult))
        if not plan and len(report.unmatched) == sum(len(n.modules) for _, n, _ in nets):
            raise BakaError(f"no module of {', '.join(a.path.name for a in loras)} fits {model}")
        bias_plan = {k.removesuffix(".weight") + ".bias": v for k, v in plan.items()}
        specs = {
            k: TensorSpec(want if want and s.dtype.is_floating_point else s.dtype, s.shape)
            for k, s in src.specs().items()
        }

        def tensors():
            for k, spec in specs.items():
                t = src.get(k)
                if k in plan:
                    orig = t
                    for m, mult in plan[k]:
                        t = patched_weight(t, m, mult, orig)
                        report.applied += 1
                elif k in bias_plan:
                    for m, mult in bias_plan[k]:
                        patched = patched_bias(t, m, mult)
                        t = t if patched is None else patched
                yield k, t.to(spec.dtype)

        meta = dict(getattr(src, "metadata", {}) or {})
        meta["baka_lora_bake"] = json.dumps(
            [
                {"lora": arg.path.name, "hash": net.hash, "weight": arg.weight, "lbw": arg.lbw}
                for arg, net, _ in nets
            ]
        )
        write_stream(out, specs, tensors(), meta, protect=[p for p in (src.path,) if p], progress=progress)
    return report


__all__ = ["BakeReport", "bake_loras"]
