"""One bad embedding in a folder is skipped with one warning naming it; the rest still load."""

from __future__ import annotations

import logging
import os
import struct

import torch

from baka.generate.embeddings import EmbeddingDB
from baka.models.safetensors_io import save_file

WIDTH = 768


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _folder(tmp_path):
    d = tmp_path / "embeddings"
    d.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, WIDTH)}}, d / "goodpt.pt")
    save_file({"emb_params": torch.randn(1, WIDTH)}, d / "goodst.safetensors")
    torch.save({"string_to_param": {"*": _Evil(tmp_path / "pwned")}}, d / "hostile.pt")
    (d / "zero.pt").write_bytes(b"")
    (d / "zero.safetensors").write_bytes(b"")
    (d / "short.safetensors").write_bytes(b"\x01\x02\x03")  # a struct error today
    good = (d / "goodst.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[:-7])
    (d / "truncated.pt").write_bytes((d / "goodpt.pt").read_bytes()[:300])
    (d / "badheader.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    torch.save({"string_to_param": {"*": "not a tensor"}}, d / "notensor.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 1024)}}, d / "sd2.pt")
    (d / "notes.txt").write_text("ignored")
    return d


def test_bad_embeddings_are_skipped_with_one_warning_each(tmp_path, caplog):
    d = _folder(tmp_path)
    db = EmbeddingDB(WIDTH)
    with caplog.at_level(logging.WARNING, logger="baka.embeddings"):
        names = db.load_dir(d)
    assert names == ["goodpt", "goodst"]
    assert set(db.by_name) == {"goodpt", "goodst"}
    bad = {
        "hostile.pt",
        "zero.pt",
        "zero.safetensors",
        "short.safetensors",
        "truncated.safetensors",
        "truncated.pt",
        "badheader.safetensors",
        "notensor.pt",
        "sd2.pt",
    }
    assert {os.path.basename(p) for p in db.skipped} == bad
    for p, why in db.skipped.items():
        assert why.startswith(p) and "\n" not in why, why
    warnings = [r.getMessage() for r in caplog.records if r.name == "baka.embeddings"]
    assert len(warnings) == len(bad)
    for name in bad:
        assert sum(name in w for w in warnings) == 1, name
    assert "could run code" in db.skipped[str(d / "hostile.pt")]
    assert not (tmp_path / "pwned").exists()


def test_prompt_uses_the_good_embeddings(tmp_path):
    from baka.models.tokenizer import tokenize

    db = EmbeddingDB(WIDTH)
    db.load_dir(_folder(tmp_path))
    ids = tokenize("a goodpt photo")
    hits = [db.find(ids, i) for i in range(len(ids))]
    assert any(h is not None and h[0].name == "goodpt" for h in hits)


def test_generate_cli_survives_a_zero_byte_embedding(tiny_files, tmp_path, run_cli, caplog):
    d = tmp_path / "emb"
    d.mkdir()
    (d / "zero.pt").write_bytes(b"")
    torch.save({"string_to_param": {"*": _Evil(tmp_path / "pwned")}}, d / "hostile.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, d / "good.pt")
    with caplog.at_level(logging.WARNING, logger="baka.embeddings"):
        code, _, err = run_cli(
            "generate",
            tiny_files[0],
            "-p",
            "good",
            "-W",
            64,
            "-H",
            64,
            "--steps",
            1,
            "--embeddings",
            d,
            "-o",
            tmp_path / "o",
        )
    assert code == 0, err
    msgs = [r.getMessage() for r in caplog.records if r.name == "baka.embeddings"]
    assert len(msgs) == 2 and any("zero.pt" in m for m in msgs) and any("hostile.pt" in m for m in msgs)
    assert not (tmp_path / "pwned").exists()
