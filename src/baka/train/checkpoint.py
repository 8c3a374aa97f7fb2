"""Resumable training checkpoints, written atomically: a folder built under a temp name and renamed,
then the ``latest`` pointer replaced by rename. A kill -9 at any moment leaves either the previous
checkpoint or the new one, never a half-written one.

No RNG state is stored: every random draw of a step is seeded from (seed, step, rank), and the data
order from (seed, epoch), so weights + optimizer + step are the whole state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from baka.models.safetensors_io import SafetensorsFile, save_file

KEEP = 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: dict, state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "trainable.safetensors")
    torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.part"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    p = root / "latest"
    if not p.exists():
        return None
    ck = root / p.read_text().strip()
    return ck if ck.is_dir() else None


def load(ck: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable tensors, optimizer state, trainer state)."""
    with SafetensorsFile(ck / "trainable.safetensors") as f:
        tensors = {k: f.get(k).clone() for k in f.keys()}
    optimizer = torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu")
    state = json.loads((ck / "state.json").read_text())
    return tensors, optimizer, state
