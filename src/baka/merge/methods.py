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
    state: object = None  # what the method's ``prepare`` computed over the whole model
    gamma: float = 0.3  # supermerger's "option(gamma)" (extract)


def _never(key: str, shape: tuple[int, ...], alpha: float) -> bool:
    return False


# prepare(get, keys): ``get(key)`` -> (A's, B's tensor); keys: every key of A that B also has
Prepare = Callable[[Callable[[str], tuple[Tensor, Tensor]], list[str]], object]


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
    # keys the method leaves as A untouched (supermerger's ``continue``: no Adjust either)
    keeps: Callable[[str, tuple[int, ...], float], bool] = _never
    prepare: Prepare | None = None  # a whole-model pass before the merge (its result in Ctx.state)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().split("\n")[0]

    def state_of(self, a, b) -> object:
        """The method's whole-model pass over two open models (``TensorSource``s: every key of A that
        B also has, as the file merge runs it); None when the method has none."""
        if self.prepare is None:
            return None
        spec_b = b.specs()
        common = [k for k in a.specs() if k in spec_b]
        return self.prepare(lambda k: (a.get(k), b.get(k)), common)


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


@method("cosine_a_columns", elementwise=False)
def cosine_a_columns(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """lerp(A, B, k), k = 1 - clamp(cos_dim0(A/|A|, B/|B|) - alpha, 0, 1) (per key, no model-wide
    rescaling; baka's own column form, not supermerger's cosineA)"""
    if a.ndim == 0:
        return torch.lerp(a, b, x.alpha)
    an = torch.nn.functional.normalize(a, dim=0)
    bn = torch.nn.functional.normalize(b, dim=0)
    return _cosine_lerp(a, b, x.alpha, torch.nn.functional.cosine_similarity(an, bn, dim=0))


@method("cosine_b_columns", elementwise=False)
def cosine_b_columns(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """lerp(A, B, k), k = 1 - clamp((cos_dim0(A, B) + A.B/(|A||B|)) / 2 - alpha, 0, 1) (per key; not
    supermerger's cosineB)"""
    if a.ndim == 0:
        return torch.lerp(a, b, x.alpha)
    sim = torch.nn.functional.cosine_similarity(a, b, dim=0)
    whole = torch.sum(a * b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp_min(1e-12)
    return _cosine_lerp(a, b, x.alpha, (sim + whole) / 2)


# supermerger's cosineA / cosineB (facts: tests/data/supermerger_calcmodes.json): a model-wide range of
# similarities first, then per key k = clip((sim - min) / (max - min) - alpha, 0, 1) and
# out = B + k (A - B): k is A's weight, columns more alike than the model's least alike keep more of A.
def _colcos(x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(x, y, dim=0)


def _glob(x: Tensor, y: Tensor) -> Tensor:
    return torch.sum(x * y) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))  # NaN for zeros


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, p=2, dim=0)


def _is_vae(key: str, shape: tuple[int, ...], alpha: float) -> bool:
    return key.startswith("first_stage_model.")


def _cosine_range(sim: Callable[[Tensor, Tensor], Tensor]) -> Prepare:
    """supermerger's pass over every key of A (containing "model", in B, VAE excluded; no weight /
    bias filter): every element of each key's similarity, trimmed below the 1st percentile and then
    above the 99th (midpoint percentiles), -> (min, max) of what is left."""

    def prepare(get: Callable[[str], tuple[Tensor, Tensor]], keys: list[str]) -> tuple[float, float]:
        import numpy as np

        parts = []
        for k in keys:
            if "model" not in k or "first_stage_model" in k:
                continue
            a, b = (t.float() for t in get(k))
            if a.shape != b.shape:
                continue
            parts.append(np.ones(1) if a.ndim == 0 else sim(a, b).double().flatten().numpy())
        s = np.concatenate(parts) if parts else np.zeros(1)
        s = s[~np.isnan(s)]
        s = s[s >= np.percentile(s, 1, method="midpoint")]
        s = s[s <= np.percentile(s, 99, method="midpoint")]
        return float(s.min()), float(s.max())

    return prepare


def _cosine_merge(a: Tensor, b: Tensor, c: Tensor, alpha: float, state: object) -> Tensor:
    assert isinstance(state, tuple), "cosine needs its model-wide pass (MergeMethod.prepare)"
    lo, hi = float(state[0]), float(state[1])
    k = torch.clamp((c - lo) / (hi - lo) - alpha, 0, 1)
    return b + k * (a - b)


@method(
    "cosine_a",
    aliases=("cosineA",),
    elementwise=False,
    keeps=_is_vae,
    prepare=_cosine_range(lambda a, b: _colcos(_unit(a), _unit(b))),
)
def cosine_a(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """supermerger cosineA: B + k * (A - B), k = clip((s - min) / (max - min) - |alpha|, 0, 1), s = mean of
    the column and whole-tensor cosines of the unit-normalised tensors; VAE kept from A"""
    if a.ndim == 0:
        return torch.lerp(a, b, x.alpha)
    an, bn = _unit(a), _unit(b)
    return _cosine_merge(a, b, (_colcos(an, bn) + _glob(an, bn)) / 2, abs(x.alpha), x.state)


@method(
    "cosine_b",
    aliases=("cosineB",),
    elementwise=False,
    keeps=_is_vae,
    prepare=_cosine_range(lambda a, b: (_colcos(a, b) + _glob(a, b)) / 2),
)
def cosine_b(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """supermerger cosineB: B + k * (A - B), k = clip((s - min) / (max - min) - alpha, 0, 1), s = mean of
    the column and whole-tensor cosines; VAE kept from A"""
    if a.ndim == 0:
        return torch.lerp(a, b, x.alpha)
    return _cosine_merge(a, b, (_colcos(a, b) + _glob(a, b)) / 2, x.alpha, x.state)


def _slice(a: Tensor, b: Tensor, alpha: float, beta: float, axis: int, n: int) -> Tensor:
    """supermerger's tensor rule: the fraction alpha of the axis starting at beta comes from B (wrapping
    past the end), bounds truncated as int(n * x) with Python slice semantics."""
    idx = [slice(None)] * a.ndim
    if alpha + beta <= 1:
        out, src = a.clone(), b
        idx[axis] = slice(int(n * beta), int(n * (alpha + beta)))
    else:
        out, src = b.clone(), a
        idx[axis] = slice(int(n * (alpha + beta - 1)), int(n * beta))
    out[tuple(idx)] = src[tuple(idx)]
    return out


def _zero_dim(key: str, shape: tuple[int, ...], alpha: float) -> bool:
    return len(shape) == 0


@method("tensor", uses_beta=True, elementwise=False, keeps=_zero_dim)
def tensor_merge(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """supermerger tensor: A with rows [int(n * beta), int(n * (alpha + beta))) of axis 0 taken from B"""
    if a.ndim > 4:
        return a
    return _slice(a, b, x.alpha, x.beta, 0, a.shape[0])


@method("tensor2", uses_beta=True, elementwise=False, keeps=_zero_dim)
def tensor2_merge(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """supermerger tensor2: A with [int(n * beta), int(n * (alpha + beta))) of axis 1 from B (n: axis 1's
    length when over 100, else axis 0's, as supermerger)"""
    if a.ndim > 4:
        return a
    if a.ndim == 1:
        return _slice(a, b, x.alpha, x.beta, 0, a.shape[0])
    n = a.shape[1] if a.shape[1] > 100 else a.shape[0]
    return _slice(a, b, x.alpha, x.beta, 1, n)


def _self_keeps(key: str, shape: tuple[int, ...], alpha: float) -> bool:
    return alpha == 0 or any(s in key for s in ("to_out", "proj_out", "norm"))


@method("self", aliases=("self_scale",), keeps=_self_keeps)
def self_scale(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """supermerger self: A * alpha (B unused; to_out / proj_out / norm keys and alpha 0 keep A)"""
    return a * x.alpha


@method("extract", uses_beta=True, accepts_c=True, elementwise=False)
def extract_merge(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """supermerger extract: A + lerp(B-A, C-A, alpha) * lerp(d, 1-d, beta), d = ((cos_last(B-A, C-A)
    + 1) / 2)^gamma (C defaults to A)"""
    db = b - a
    dc = torch.zeros_like(a) if c is None else c - a
    cos = torch.nn.functional.cosine_similarity(db, dc, dim=-1).clamp(-1, 1).unsqueeze(-1)
    d = ((cos + 1) / 2) ** x.gamma
    return a + torch.lerp(db, dc, x.alpha) * torch.lerp(d, 1 - d, x.beta)


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


def _trimmed_deltas(
    a: Tensor, b: Tensor, c: Tensor | None, trim: Callable[[Tensor, float], Tensor], density: float
) -> Tensor:
    """TIES step 1 for both variants: B - A (and C - A) each trimmed, stacked."""
    return torch.stack([trim(m - a, density) for m in (b, c) if m is not None])


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
    """A + alpha * TIES(B - A[, C - A]): trim each delta to its top-beta fraction by |value| (round(n *
    beta) kept), elect the sign of the summed deltas (by mass, as the paper), average the nonzero deltas
    that agree with it (Yadav et al. 2023; ties_mecha: sd-mecha's count vote and trim)"""
    stack = _trimmed_deltas(a, b, c, _top_k, x.beta)
    sign = torch.sign(stack.sum(dim=0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (stack * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp_min(1)
    return a + x.alpha * total / count


def _top_k_mecha(delta: Tensor, density: float) -> Tensor:
    """sd-mecha's trim: keep |delta| >= its max(int((1 - density) n), 1)-th smallest value (so one more
    than n - int((1 - density) n), and every tie)."""
    kth = max(int((1 - density) * delta.numel()), 1)
    threshold = delta.flatten().abs().kthvalue(kth).values
    return delta * (delta.abs() >= threshold)


@method(
    "ties_mecha",
    aliases=("ties_count",),
    accepts_c=True,
    uses_beta=True,
    elementwise=False,
    beta_default=0.2,
    shortcut=_zero_alpha,
)
def ties_mecha(a: Tensor, b: Tensor, c: Tensor | None, x: Ctx) -> Tensor:
    """A + alpha * TIES as sd-mecha's ties_sum: the trim above, the sign elected by count (sum of
    signs), the mean over entries whose sign equals it (zeros too where the vote is 0)"""
    stack = _trimmed_deltas(a, b, c, _top_k_mecha, x.beta)
    signs = torch.sign(stack)
    agree = (signs == torch.sign(signs.sum(dim=0))).float()
    merged = torch.nan_to_num((stack * agree).sum(dim=0) / agree.sum(dim=0), nan=0.0, posinf=0.0, neginf=0.0)
    return a + x.alpha * merged


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
