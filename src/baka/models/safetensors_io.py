"""Zero-copy safetensors reading and streaming safetensors writing.

The safetensors library loads a tensor by copying it into process memory; for streaming merges we
want tensors that are views of the page cache (mmap) so that anonymous memory stays flat however
large the model. The format is: u64 little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the data.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import ModelFileError, OutputError

log = logging.getLogger("baka.models")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F4": torch.float4_e2m1fn_x2,  # two 4-bit values per byte: torch's last dimension is halved
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_BITS = {name: torch.empty((), dtype=dt).element_size() * 8 for name, dt in DTYPES.items()}
_BITS["F4"] = 4
# dtypes the format defines but torch cannot hold (the safetensors library refuses them too)
_NO_TORCH = {"F6_E2M3", "F6_E3M2"}
_MAX_HEADER = 100_000_000  # the safetensors library's limit
_MAX_DEPTH = 127  # JSON nesting the library's parser accepts (serde_json's recursion limit)
_USIZE_MAX = 2**64 - 1
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


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


class _Header(Exception):
    """A header problem (becomes a :class:`ModelFileError` naming the file)."""


class _Obj(dict):
    """A JSON object that remembers which of its keys were repeated."""

    dups: frozenset[str] = frozenset()


def _pairs(pairs: list[tuple[str, object]]) -> _Obj:
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        counts = Counter(k for k, _ in pairs)
        obj.dups = frozenset(k for k, n in counts.items() if n > 1)
    return obj


def _dups(obj: dict) -> frozenset[str]:
    return getattr(obj, "dups", frozenset())  # an empty object may come back as a plain dict


def _parse_int(s: str) -> int | float:
    # JSON numbers as the library's parser sees them: a minus sign or more digits than a u64 holds
    # makes a float (never a valid size); one too large even for a double is an error
    if s.startswith("-") or len(s) > 20:
        return _parse_float(s)
    return int(s)


def _parse_float(s: str) -> float:
    v = float(s)
    if v in (float("inf"), float("-inf")):
        raise _Header(f"number out of range ({s[:20]})")
    return v


def _no_constant(s: str) -> None:
    raise _Header(f"{s} is not valid JSON")


def _check_tree(obj: object) -> None:
    """Nesting depth within the library's limit, and no lone surrogate (invalid UTF-8) in any string."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, str):
            items: Iterable = ()
            strings: Iterable[str] = (o,)
        elif isinstance(o, dict):
            if depth > _MAX_DEPTH:
                raise _Header(f"JSON nested deeper than {_MAX_DEPTH} levels")
            items, strings = o.values(), o.keys()
        elif isinstance(o, list):
            if depth > _MAX_DEPTH:
                raise _Header(f"JSON nested deeper than {_MAX_DEPTH} levels")
            items, strings = o, ()
        else:
            continue
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise _Header("a string holds a lone UTF-16 surrogate") from None
        stack.extend((v, depth + 1) for v in items if isinstance(v, str | dict | list))


def _usize(v: object, what: str) -> int:
    if type(v) is not int or not 0 <= v <= _USIZE_MAX:
        raise _Header(f"{what} is {json.dumps(v)[:40]}, not a non-negative integer")
    return v


def _q(name: str) -> str:
    """A name quoted for a one-line message (long names shortened)."""
    return repr(name) if len(name) <= 80 else repr(name[:77]) + "..."


def parse_header(raw: bytes, data_len: int) -> tuple[dict[str, tuple[TensorSpec, int, int]], dict[str, str]]:
    """Validate a safetensors JSON header exactly as strictly as the safetensors library.

    Returns ``{name: (spec, begin, end)}`` (offsets into the data section) and the metadata. Raises
    :class:`_Header` for anything the library refuses; also for repeated names (the library keeps
    the last silently, which makes the file ambiguous).
    """
    try:
        text = raw.decode("utf-8")  # strict: invalid UTF-8 and a byte-order mark are both refused
    except UnicodeDecodeError:
        raise _Header("header is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        raise _Header("header starts with a byte-order mark")
    try:
        header = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise _Header(f"JSON nested deeper than {_MAX_DEPTH} levels") from None
    except _Header:
        raise
    except ValueError as e:  # json.JSONDecodeError, int() digit limits
        raise _Header(f"header is not JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(header, dict):
        raise _Header("header is not a JSON object")
    _check_tree(header)
    if "__metadata__" in _dups(header):
        raise _Header("__metadata__ appears twice")
    if _dups(header):
        raise _Header(f"tensor {_q(sorted(_dups(header))[0])} appears twice")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _Header("__metadata__ is not a JSON object")
    if _dups(meta):
        raise _Header(f"metadata key {_q(sorted(_dups(meta))[0])} appears twice")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise _Header(f"metadata value of {_q(k)} is not a string")
    entries: dict[str, tuple[TensorSpec, int, int]] = {}
    for name, info in header.items():
        entries[name] = _entry(name, info)
    # the data section must be exactly covered: sorted by offsets, each tensor starts where the last ended
    pos = 0
    for name, (_, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][1], kv[1][2])):
        if begin != pos or end < begin:
            raise _Header(
                f"tensor {_q(name)} has invalid data offsets [{begin}, {end}] (expected start {pos})"
            )
        pos = end
    if pos != data_len:
        what = "runs past the end of the file" if pos > data_len else f"has {data_len - pos} trailing bytes"
        raise _Header(f"data section {what} (tensors cover {pos} of {data_len} bytes)")
    return entries, dict(meta)


