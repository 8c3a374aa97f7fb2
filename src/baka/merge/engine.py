"""The streaming merge: tensor by tensor from memory-mapped inputs to a file written as it goes.

Peak memory is a few copies of the largest tensor (row-chunked for elementwise methods), not the
model: inputs are page-cache views, each result is written and dropped before the next key.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from baka.errors import BakaError, ModelFileError
from baka.merge.adjust import Adjust
from baka.merge.elemental import Rule, override, parse_rules
from baka.merge.methods import METHODS, Ctx, MergeMethod
from baka.merge.recipe import Recipe, metadata_for
from baka.models import detect
from baka.models.blocks import BLOCK_INDEX, block_of
from baka.models.hashes import sha256_file
from baka.models.io import DTYPE_BY_NAME
from baka.models.safetensors_io import TensorSpec, atomic_output, build_header, tensor_bytes
from baka.models.sources import open_source, shapes_of_source

CHUNK_ELEMENTS = 1 << 22  # rows are merged in ~4M-element slices (16 MB of fp32 per operand)
_HEADER_SLACK = 16384  # room reserved for the header's model hashes, computed while merging


@dataclass
class MergeResult:
    path: Path
    recipe: Recipe
    keys: int
    copied_from_a: int = 0  # keys missing from B/C, or whose weights make the result exactly A
    dropped: list[str] = field(default_factory=list)  # keys outside the model (EMA, buffers)
    # model keys A lacks (a partial A, e.g. UNet only): taken from B, as A1111 and supermerger do
    filled_from_b: list[str] = field(default_factory=list)


def _key_weights(recipe: Recipe, rules: list[Rule], key: str, index: int) -> tuple[float, float]:
    block = block_of(key)
    i = BLOCK_INDEX[block] if block else 0
    alpha = override(rules, block, key, recipe.alpha[i], index, recipe.seed)
    return alpha, recipe.beta[i]


def merge_models(
    recipe: Recipe, output: str | Path, *, progress: bool = True, hash_inputs: bool = True
) -> MergeResult:
    """Merge ``recipe.models`` into ``output`` (.safetensors) by ``recipe.method`` and block weights.

    Inputs are opened lazily (safetensors are memory-mapped); floating tensors are merged in fp32 and
    cast to the output dtype (``recipe.dtype`` or A's). Keys outside the model (EMA copies, schedule
    buffers) are dropped; keys missing from B or C are copied from A. The output is written to a
    temp file and renamed into place; it may not be one of the inputs.
    """
    method = METHODS.get(recipe.method)
    recipe.method = method.name
    n_models = 3 if method.needs_c else 2
    if len(recipe.models) < n_models:
        raise BakaError(
            f"method {method.name} needs {n_models} models (A, B{', C' if n_models == 3 else ''})"
        )
    if len(recipe.models) > n_models and not (method.accepts_c and len(recipe.models) == 3):
        raise BakaError(f"method {method.name} takes {n_models} models, got {len(recipe.models)}")
    out_path = Path(output)
    if out_path.suffix.lower() != ".safetensors":
        raise BakaError(f"{out_path}: merge output must be a .safetensors file")
    rules = parse_rules(recipe.elemental)
    adjust = Adjust.parse(recipe.adjust)
    out_dtype = DTYPE_BY_NAME[recipe.dtype] if recipe.dtype else None

    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_source(p)) for p in recipe.models]
        all_specs = [s.specs() for s in sources]
        kinds = [detect.classify(shapes_of_source(src)) for src in sources]
        for path, kind in zip(recipe.models, kinds, strict=True):
            detect.require_sd1(path, kind, inpaint=True)
        inpainting = kinds[0].name == "sd1-inpaint"
        spec_a = all_specs[0]
        keys = [k for k in spec_a if block_of(k) is not None]
        dropped = [k for k in spec_a if block_of(k) is None]
        # an inpainting (9-channel) or instruct-pix2pix (8) A with plain models: A1111 merges the first
        # 4 input channels of the first conv and keeps A's extra ones
        wide: set[str] = set()
        for path, specs in zip(recipe.models[1:], all_specs[1:], strict=True):
            for k in keys:
                if k in specs and specs[k].shape != spec_a[k].shape:
                    if _extra_channels(spec_a[k].shape, specs[k].shape):
                        wide.add(k)
                        continue
                    if _extra_channels(specs[k].shape, spec_a[k].shape):
                        raise ModelFileError(
                            path, f"{k} has {specs[k].shape[1]} input channels: an inpainting model must be"
                            " model A when merged with plain ones (as A1111); put it first",
                        )  # fmt: skip
                    raise ModelFileError(
                        path, f"shape of {k} is {specs[k].shape}, model A has {spec_a[k].shape}"
                    )
        # a partial A (no VAE, no text encoder...) must not give a model diffusers cannot load
        spec_b = all_specs[1]
        filled = sorted(k for k in spec_b if k not in spec_a and block_of(k) is not None)
        src_spec = {**{k: spec_b[k] for k in filled}, **spec_a}
        out_specs = {
            k: TensorSpec(
                out_dtype if out_dtype and src_spec[k].dtype.is_floating_point else src_spec[k].dtype,
                src_spec[k].shape,
            )
            for k in sorted([*keys, *filled])
        }

        hasher = cf.ThreadPoolExecutor(max_workers=1)
        stack.callback(hasher.shutdown)
        # hashing runs beside the merge (hashlib releases the GIL); the header is written last
        # one entry per model, aligned with recipe.models ("" for folders or when hashing is off)
        futures = [
            hasher.submit(sha256_file, p) if hash_inputs and Path(p).is_file() else None
            for p in recipe.models
        ]
        copied = 0
        adjust_keys = adjust.keys() if adjust is not None else set()
        position = {k: i for i, k in enumerate(spec_a)}  # a key's index in A (random elemental ratios)
        state = method.state_of(sources[0], sources[1])  # a whole-model pass first (cosine's range)

        def produce() -> Iterator[tuple[str, object]]:
            nonlocal copied
            for k in out_specs:
                if k not in spec_a:
                    yield k, sources[1].get(k).to(out_specs[k].dtype)
                    continue
                alpha, beta = _key_weights(recipe, rules, k, position[k])
                a = sources[0].get(k)
                others = [
                    s.get(k) if k in sp else None for s, sp in zip(sources[1:], all_specs[1:], strict=True)
                ]
                want = out_specs[k].dtype
                # keys a given model lacks, integer keys and keys the method leaves alone stay A's
                if (
                    not a.dtype.is_floating_point
                    or any(o is None for o in others)
                    or method.keeps(k, tuple(a.shape), alpha)
                ):
                    copied += 1
                    yield k, a.to(want)
                    continue
                # Adjust's six keys are merged in fp32, adjusted, then cast (every other key streams)
                adjusting = adjust is not None and k in adjust_keys
                pick = method.shortcut(alpha, beta)
                if pick is not None and k not in wide and not adjusting:
                    copied += pick == "A"
                    b = others[0]
                    assert b is not None  # checked above: every model given has the key
                    yield k, (a if pick == "A" else b).to(want)
                    continue
                ctx = Ctx(k, alpha, beta, recipe.seed, state, recipe.gamma)
                dtype = torch.float32 if adjusting else want
                if k in wide:  # A's first 4 input channels merged, its extra ones kept
                    head = _whole(_compute(method, a[:, :4], others, ctx, torch.float32))
                    out = torch.cat([head, a[:, 4:].float()], dim=1).to(dtype)
                else:
                    out = _compute(method, a, others, ctx, dtype)
                if adjusting:
                    assert adjust is not None
                    out = adjust.apply(k, _whole(out)).to(want)
                yield k, out

        with atomic_output(out_path, protect=recipe.models) as tmp:
            head_guess = len(
                build_header(out_specs, _metadata(recipe, sources, ["0" * 64] * len(futures), inpainting))
            )
            reserve = head_guess + _HEADER_SLACK
            total = sum(s.nbytes for s in out_specs.values())
            with open(tmp, "wb") as f:
                f.seek(reserve)
                bar = tqdm(
                    total=total, unit="B", unit_scale=True, desc="merge", disable=not progress, leave=False
                )
                for k, t in produce():
                    n = _write(f, t, out_specs[k], k)
                    bar.update(n)
                bar.close()
                recipe.model_sha256 = [fu.result() if fu else "" for fu in futures]
                header = build_header(out_specs, _metadata(recipe, sources, recipe.model_sha256, inpainting))
                header = _pad_header(header, reserve)
                f.seek(0)
                f.write(header)
                f.flush()
                os.fsync(f.fileno())
    return MergeResult(out_path, recipe, len(out_specs), copied, dropped, filled)


def _metadata(recipe: Recipe, sources, shas: list[str], inpainting: bool) -> dict[str, str]:
    r = Recipe(**{**recipe.__dict__, "model_sha256": list(shas)})
    metas = [dict(getattr(s, "metadata", {}) or {}) for s in sources]
    return metadata_for(r, metas, Path(recipe.models[0]).stem + "-merge", inpainting=inpainting)


def _pad_header(header: bytes, reserve: int) -> bytes:
    """Pad the JSON header with spaces (valid trailing whitespace) so data starts at ``reserve``."""
    n = len(header) - 8
    want = reserve - 8
    if n > want:
        raise RuntimeError("merge header outgrew its reserved space")
    return struct.pack("<Q", want) + header[8:] + b" " * (want - n)


def _compute(method: MergeMethod, a: torch.Tensor, others: list, ctx: Ctx, want: torch.dtype):
    b = others[0]
    c = others[1] if len(others) > 1 else None
    if not method.elementwise or a.numel() <= CHUNK_ELEMENTS or a.ndim == 0:
        out = method.fn(a.float(), b.float(), None if c is None else c.float(), ctx)
        return out.to(want)
    rows = max(1, CHUNK_ELEMENTS // max(1, a[0].numel()))
    return (
        method.fn(
            a[i : i + rows].float(),
            b[i : i + rows].float(),
            None if c is None else c[i : i + rows].float(),
            ctx,
        ).to(want)
        for i in range(0, a.shape[0], rows)
    )


def _extra_channels(wide: tuple[int, ...], plain: tuple[int, ...]) -> bool:
    """``wide`` is an inpainting (9) or instruct-pix2pix (8) input conv where ``plain`` has 4 channels."""
    return (
        len(wide) == 4 and len(plain) == 4 and wide[1] in (8, 9) and plain[1] == 4
        and wide[:1] + wide[2:] == plain[:1] + plain[2:]
    )  # fmt: skip


def _whole(t) -> torch.Tensor:
    """A computed result as one tensor (elementwise methods yield large tensors in row chunks)."""
    return t if isinstance(t, torch.Tensor) else torch.cat(list(t))


def _write(f, t, spec: TensorSpec, key: str) -> int:
    pieces = [t] if isinstance(t, torch.Tensor) else t
    n = 0
    for p in pieces:
        if p.numel():
            f.write(tensor_bytes(p))
        n += p.numel() * p.element_size()
    if n != spec.nbytes:
        raise RuntimeError(f"{key}: wrote {n} bytes, expected {spec.nbytes}")
    return n
