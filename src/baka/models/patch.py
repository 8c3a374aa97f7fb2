"""One contract for everything applied to a live model: LoRA / LyCORIS weights, FreeU hooks, the
runtime block merge.

A :class:`Patch` is applied to a set of named live modules (``unet``, ``text_encoder``, ``vae``) and
``remove()`` restores them exactly (weights bit for bit, hooks detached). Patches are applied through
a :class:`ModelPatcher` handle (the idea of ComfyUI's ModelPatcher): it keeps them in order and takes
them off in reverse, so stacked patches (a runtime merge under a LoRA under FreeU) unwind cleanly.
Nothing is monkey-patched globally.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch

Modules = Mapping[str, torch.nn.Module]
P = TypeVar("P", bound="Patch")


class Patch:
    """Base of every live-model patch: ``apply(modules)`` then ``remove()`` restores exactly."""

    def apply(self, modules: Modules) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class WeightBackup:
    """Originals of the parameters a patch overwrites, taken on first write and put back on restore
    (only touched tensors are copied, so a patch on a few layers costs a few layers of memory)."""

    def __init__(self) -> None:
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(self, param: torch.Tensor) -> None:
        if id(param) not in self._saved:
            self._saved[id(param)] = (param, param.detach().clone())

    def original(self, param: torch.Tensor) -> torch.Tensor:
        """The value ``param`` had when it was first kept (the tensor itself if never kept)."""
        return self._saved[id(param)][1] if id(param) in self._saved else param

    @torch.no_grad()
    def restore(self) -> None:
        for param, original in self._saved.values():
            param.copy_(original)
        self._saved.clear()

    def __len__(self) -> int:
        return len(self._saved)


class ModelPatcher:
    """A live model's modules plus the patches applied to them, in order."""

    def __init__(self, modules: Modules):
        self.modules = dict(modules)
        self.patches: list[Patch] = []

    def apply(self, patch: P) -> P:
        patch.apply(self.modules)
        self.patches.append(patch)
        return patch

    def remove(self, patch: Patch) -> None:
        """Take one patch off. Patches applied after it are taken off first and put back after, so
        each one is removed from the state it was applied to."""
        i = self.patches.index(patch)
        later = self.patches[i + 1 :]
        for p in reversed(later):
            p.remove()
        patch.remove()
        del self.patches[i:]
        for p in later:
            self.apply(p)

    def remove_all(self) -> None:
        while self.patches:
            self.patches.pop().remove()

    @contextmanager
    def patched(self, *patches: Patch | None) -> Iterator[None]:
        """Apply ``patches`` (None entries skipped) for the duration of a block, then remove them."""
        applied: list[Patch] = []
        try:
            for p in patches:
                if p is not None:
                    applied.append(self.apply(p))
            yield
        finally:
            for p in reversed(applied):
                self.remove(p)


__all__ = ["ModelPatcher", "Modules", "Patch", "WeightBackup"]
