"""Merge methods. Each one maps the matching tensors of models A, B (and C) to the merged tensor,
given that key's alpha and beta (from the 26 block weights). Math is done in fp32 by the caller.

Names follow supermerger's calcmodes; alpha is the weight of B (A1111/supermerger convention).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from baka.registry import Registry


@dataclass(frozen=True)
class Ctx:
    key: str
    alpha: float
    beta: float
    seed: int = 0


MethodFn = Callable[[Tensor, Tensor, Tensor | None, Ctx], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    needs_c: bool = False
    accepts_c: bool = False  # C is optional (TIES merges B - A and C - A when C is given)
    uses_beta: bool = False
    elementwise: bool = True  # output element i depends only on input element i: may run in row chunks
    beta_default: float = 0.0
    # returns "A" / "B" when, for these (alpha, beta), the result is exactly that input (no math needed)
    shortcut: Callable[[float, float], str | None] = lambda a, b: None

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().split("\n")[0]


METHODS: Registry[MergeMethod] = Registry("merge method")


def method(name: str, *, aliases: tuple[str, ...] = (), **kw) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        METHODS.add(name, MergeMethod(name, fn, **kw), aliases)
        return fn

    return deco


def _need_c(c: Tensor | None) -> Tensor:
    # the engine passes C to every method registered with needs_c=True
    assert c is not None, "this merge method needs model C"
    return c


def _zero_alpha(a: float, b: float) -> str | None:
    return "A" if a == 0 else None


@method(
    "weight_sum",
    aliases=("Weight sum", "ws", "weighted_sum"),
    shortcut=lambda a, b: "A" if a == 0 else "B" if a == 1 else None,
)
def weight_sum(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """(1 - alpha) * A + alpha * B"""
    return torch.lerp(a, b, x.alpha)


@method("add_difference", aliases=("Add difference", "ad", "add_diff"), needs_c=True, shortcut=_zero_alpha)
def add_difference(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """A + alpha * (B - C)"""
    c = _need_c(c)
    return a + x.alpha * (b - c)


@method(
    "triple_sum",
    aliases=("Triple sum",),
    needs_c=True,
    uses_beta=True,
    shortcut=lambda a, b: "A" if a == 0 and b == 0 else None,
)
def triple_sum(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """(1 - alpha - beta) * A + alpha * B + beta * C"""
    c = _need_c(c)
    return (1 - x.alpha - x.beta) * a + x.alpha * b + x.beta * c


@method(
    "sum_twice",
    aliases=("sum Twice", "Sum twice"),
    needs_c=True,
    uses_beta=True,
    shortcut=lambda a, b: "A" if a == 0 and b == 0 else None,
)
def sum_twice(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """(1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C"""
    c = _need_c(c)
    return torch.lerp(torch.lerp(a, b, x.alpha), c, x.beta)


@method("train_difference", aliases=("trainDifference", "train_diff"), needs_c=True, shortcut=_zero_alpha)
def train_difference(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """A + 1.8 * alpha * (B - C) * |B - A| / (|B - C| + |B - A|), the delta 0 where the denominator is 0"""
    c = _need_c(c)
    d_bc = b - c
    d_ba = (b - a).abs()
    den = d_bc.abs() + d_ba
    scale = torch.where(den > 0, d_ba / den.masked_fill(den == 0, 1), torch.zeros_like(den))
    return a + 1.8 * x.alpha * d_bc * scale


def _cosine_lerp(a: Tensor, b: Tensor, alpha: float, sim: Tensor) -> Tensor:
    # k = 1 - clamp(similarity - alpha, 0, 1): the more alike A and B already are, the more of B is taken
    k = 1 - torch.clamp(sim - alpha, 0, 1)
    return torch.lerp(a, b, k)


@method("cosine_a", aliases=("cosineA",), elementwise=False)
def cosine_a(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """lerp(A, B, k), k = 1 - clamp(cos_dim0(A/|A|, B/|B|) - alpha, 0, 1) (similarity of unit vectors)"""
    if a.ndim == 0:
        return torch.lerp(a, b, x.alpha)
    an = torch.nn.functional.normalize(a, dim=0)
    bn = torch.nn.functional.normalize(b, dim=0)
    return _cosine_lerp(a, b, x.alpha, torch.nn.functional.cosine_similarity(an, bn, dim=0))


@method("cosine_b", aliases=("cosineB",), elementwise=False)
def cosine_b(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """lerp(A, B, k), k = 1 - clamp((cos_dim0(A, B) + A.B/(|A||B|)) / 2 - alpha, 0, 1)"""
    if a.ndim == 0:
        return torch.lerp(a, b, x.alpha)
    sim = torch.nn.functional.cosine_similarity(a, b, dim=0)
    whole = torch.sum(a * b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp_min(1e-12)
    return _cosine_lerp(a, b, x.alpha, (sim + whole) / 2)


def _top_k(delta: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries of largest |delta|, zero the rest (TIES step 1)."""
    n = delta.numel()
    k = int(round(n * density))
    if k >= n:
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.abs().flatten()
    threshold = torch.kthvalue(flat, n - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


@method(
    "ties",
    aliases=("TIES", "ties_add_difference"),
    accepts_c=True,
    uses_beta=True,
    elementwise=False,
    beta_default=0.2,
    shortcut=_zero_alpha,
)
def ties(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """A + alpha * TIES(B - A[, C - A]): trim each delta to its top-beta fraction by |value|, elect the
    sign of the summed deltas, average the deltas that agree with it (Yadav et al. 2023)"""
    deltas = [_top_k(b - a, x.beta)] + ([_top_k(c - a, x.beta)] if c is not None else [])
    stack = torch.stack(deltas)
    sign = torch.sign(stack.sum(dim=0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (stack * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp_min(1)
    return a + x.alpha * total / count


def _key_generator(seed: int, key: str) -> torch.Generator:
    # seed per key from a stable hash, so results do not depend on processing order
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


@method("dare", aliases=("DARE",), uses_beta=True, elementwise=False, beta_default=0.9, shortcut=_zero_alpha)
def dare(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """A + alpha * m * (B - A) / (1 - beta), m ~ Bernoulli(1 - beta) seeded per key (Yu et al. 2023)"""
    p = min(max(x.beta, 0.0), 1.0)
    if p >= 1:
        return a.clone()
    keep = torch.rand(a.shape, generator=_key_generator(x.seed, x.key)) >= p
    return a + x.alpha * (b - a) * keep / (1 - p)


@method(
    "smooth_add_difference",
    aliases=("smoothAdd", "smooth_add"),
    needs_c=True,
    elementwise=False,
    shortcut=_zero_alpha,
)
def smooth_add_difference(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """A + alpha * Gauss_sigma1(Median_3(B - C)) (scipy.ndimage filters over all dims, mode reflect)"""
    c = _need_c(c)
    from scipy.ndimage import gaussian_filter, median_filter

    d = (b - c).numpy()
    if d.ndim == 0:
        return a + x.alpha * (b - c)
    smooth = gaussian_filter(median_filter(d, size=3), sigma=1)
    return a + x.alpha * torch.from_numpy(smooth)
