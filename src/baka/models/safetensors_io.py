"""Zero-copy safetensors reading and streaming safetensors writing.

The safetensors library loads a tensor by copying it into process memory; for streaming merges we
want tensors that are views of the page cache (mmap) so that anonymous memory stays flat however
large the model. The format is: u64 little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the data.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import ModelFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsFile:
    """A safetensors file opened for zero-copy reads. Use as a context manager or call close()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise ModelFileError(path, f"cannot open ({e.strerror})") from None
        try:
            self.header, self.metadata, self._data_start = self._read_header()
            size = os.fstat(self._f.fileno()).st_size
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except BaseException:
            self._f.close()
            raise

    def _read_header(self) -> tuple[dict, dict[str, str], int]:
        size = os.fstat(self._f.fileno()).st_size
        raw = self._f.read(8)
        if len(raw) < 8:
            raise ModelFileError(self.path, "not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or n < 2:
            raise ModelFileError(self.path, "not a safetensors file (implausible header length)")
        if 8 + n > size:
            raise ModelFileError(self.path, "truncated safetensors file (header runs past end of file)")
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFileError(self.path, "not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise ModelFileError(self.path, "not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        data_len = size - 8 - n
        for name, info in header.items():
            try:
                b, e = info["data_offsets"]
                spec = TensorSpec(DTYPES[info["dtype"]], tuple(info["shape"]))
            except (KeyError, TypeError, ValueError):
                raise ModelFileError(self.path, f"corrupt safetensors header entry {name!r}") from None
            if e - b != spec.nbytes or b < 0:
                raise ModelFileError(self.path, f"corrupt safetensors header: size mismatch for {name!r}")
            if e > data_len:
                raise ModelFileError(
                    self.path, f"truncated safetensors file ({name!r} runs past end of file)"
                )
        return header, {str(k): str(v) for k, v in meta.items()}, 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def spec(self, key: str) -> TensorSpec:
        info = self.header[key]
        return TensorSpec(DTYPES[info["dtype"]], tuple(info["shape"]))

    def specs(self) -> dict[str, TensorSpec]:
        return {k: self.spec(k) for k in self.header}

    def get(self, key: str) -> torch.Tensor:
        """A view of the tensor in the page cache (copy-on-write: writing to it never touches the file)."""
        spec = self.spec(key)
        b, e = self.header[key]["data_offsets"]
        if e == b:
            return torch.empty(spec.shape, dtype=spec.dtype)
        assert self._mm is not None  # a non-empty tensor means a non-empty file, which is mapped
        buf = memoryview(self._mm)[self._data_start + b : self._data_start + e]
        t = torch.frombuffer(buf, dtype=spec.dtype)
        return t.reshape(spec.shape)

    def payload_offset(self) -> int:
        return self._data_start

    def close(self) -> None:
        # Views handed out keep the mapping alive; closing the file object is enough.
        self._f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)


def build_header(specs: dict[str, TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """Deterministic header: keys in the given order, metadata sorted, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    off = 0
    for k, s in specs.items():
        header[k] = {
            "dtype": DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [off, off + s.nbytes],
        }
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@contextmanager
def atomic_output(path: str | Path, *, protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Refuses to write onto any file in ``protect`` (the inputs), so an input is never overwritten.
    """
    path = Path(path)
    for p in protect:
        if Path(p).exists() and path.exists() and os.path.samefile(p, path):
            raise ModelFileError(path, "refusing to overwrite an input file; choose another output name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get ordinary permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` as safetensors stores them (any dtype, bf16 included)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data


def _write_tensor(f, t: torch.Tensor, spec: TensorSpec, key: str) -> None:
    if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
        raise ValueError(f"{key}: produced {t.dtype}{tuple(t.shape)}, header says {spec.dtype}{spec.shape}")
    if t.numel():
        f.write(tensor_bytes(t))


def write_stream(
    path: str | Path,
    specs: dict[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    *,
    protect: Iterable[str | Path] = (),
    progress: bool = False,
) -> Path:
    """Write tensors one at a time as they are produced, in the order of ``specs``.

    The header is computed from ``specs`` up front, so no tensor needs to be held after it is
    written. The file appears at ``path`` only when complete (temp file + rename).
    """
    with atomic_output(path, protect=protect) as tmp:
        with open(tmp, "wb") as f:
            from tqdm import tqdm

            f.write(build_header(specs, metadata))
            order = iter(specs)
            total = sum(s.nbytes for s in specs.values())
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=Path(path).name,
                disable=not progress,
                leave=False,
            )
            for key, t in tensors:
                want = next(order, None)
                if key != want:
                    raise ValueError(f"tensor {key!r} produced out of order (expected {want!r})")
                _write_tensor(f, t, specs[key], key)
                bar.update(specs[key].nbytes)
            bar.close()
            missing = next(order, None)
            if missing is not None:
                raise ValueError(f"tensor {missing!r} was never produced")
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def save_file(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    *,
    protect: Iterable[str | Path] = (),
    progress: bool = False,
) -> Path:
    """Atomic, deterministic save of an in-memory state dict (keys sorted)."""
    keys = sorted(tensors)
    specs = {k: TensorSpec(tensors[k].dtype, tuple(tensors[k].shape)) for k in keys}
    return write_stream(
        path, specs, ((k, tensors[k]) for k in keys), metadata, protect=protect, progress=progress
    )


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the data section :func:`save_file` writes for ``tensors`` (the addnet/sshs hash),
    computed before writing so it can go into the file's own metadata."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        if tensors[k].numel():
            h.update(tensor_bytes(tensors[k]))
    return h.hexdigest()
