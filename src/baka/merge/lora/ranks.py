"""How many singular values a module keeps when a weight difference is factored into a LoRA.

``fixed`` keeps the requested dim. The others are kohya's ``resize_lora.py`` dynamic rules (facts from
its documented formulas), capped at the requested dim and at one less than the matrix's full rank:

- ``sv_ratio:R``: the singular values larger than the largest one divided by R
- ``sv_fro:F``: the fewest values whose squares keep F^2 of the squared Frobenius norm
- ``sv_cumulative:C``: the fewest values whose sum reaches C of the total
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from baka.errors import BakaError
from baka.registry import Registry

RankFn = Callable[[torch.Tensor, float], int]  # singular values (descending), parameter -> count
RANK_RULES: Registry[RankFn] = Registry("rank rule")


def _clip(n: int, s: torch.Tensor) -> int:
    return max(1, min(n, len(s) - 1)) if len(s) > 1 else 1


@RANK_RULES.register("sv_ratio")
def sv_ratio(s: torch.Tensor, ratio: float) -> int:
    return _clip(int((s > s[0] / ratio).sum()), s)


@RANK_RULES.register("sv_fro")
def sv_fro(s: torch.Tensor, target: float) -> int:
    kept = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
    return _clip(int(torch.searchsorted(kept, target**2)) + 1, s)


@RANK_RULES.register("sv_cumulative")
def sv_cumulative(s: torch.Tensor, target: float) -> int:
    kept = torch.cumsum(s.double(), 0) / float(s.double().sum())
    return _clip(int(torch.searchsorted(kept, target)) + 1, s)


@dataclass(frozen=True)
class RankRule:
    """A parsed ``--rank-rule``: ``fixed`` or ``NAME:PARAM``."""

    name: str = "fixed"
    param: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> RankRule:
        if not spec or spec == "fixed":
            return cls()
        name, _, value = spec.partition(":")
        fn_name = RANK_RULES.canonical(name)
        try:
            param = float(value)
        except ValueError:
            raise BakaError(f"rank rule {spec!r}: want NAME:NUMBER, e.g. sv_fro:0.9") from None
        if param <= 0:
            raise BakaError(f"rank rule {spec!r}: the parameter must be positive")
        return cls(fn_name, param)

    def rank(self, s: torch.Tensor, dim: int) -> int:
        """Singular values to keep of ``s`` (descending) for a module whose dim is ``dim``."""
        n = min(dim, len(s))
        if self.name == "fixed":
            return n
        return min(n, RANK_RULES.get(self.name)(s, self.param))

    def __str__(self) -> str:
        return self.name if self.name == "fixed" else f"{self.name}:{self.param:g}"


__all__ = ["RANK_RULES", "RankRule"]
