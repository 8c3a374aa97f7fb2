"""Safe loading of pickled ``.ckpt``/``.pt`` checkpoints.

Never plain unpickling: ``torch.load(weights_only=True)`` refuses any global outside torch's
tensor-rebuilding allow-list. SD checkpoints trained with PyTorch Lightning also pickle a few
harmless objects (callback state, numpy scalars); those names are mapped to :class:`Inert`, a
stand-in that accepts its arguments and does nothing, so no code from the file ever runs.
"""

from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

import torch

from baka.errors import ModelFileError


class Inert:
    """Stand-in for an allow-listed non-tensor object: stores nothing, runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __new__(cls, *args: object, **kwargs: object) -> Inert:  # used by NEWOBJ
        return super().__new__(cls)

    def __setstate__(self, state: object) -> None:
        pass

    def __repr__(self) -> str:
        return "<inert>"


# Names seen in real SD1.x .ckpt files that are not tensors. Each maps to Inert.
_STAND_INS = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Int64DType",
    "_codecs.encode",  # how numpy scalars pickle their bytes
]


def load_ckpt(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a pickled checkpoint, flattened from a nested ``state_dict`` if present."""
    path = Path(path)
    sd = _find_state_dict(safe_torch_load(path))
    if sd is None:
        raise ModelFileError(path, "checkpoint holds no tensors")
    return sd


def safe_torch_load(path: str | Path) -> object:
    """``torch.load(weights_only=True)`` with the inert stand-ins; one-line errors naming the file.

    Whatever the file holds, the result is an object or one :class:`ModelFileError` line: never a
    traceback, and never torch's advice to retry without the safe loader.
    """
    path = Path(path)
    stand_ins: list = [(Inert, name) for name in _STAND_INS]
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise ModelFileError(path, "not a loadable checkpoint (empty file, 0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on pickle protocols: not one line
            with torch.serialization.safe_globals(stand_ins):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except ModelFileError:
        raise
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            bad = _unsupported_global(str(e))
            raise ModelFileError(
                path, f"refused: the pickle references {bad}, which could run code"
            ) from None
        raise ModelFileError(path, f"not a loadable checkpoint ({_torch_detail(str(e))})") from None
    except OSError as e:
        raise ModelFileError(path, f"not a loadable checkpoint ({e.strerror or e})") from None
    except EOFError:
        raise ModelFileError(path, "not a loadable checkpoint (truncated: the pickle ends early)") from None
    except RecursionError:
        raise ModelFileError(path, "not a loadable checkpoint (pickle nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - a crafted or truncated pickle can fail inside torch anywhere
        detail = _torch_detail(str(e))
        raise ModelFileError(
            path, f"not a loadable checkpoint (truncated or corrupt: {type(e).__name__}: {detail})"
        ) from None
    return obj


def _torch_detail(msg: str) -> str:
    """The useful part of a torch.load error, in one line, without its retry-unsafely advice."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    detail = lines[0] if lines else "unreadable"
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            detail = rest or (lines[i + 1] if i + 1 < len(lines) else detail)
            break
    if detail.startswith("Unsupported operand"):
        code = detail.split()[-1]
        # code2op is pickletools' documented-in-source opcode table (absent from its type stubs)
        ops = pickletools.code2op  # type: ignore[attr-defined]
        op = ops.get(chr(int(code))) if code.isdigit() and int(code) < 256 else None
        if op is not None and op.proto >= 4:
            return f"uses pickle opcode {op.name} (protocol {op.proto}), which the safe loader does not read"
        if op is not None:
            return f"uses pickle opcode {op.name}, which the safe loader does not read"
        return f"not a PyTorch pickle (unknown opcode {code})"
    if "weights_only" in detail or "Weights only" in detail:
        return "the safe loader cannot read this pickle"
    return detail[:200]


def _unsupported_global(msg: str) -> str:
    """The dotted name after 'GLOBAL' in torch's weights-only refusal message."""
    for line in msg.splitlines():
        if "GLOBAL" in line:
            name = line.split("GLOBAL", 1)[1].strip().split(" ")[0]
            if name:
                return name
    return "a non-allow-listed global"


def _find_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    """The tensors of ``obj`` or of its ``state_dict``/``model``/``module``/... (followed iteratively: a
    dict that contains itself ends the search instead of recursing forever)."""
    seen: set[int] = set()
    while isinstance(obj, dict) and id(obj) not in seen:
        seen.add(id(obj))
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
            continue
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        # "params_ema" / "params": BasicSR's (Real-ESRGAN's) wrappers, the EMA weights first
        keys = ("model", "module", "params_ema", "params")
        nxt = next((obj[k] for k in keys if isinstance(obj.get(k), dict)), None)
        if nxt is None:
            return None
        obj = nxt
    return None
