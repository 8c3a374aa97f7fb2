"""Model hashes as A1111 and the add-network extension compute them."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path, start: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def autov2(path: str | Path) -> str:
    """A1111 "Model hash": sha256 of the whole file, first 10 hex digits."""
    return sha256_file(path)[:10]


def legacy_hash(path: str | Path) -> str:
    """A1111's old model hash: sha256 of 64 KiB at offset 0x100000, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def addnet_hash(path: str | Path) -> str:
    """sshs/addnet hash of a safetensors file: sha256 of everything after the header.

    Unchanged by metadata edits, so it identifies the tensors themselves.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return sha256_file(path, start=8 + n)


def all_hashes(path: str | Path, *, progress: bool = False) -> dict[str, str]:
    """sha256, AutoV2, legacy and (for safetensors) addnet hashes in one pass over the file."""
    from tqdm import tqdm

    bar = tqdm(
        total=Path(path).stat().st_size,
        unit="B",
        unit_scale=True,
        desc="hash",
        disable=not progress,
        leave=False,
    )
    whole = hashlib.sha256()
    payload = hashlib.sha256() if str(path).endswith(".safetensors") else None
    with open(path, "rb") as f:
        head = f.read(8)
        skip = 8 + struct.unpack("<Q", head)[0] if payload and len(head) == 8 else 0
        whole.update(head)
        pos = len(head)
        while chunk := f.read(_CHUNK):
            whole.update(chunk)
            if payload is not None and pos + len(chunk) > skip:
                payload.update(chunk[max(0, skip - pos) :])
            pos += len(chunk)
            bar.update(len(chunk))
    bar.close()
    out = {"sha256": whole.hexdigest(), "autov2": whole.hexdigest()[:10], "legacy": legacy_hash(path)}
    if payload is not None:
        out["addnet"] = payload.hexdigest()
    return out
