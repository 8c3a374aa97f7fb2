"""Training logs through accelerate's trackers, with kohya's settings and names.

kohya's rules (library/train_util.py ``prepare_accelerator``): ``logging_dir`` alone turns TensorBoard on;
``log_with = "tensorboard" | "wandb" | "all"`` picks the trackers (TensorBoard needs ``logging_dir``); a
run logs into ``logging_dir/{log_prefix}{YYYYmmddHHMMSS}`` under ``log_tracker_name`` (kohya's default for
LoRA training is "network_train"). Per step: ``loss/current``, ``loss/average`` (the mean over the last
epoch's worth of steps, kohya's LossRecorder), ``lr/unet`` and ``lr/textencoder`` (one entry per LR group
when blocks or LoRA+ make several); ``loss/epoch`` at each epoch's end (at step = epoch, as kohya);
``loss/validation`` when validation runs; sample images under ``samples/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from baka.errors import BakaError

TRACKERS = ("tensorboard", "wandb", "all")
DEFAULT_TRACKER_NAME = {"lora": "network_train", "full": "finetuning", "embedding": "textual_inversion"}


def log_target(cfg) -> tuple[str | None, Path | None]:
    """(accelerate's ``log_with``, the run's log folder) per kohya's rules; (None, None) without logs."""
    log_with = cfg.log_with
    if log_with is None and cfg.logging_dir:
        log_with = "tensorboard"
    if log_with is None:
        return None, None
    if log_with not in TRACKERS:
        import difflib

        hint = difflib.get_close_matches(log_with, TRACKERS, n=1)
        raise BakaError(
            f"log_with must be one of {', '.join(TRACKERS)}, not {log_with!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )
    if log_with in ("tensorboard", "all") and not cfg.logging_dir:
        raise BakaError("log_with = 'tensorboard' needs logging_dir (kohya's rule)")
    needed = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[log_with]
    for pkg in needed:
        import importlib.util

        if importlib.util.find_spec(pkg) is None:
            raise BakaError(f"log_with = {log_with!r} needs the {pkg} package (pip install {pkg})")
    folder = None
    if cfg.logging_dir:
        folder = Path(cfg.logging_dir) / f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    return log_with, folder


def lr_names(groups: list[dict]) -> list[str]:
    """kohya-style names of the optimizer groups' LRs: ``lr/unet`` / ``lr/textencoder`` when all of a
    kind's groups share one LR (the schedule scales every group alike, so they stay equal), else
    ``lr/unet/IN04`` ... per block (a block with two LRs, as LoRA+ makes, gets the group index too)."""
    kinds = ["textencoder" if g.get("te") else "unet" for g in groups]
    lrs: dict[str, set[float]] = {}
    for g, kind in zip(groups, kinds, strict=True):
        lrs.setdefault(kind, set()).add(float(g["lr"]))
    names: list[str] = []
    for i, (g, kind) in enumerate(zip(groups, kinds, strict=True)):
        one = len(lrs[kind]) == 1
        name = f"lr/{kind}" if one else f"lr/{kind}/{g.get('block', i)}"
        if not one and name in names:
            name = f"{name}/{i}"
        names.append(name)
    return names


@dataclass
class StepLogs:
    """kohya's LossRecorder: ``loss/average`` is the mean of the last ``window`` steps' losses (one epoch)."""

    window: int
    recent: list[float] = field(default_factory=list)

    def step(self, loss: float, lrs: list[float], names: list[str]) -> dict[str, float]:
        self.recent = (self.recent + [loss])[-self.window :]
        logs = {"loss/current": loss, "loss/average": sum(self.recent) / len(self.recent)}
        logs.update(zip(names, lrs, strict=True))
        return logs
