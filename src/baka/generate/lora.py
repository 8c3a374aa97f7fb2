"""LoRA and LyCORIS (LoCon, LoHa, LoKr) networks in kohya / A1111 format, applied as a reversible
patch (weights += delta, originals kept and restored), with lora-block-weight per-block multipliers.

Deltas (scale = alpha / rank, alpha defaulting to rank):
- LoRA / LoCon: up @ down (conv kernels flattened; Tucker ``lora_mid`` supported)
- LoHa: (w1a @ w1b) * (w2a @ w2b)  (Hadamard product; Tucker ``hada_t1/t2`` supported)
- LoKr: kron(w1, w2), each factor full or a low-rank product (scale 1 unless a factor is decomposed)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from baka.errors import BakaError, ModelFileError
from baka.models.blocks import BLOCK_IDS, BLOCK_INDEX, block_of_diffusers
from baka.models.keymap import te_key_to_ldm, unet_key_to_ldm
from baka.registry import Registry

BLOCKS17 = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT03",
    "OUT04",
    "OUT05",
    "OUT06",
    "OUT07",
    "OUT08",
    "OUT09",
    "OUT10",
    "OUT11",
)

LBW_PRESETS: Registry[tuple[float, ...]] = Registry("lora-block-weight preset")
for _name, _vals in {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}.items():
    LBW_PRESETS.add(_name, tuple(float(v) for v in _vals.split(",")))


def parse_lbw(spec: str | None) -> tuple[float, ...]:
    """26 block multipliers from a lora-block-weight preset or a 17/26-value list.

    17 values (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11) leave the other 9 blocks at 1,
    as the lora-block-weight extension does.
    """
    if not spec:
        return (1.0,) * 26
    try:
        vals = [float(v) for v in spec.split(",")]
    except ValueError:
        vals = list(LBW_PRESETS.get(spec))
    if len(vals) == 17:
        full = dict.fromkeys(BLOCK_IDS, 1.0)
        full.update(zip(BLOCKS17, vals, strict=True))
        return tuple(full[b] for b in BLOCK_IDS)
    if len(vals) == 26:
        return tuple(vals)
    raise BakaError(f"lbw {spec!r}: need 17 or 26 values or a preset ({', '.join(LBW_PRESETS.names())})")


@dataclass
class Module:
    """One network module: its tensors by short suffix (``lora_up.weight`` ...)."""

    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    KNOWN = {
        "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
        "lokr": {
            "lokr_w1",
            "lokr_w1_a",
            "lokr_w1_b",
            "lokr_w2",
            "lokr_w2_a",
            "lokr_w2_b",
            "lokr_t2",
            "alpha",
        },
    }

    def unsupported(self) -> list[str]:
        """Tensors this module carries that baka does not apply (e.g. DoRA's dora_scale, bias diffs)."""
        return sorted(set(self.tensors) - self.KNOWN.get(self.kind, set()))

    @property
    def kind(self) -> str:
        t = self.tensors
        if "lora_up.weight" in t:
            return "lora"
        if "hada_w1_a" in t:
            return "loha"
        if any(k.startswith("lokr_") for k in t):
            return "lokr"
        return "unknown"


@dataclass
class Network:
    name: str
    path: Path
    modules: dict[str, Module]
    hash: str = ""


def load_network(path: str | Path) -> Network:
    from baka.models.hashes import sha256_file
    from baka.models.io import read_raw

    path = Path(path)
    raw, _ = read_raw(path)
    modules: dict[str, Module] = {}
    for key, t in raw.items():
        name, _, suffix = key.partition(".")
        if not name.startswith(("lora_unet_", "lora_te_", "lora_te1_")):
            raise ModelFileError(path, f"not a kohya/A1111 LoRA (unexpected key {key!r})")
        modules.setdefault(name, Module(name)).tensors[suffix] = t
    if not modules:
        raise ModelFileError(path, "empty LoRA file")
    return Network(path.stem, path, modules, sha256_file(path)[:12])


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # core [r, r, k, k], b (down) [r, in], a (up) [out, r] -> [out, in, k, k]
    return torch.einsum("ijkl,jr,ip->prkl", core, b.flatten(1), a.flatten(1))


def module_delta(m: Module, shape: torch.Size) -> torch.Tensor:
    """The weight delta of one module (scale included, multiplier not)."""
    t = {k: v.float() for k, v in m.tensors.items()}
    kind = m.kind
    if kind == "lora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in t:
            delta = _tucker(t["lora_mid.weight"], up, down)
        else:
            delta = up.flatten(1) @ down.flatten(1)
    elif kind == "loha":
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        delta = w1 * w2
    elif kind == "lokr":
        rank = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        w2 = t.get("lokr_w2")
        if w2 is None:
            rank = t["lokr_w2_b"].shape[0]
            w2 = (
                _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
                if "lokr_t2" in t
                else t["lokr_w2_a"] @ t["lokr_w2_b"]
            )
        if w2.ndim == 4 and w1.ndim == 2:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    else:
        raise BakaError(f"{m.name}: unsupported network module (keys {sorted(m.tensors)})")
    alpha = t.get("alpha")
    scale = 1.0 if rank is None or alpha is None else float(alpha) / rank
    if delta.numel() != shape.numel():
        raise BakaError(f"{m.name}: network delta {tuple(delta.shape)} does not fit layer {tuple(shape)}")
    return delta.reshape(shape) * scale


def target_names(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None) -> dict[str, tuple]:
    """kohya module name -> (component, module, block). UNet modules answer to both the diffusers-path
    names (kohya) and the LDM-path names some A1111-era LoRAs use."""
    out: dict[str, tuple] = {}
    if unet is not None:
        for name, mod in unet.named_modules():
            if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                continue
            block = block_of_diffusers("unet", name + ".weight")
            out["lora_unet_" + name.replace(".", "_")] = ("unet", mod, block)
            try:
                ldm = unet_key_to_ldm(name + ".weight").removesuffix(".weight")
                out.setdefault("lora_unet_" + ldm.replace(".", "_"), ("unet", mod, block))
            except KeyError:
                pass
    if text_encoder is not None:
        for name, mod in text_encoder.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out["lora_te_" + te_key_to_ldm(name).replace(".", "_")] = ("text_encoder", mod, "BASE")
    return out


@dataclass
class LoraPatch:
    """Applied networks; ``remove()`` restores the exact original weights."""

    backups: dict[int, tuple[torch.nn.Module, torch.Tensor]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    applied: list[tuple[Network, float, float, str | None]] = field(default_factory=list)

    @torch.no_grad()
    def add(
        self,
        net: Network,
        targets: dict[str, tuple],
        te: float = 1.0,
        unet: float = 1.0,
        lbw: str | None = None,
    ) -> None:
        blocks = parse_lbw(lbw)
        for name, m in net.modules.items():
            hit = targets.get(name)
            if hit is None:
                self.unmatched.append(f"{net.name}: {name}")
                continue
            extra = m.unsupported()
            if extra:  # applying it without these would be silently wrong: report and skip instead
                self.unmatched.append(f"{net.name}: {name} (unsupported {', '.join(extra)})")
                continue
            comp, mod, block = hit
            mult = (te if comp == "text_encoder" else unet) * blocks[BLOCK_INDEX[block or "BASE"]]
            if mult == 0:
                continue
            w = mod.weight
            if id(mod) not in self.backups:
                self.backups[id(mod)] = (mod, w.detach().clone())
            w.copy_((w.float() + mult * module_delta(m, w.shape)).to(w.dtype))
        self.applied.append((net, te, unet, lbw))

    @torch.no_grad()
    def remove(self) -> None:
        for mod, original in self.backups.values():
            mod.weight.copy_(original)
        self.backups.clear()
        self.applied.clear()


_LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def find_network(name: str, folders: list[Path]) -> Path:
    for folder in folders:
        for suffix in _LORA_SUFFIXES:
            p = Path(folder) / f"{name}{suffix}"
            if p.is_file():
                return p
    where = ", ".join(str(f) for f in folders) or "no LoRA folder given (--lora-dir)"
    raise BakaError(f"LoRA {name!r} not found in {where}")


__all__ = ["LoraPatch", "Network", "load_network", "parse_lbw", "target_names", "find_network"]
