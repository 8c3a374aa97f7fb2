"""baka's zero-copy safetensors reader is exactly as strict as the safetensors library.

Every file the library refuses, baka refuses with one ModelFileError line naming the file; every file
the library loads, baka loads with identical tensors (dtype, shape and bytes) and metadata. The one
deliberate difference: a repeated tensor name or metadata key (the library silently keeps the last
one) is refused. The corpus is generated here, never downloaded.
"""

from __future__ import annotations

import itertools
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from baka.errors import ModelFileError
from baka.models.safetensors_io import SafetensorsFile

SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
}


def blob(
    header: object = None, data: bytes = b"", *, raw: bytes | None = None, n: int | None = None
) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def u8(b: int, e: int, shape=None, dtype="U8") -> dict:
    return {"dtype": dtype, "shape": [e - b] if shape is None else shape, "data_offsets": [b, e]}


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dup_keys(path: Path) -> bool:
    """Whether the header repeats a tensor name or a metadata key (baka's one stricter rule)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    found = []

    def hook(pairs):
        keys = [k for k, _ in pairs]
        found.append(len(keys) != len(set(keys)))
        return dict(pairs)

    json.loads(data[8 : 8 + n].decode(), object_pairs_hook=hook)
    return any(found)


def compare(path: Path) -> str:
    """Load ``path`` with both readers and assert they agree; returns "loaded" or "refused"."""
    try:
        lib = load_file(path)
        with safe_open(path, framework="pt") as f:
            lib_meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any refusal by the library
        lib = None
    try:
        with SafetensorsFile(path) as f:
            ours = {k: f.get(k) for k in f.keys()}
            our_meta = f.metadata
    except ModelFileError as e:
        msg = str(e)
        assert str(path) in msg and "\n" not in msg, msg
        if lib is not None:
            assert "appears twice" in msg and _dup_keys(path), f"baka refused a file the library loads: {msg}"
        return "refused"
    assert lib is not None, f"baka loaded a file the library refuses: {path.read_bytes()[:300]!r}"
    assert set(ours) == set(lib)
    for k in lib:
        assert ours[k].dtype == lib[k].dtype, k
        assert tuple(ours[k].shape) == tuple(lib[k].shape), k
        assert _raw_bytes(ours[k]) == _raw_bytes(lib[k]), k
    assert our_meta == lib_meta
    return "loaded"


REFUSED = {
    "empty": b"",
    "short": b"\x02\x00\x00",
    "header_past_eof": struct.pack("<Q", 100) + b"{}",
    "header_too_large": struct.pack("<Q", 100_000_001) + b"{}",
    "zero_header": blob(raw=b""),
    "not_json": blob(raw=b"{nope}"),
    "top_list": blob([]),
    "bom": blob(raw="\ufeff{}".encode()),
    "invalid_utf8": blob(raw=b'{"__metadata__":{"a":"\xff"}}'),
    "lone_surrogate": blob(raw=b'{"__metadata__":{"a":"\\ud800"}}'),
    "nan": blob(raw=b'{"__metadata__":{"a":NaN}}'),
    "trailing_nul_in_header": blob(raw=b"{}\0"),
    "overlap": blob({"a": u8(0, 2), "b": u8(1, 2)}, b"xy"),
    "gap": blob({"a": u8(1, 2)}, b"xy"),
    "gap_between": blob({"a": u8(0, 1), "b": u8(2, 3)}, b"xyz"),
    "reversed_offsets": blob({"a": u8(1, 0, [0])}, b"x"),
    "trailing_bytes": blob({"a": u8(0, 1)}, b"xy"),
    "data_past_eof": blob({"a": u8(0, 2)}, b"x"),
    "size_mismatch": blob({"a": u8(0, 4, [2], "F32")}, b"xxxx"),
    "dup_metadata_object": blob(raw=b'{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}'),
    "dup_field": blob(raw=b'{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', data=b"x"),
    "metadata_int": blob({"__metadata__": {"a": 1}}),
    "metadata_null_value": blob({"__metadata__": {"a": None}}),
    "metadata_list": blob({"__metadata__": []}),
    "metadata_string": blob({"__metadata__": "x"}),
    "shape_float": blob({"a": u8(0, 1, [1.0])}, b"x"),
    "shape_exponent": blob(raw=b'{"a":{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}}', data=b"x"),
    "shape_negative": blob({"a": u8(0, 1, [-1])}, b"x"),
    "shape_negative_zero": blob(raw=b'{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
    "shape_bool": blob({"a": u8(0, 1, [True])}, b"x"),
    "shape_string": blob({"a": u8(0, 1, ["1"])}, b"x"),
    "shape_null": blob({"a": u8(0, 0, None) | {"shape": None}}),
    "shape_huge": blob({"a": u8(0, 0, [2**64])}),
    "shape_overflow": blob({"a": u8(0, 0, [2**32, 2**32, 0])}),
    "offsets_three": blob({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 1]}}, b"x"),
    "offsets_float": blob({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}}, b"x"),
    "missing_shape": blob({"a": {"dtype": "U8", "data_offsets": [0, 1]}}, b"x"),
    "tensor_null": blob({"a": None}),
    "tensor_string": blob({"a": "U8"}),
    "unknown_dtype": blob({"a": u8(0, 1, [1], "XX")}, b"x"),
    "lowercase_dtype": blob({"a": u8(0, 1, [1], "u8")}, b"x"),
    "dtype_without_torch": blob({"a": u8(0, 3, [4], "F6_E2M3")}, b"xyz"),
    "f4_odd_last_dim": blob({"a": u8(0, 3, [2, 3], "F4")}, b"xyz"),
    "f4_half_byte": blob({"a": u8(0, 0, [], "F4")}),
    "deep_json": blob(
        raw=b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":' + b"[" * 2000 + b"]" * 2000 + b"}}"
    ),
    "deep_json_128": blob(
        raw=b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":'
        + b'{"a":' * 126
        + b"1"
        + b"}" * 126
        + b"}}"
    ),
    "number_out_of_range": blob(raw=b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":1e400}}'),
}

LOADED = {
    "empty_header": blob({}),
    "metadata_only": blob({"__metadata__": {"format": "pt", "ß": "ü"}}),
    "metadata_null": blob({"__metadata__": None}),
    "leading_and_trailing_space": blob(
        raw=b'  {"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} \t\n', data=b"x"
    ),
    "odd_header_length": blob({"a": u8(0, 4, [1], "F32")}, struct.pack("<f", 1.5)),
    "out_of_order": blob({"b": u8(1, 2), "a": u8(0, 1)}, b"xy"),
    "zero_size": blob({"a": u8(0, 0, [0, 3], "F32"), "b": u8(0, 1)}, b"x"),
    "zero_size_at_end": blob({"a": u8(0, 1), "z": u8(1, 1, [5, 0], "F16")}, b"x"),
    "scalar": blob({"a": u8(0, 8, [], "F64")}, struct.pack("<d", 2.5)),
    "empty_name": blob({"": u8(0, 1)}, b"x"),
    "unicode_name": blob(
        raw=b'{"\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', data=b"x"
    ),
    "extra_field": blob({"a": u8(0, 1) | {"zz": [[[1]], {"q": None}]}}, b"x"),
    "entry_as_array": blob(raw=b'{"a":["U8",[1],[0,1]]}', data=b"x"),
    "deep_json_127": blob(
        raw=b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":'
        + b'{"a":' * 125
        + b"1"
        + b"}" * 125
        + b"}}"
    ),
    "f4": blob({"a": u8(0, 3, [2, 3, 2], "F4")}, b"\x12\x34\x56\x78\x9a\xbc"[:6]),
    **{
        f"dtype_{dt}": blob({"a": u8(0, 3 * size, [3], dt)}, bytes(range(1, 3 * size + 1)))
        for dt, size in SIZES.items()
    },
    "u32_values": blob({"a": u8(0, 8, [2], "U32")}, struct.pack("<II", 7, 2**32 - 1)),
}
LOADED["f4"] = blob({"a": u8(0, 6, [2, 3, 2], "F4")}, b"\x12\x34\x56\x78\x9a\xbc")

STRICTER = {  # the library keeps the last of a repeated name; baka refuses the ambiguous file
    "dup_tensor": blob(
        raw=b'{"a":' + json.dumps(u8(0, 1)).encode() + b',"a":' + json.dumps(u8(0, 1)).encode() + b"}",
        data=b"x",
    ),
    "dup_metadata_key": blob(raw=b'{"__metadata__":{"a":"1","a":"2"}}'),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_library_refuses_so_does_baka(name, tmp_path):
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(REFUSED[name])
    assert compare(p) == "refused"


@pytest.mark.parametrize("name", sorted(LOADED))
def test_library_loads_so_does_baka(name, tmp_path):
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(LOADED[name])
    assert compare(p) == "loaded"


@pytest.mark.parametrize("name", sorted(STRICTER))
def test_repeated_names_refused(name, tmp_path):
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(STRICTER[name])
    with pytest.raises(ModelFileError, match="appears twice") as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)


def test_cli_info_one_line(tmp_path, run_cli):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(REFUSED["deep_json"])
    code, out, err = run_cli("info", p)
    assert code == 2 and str(p) in err and len(err.strip().splitlines()) == 1


# --- bounded fuzz: a valid file, then mutations of its structure, text and framing -----------------

_DTYPES = [*SIZES, "F4", "F6_E2M3", "XX"]
_ints = st.one_of(st.integers(0, 3), st.sampled_from([-1, 2**64, 1.0, True, "2", None]))


@st.composite
def files(draw) -> bytes:
    header: dict = {}
    data = b""
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        if draw(st.integers(0, 9)) == 0:
            shape = draw(st.lists(_ints, max_size=3))
        numel = 1
        for s in shape:
            numel *= s if type(s) is int and 0 <= s <= 3 else 1
        size = numel * SIZES.get(dtype, 1) if dtype != "F4" else numel // 2
        b, e = len(data), len(data) + size
        if draw(st.integers(0, 5)) == 0:
            b, e = b + draw(st.integers(-2, 2)), e + draw(st.integers(-2, 2))
        info = {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}
        if draw(st.integers(0, 9)) == 0:
            info["extra"] = draw(st.sampled_from([1, "x", [], {"k": [1]}, None]))
        header[f"t{i}" if draw(st.integers(0, 9)) else "t0"] = info
        data += draw(st.binary(min_size=size, max_size=size))
    meta = draw(
        st.sampled_from(["absent", "null", "empty", "strings", "int", "list", "nested"]),
    )
    if meta != "absent":
        header["__metadata__"] = {
            "null": None,
            "empty": {},
            "strings": {"a": "b", "format": "pt"},
            "int": {"a": 1},
            "list": ["a"],
            "nested": {"a": {"b": "c"}},
        }[meta]
    items = list(header.items())
    draw(st.randoms()).shuffle(items)
    text = json.dumps(dict(items)).encode()
    if draw(st.integers(0, 4)) == 0:
        text = draw(st.sampled_from([b" ", b"\xef\xbb\xbf", b"", b"\n"])) + text
    if draw(st.integers(0, 4)) == 0:
        text += draw(st.sampled_from([b"   ", b"\0", b"}", b",", b"\t\n"]))
    if text and draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1 :]
    n = len(text)
    if draw(st.integers(0, 9)) == 0:
        n += draw(st.integers(-3, 3))
    if draw(st.integers(0, 5)) == 0:
        data += draw(st.binary(min_size=1, max_size=3))
    if data and draw(st.integers(0, 9)) == 0:
        data = data[:-1]
    return struct.pack("<Q", max(n, 0)) + text + data


_counter = itertools.count()


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(files())
def test_fuzz_baka_agrees_with_library(content):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"f{next(_counter)}.safetensors"
        p.write_bytes(content)
        compare(p)