def _entry(name: str, info: object) -> tuple[TensorSpec, int, int]:
    if isinstance(info, list):  # a struct may be written as a 3-element array; the library accepts it
        if len(info) != 3:
            raise _Header(f"tensor {_q(name)}: header entry is not an object")
        info = _Obj(zip(_TENSOR_FIELDS, info, strict=True))
    if not isinstance(info, dict):
        raise _Header(f"tensor {_q(name)}: header entry is not an object")
    for f in _TENSOR_FIELDS:
        if f in _dups(info):
            raise _Header(f"tensor {_q(name)}: field {f!r} appears twice")
        if f not in info:
            raise _Header(f"tensor {_q(name)}: no {f!r}")
    dtype, shape, offsets = (info[f] for f in _TENSOR_FIELDS)
    if not isinstance(dtype, str) or (dtype not in DTYPES and dtype not in _NO_TORCH):
        raise _Header(f"tensor {_q(name)}: unknown dtype {json.dumps(dtype)[:40]}")
    if dtype in _NO_TORCH:
        raise _Header(f"tensor {_q(name)}: dtype {dtype} has no torch equivalent")
    if not isinstance(shape, list):
        raise _Header(f"tensor {_q(name)}: shape is not a list")
    shape = [_usize(s, f"tensor {_q(name)}: a shape entry") for s in shape]
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise _Header(f"tensor {_q(name)}: data_offsets is not [begin, end]")
    b, e = (_usize(o, f"tensor {_q(name)}: a data offset") for o in offsets)
    numel = 1
    for s in shape:
        numel *= s
        if numel > _USIZE_MAX:
            raise _Header(f"tensor {_q(name)}: shape {shape} overflows")
    bits = numel * _BITS[dtype]
    if bits > _USIZE_MAX:
        raise _Header(f"tensor {_q(name)}: shape {shape} overflows")
    if bits % 8:
        raise _Header(f"tensor {_q(name)}: {dtype} data of shape {shape} does not fill whole bytes")
    if e >= b and e - b != bits // 8:
        raise _Header(f"tensor {_q(name)}: {e - b} data bytes do not match {dtype}{shape} ({bits // 8})")
    if dtype == "F4":  # torch packs pairs: the last dimension must be even and is halved
        if not shape or shape[-1] % 2:
            raise _Header(f"tensor {_q(name)}: F4 needs an even last dimension, got {shape}")
        shape = shape[:-1] + [shape[-1] // 2]
    return TensorSpec(DTYPES[dtype], tuple(shape)), b, e


class SafetensorsFile:
    """A safetensors file opened for zero-copy reads. Use as a context manager or call close().

    The header is validated as strictly as the safetensors library does (a file it refuses is
    refused here with one :class:`ModelFileError` line naming the file).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise ModelFileError(path, f"cannot open ({e.strerror})") from None
        try:
            self._entries, self.metadata, self._data_start = self._read_header()
            size = os.fstat(self._f.fileno()).st_size
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except OSError as e:
            self._f.close()
            raise ModelFileError(self.path, f"cannot read ({e.strerror or e})") from None
        except BaseException:
            self._f.close()
            raise

    def _read_header(self) -> tuple[dict[str, tuple[TensorSpec, int, int]], dict[str, str], int]:
        if self.path.is_dir():
            raise ModelFileError(self.path, "is a folder, not a safetensors file")
        size = os.fstat(self._f.fileno()).st_size
        raw = self._f.read(8)
        if len(raw) < 8:
            what = "empty file" if not raw else "shorter than 8 bytes"
            raise ModelFileError(self.path, f"not a safetensors file ({what})")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ModelFileError(self.path, f"not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise ModelFileError(self.path, "truncated safetensors file (header runs past end of file)")
        try:
            entries, meta = parse_header(self._f.read(n), size - 8 - n)
        except _Header as e:
            raise ModelFileError(self.path, f"invalid safetensors file: {e}") from None
        return entries, meta, 8 + n

    @property
    def header(self) -> dict[str, dict]:
        """The tensor entries as the JSON header states them (normalized)."""
        return {
            k: {"dtype": DTYPE_NAMES[s.dtype], "shape": list(_file_shape(s)), "data_offsets": [b, e]}
            for k, (s, b, e) in self._entries.items()
        }

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, key: str) -> TensorSpec:
        return self._entries[key][0]

    def specs(self) -> dict[str, TensorSpec]:
        return {k: v[0] for k, v in self._entries.items()}

    def get(self, key: str) -> torch.Tensor:
        """A view of the tensor in the page cache (copy-on-write: writing to it never touches the file)."""
        spec, b, e = self._entries[key]
        if e == b:
            return torch.empty(spec.shape, dtype=spec.dtype)
        assert self._mm is not None  # a non-empty tensor means a non-empty file, which is mapped
        buf = memoryview(self._mm)[self._data_start + b : self._data_start + e]
        t = torch.frombuffer(buf, dtype=spec.dtype)
        return t.reshape(spec.shape)

    def close(self) -> None:
        # Views handed out keep the mapping alive; closing the file object is enough.
        self._f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def _file_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The shape as the file states it (F4 packs two values per torch element)."""
    if spec.dtype == torch.float4_e2m1fn_x2 and spec.shape:
        return spec.shape[:-1] + (spec.shape[-1] * 2,)
    return spec.shape


def build_header(specs: dict[str, TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """Deterministic header: keys in the given order, metadata sorted, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    off = 0
    for k, s in specs.items():
        header[k] = {
            "dtype": DTYPE_NAMES[s.dtype],
            "shape": list(_file_shape(s)),
            "data_offsets": [off, off + s.nbytes],
        }
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# temp files of atomic_output: ".NAME.PID.RANDOM.part" beside the output (the PID tells whether the
# writer may still be running)
_PART_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.part$")
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), or None if there is no such process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except (PermissionError, OverflowError, OSError):
        pass  # exists (owned by someone else) or cannot tell: fall through to /proc
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks since boot
        btime = next(
            int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, StopIteration):
        return float("-inf")  # alive but unknown start: assume it may own the file


def leftover_parts(folder: str | Path, name: str | None = None) -> list[tuple[Path, bool]]:
    """Temp files of interrupted writes in ``folder`` (those of output ``name`` only, if given), each
    with whether it is stale: its writer is gone (or started after the file was last written)."""
    out = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    for p in entries:
        m = _PART_RE.match(p.name)
        if not m or (name is not None and m["name"] != name) or not p.is_file():
            continue
        started = _process_start(int(m["pid"]))
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        out.append((p, started is None or started > mtime + 1))
    return out


def clean_stale_parts(folder: str | Path) -> list[Path]:
    """Remove the stale temp files in ``folder`` (one warning each); returns those removed."""
    removed = []
    for p, stale in leftover_parts(folder):
        if stale:
            try:
                p.unlink()
            except OSError:
                continue
            log.warning("baka: warning: removed %s, left by an interrupted write", p)
            removed.append(p)
    return removed


def report_leftovers(path: str | Path) -> list[str]:
    """Temp files left by interrupted writes of ``path`` (a file: its own; a folder: any inside it and
    its component folders, and an unfinished diffusers save of it), one warning each."""
    path = Path(path)
    if path.is_dir():
        folders = (path, *sorted(q for q in path.iterdir() if q.is_dir()))
        found = [p for d in folders for p in leftover_parts(d)]
        unfinished = path.with_name(f".{path.name}.part")
        if unfinished.is_dir():
            found.append((unfinished, True))
    else:
        found = leftover_parts(path.parent, path.name)
    out = []
    for p, stale in found:
        state = "stale: the next write there removes it" if stale else "a write may still be running"
        log.warning("baka: warning: %s is left by an interrupted write (%s)", p, state)
        out.append(str(p))
    return out


def output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(path, f"{e.strerror or e}")


@contextmanager
def atomic_output(
    path: str | Path, *, protect: Iterable[str | Path] = (), clean: bool = True
) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Refuses to write onto any file in ``protect`` (the inputs), so an input is never overwritten.
    Temp files that earlier, interrupted writes left in the folder are removed first (``clean=False``:
    the caller did that once for many files; the scan lists the whole folder). A full disk or a
    read-only folder becomes one :class:`OutputError` naming ``path``; no partial file remains.
    """
    path = Path(path)
    for p in protect:
        if Path(p).exists() and path.exists() and os.path.samefile(p, path):
            raise ModelFileError(path, "refusing to overwrite an input file; choose another output name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if clean:
            clean_stale_parts(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise output_error(path, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get ordinary permissions
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        # a write-side failure (the inputs were opened before): name the output, not the temp file
        if e.errno in OUTPUT_ERRNOS and (e.filename in (None, str(tmp_path), str(path))):
            raise output_error(path, e) from None
        raise
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
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=Path(path).name,
                disable=not progress,
                leave=False,
            ) as bar:  # closed (its line cleared) on error too, so an error message stands alone
                for key, t in tensors:
                    want = next(order, None)
                    if key != want:
                        raise ValueError(f"tensor {key!r} produced out of order (expected {want!r})")
                    _write_tensor(f, t, specs[key], key)
                    bar.update(specs[key].nbytes)
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
