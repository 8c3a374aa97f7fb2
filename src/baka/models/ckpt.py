"""Safe loading of pickled ``.ckpt``/``.pt`` checkpoints.

Never plain unpickling: ``torch.load(weights_only=True)`` refuses any global outside torch's
tensor-rebuilding allow-list. SD checkpoints trained with PyTorch Lightning also pickle a few
harmless objects (callback state, numpy scalars); those names are mapped to :class:`Inert`, a
stand-in that accepts its arguments and does nothing, so no code from the file ever runs.
"""

from __future__ import annotations

import pickle
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
    """``torch.load(weights_only=True)`` with the inert stand-ins; one-line errors naming the file."""
    path = Path(path)
    stand_ins: list = [(Inert, name) for name in _STAND_INS]
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).split("\n")[0]
        if "GLOBAL" in str(e):
            bad = _unsupported_global(str(e))
            raise ModelFileError(
                path, f"refused: the pickle references {bad}, which could run code"
            ) from None
        raise ModelFileError(path, f"not a loadable checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelFileError(path, f"not a loadable checkpoint ({str(e).splitlines()[0][:200]})") from None
    return obj


def _unsupported_global(msg: str) -> str:
    """The dotted name after 'GLOBAL' in torch's weights-only refusal message."""
    for line in msg.splitlines():
        if "GLOBAL" in line:
            name = line.split("GLOBAL", 1)[1].strip().split(" ")[0]
            if name:
                return name
    return "a non-allow-listed global"


def _find_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            return _find_state_dict(obj["state_dict"])
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        for key in ("model", "module"):
            if isinstance(obj.get(key), dict):
                return _find_state_dict(obj[key])
    return None


def save_ckpt(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write an A1111-style ``{"state_dict": ...}`` pickle (for interop tests and old tools)."""
    torch.save({"state_dict": tensors}, path)
