"""Pickled checkpoints: every bad file is one ModelFileError line naming it; hostile pickles run nothing."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from baka.errors import ModelFileError
from baka.models.ckpt import load_ckpt


class _RebuildFromString:
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, ("not a storage", 0, (2,), (1,), False, {}))


class _RebuildFromNone:
    def __reduce__(self):
        return (torch._utils._rebuild_tensor, (None, 0, (2,), (1,)))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _self_state_dict(p):
    sd: dict = {}
    sd["state_dict"] = sd
    torch.save(sd, p)


def _self_model(p):
    outer: dict = {"model": {}}
    outer["model"]["module"] = outer
    torch.save(outer, p)


def _legacy_truncated(p):
    torch.save({"state_dict": {"a": torch.ones(64)}}, p, _use_new_zipfile_serialization=False)
    p.write_bytes(p.read_bytes()[:60])


def _zip_truncated(p):
    torch.save({"state_dict": {"a": torch.ones(1000)}}, p)
    p.write_bytes(p.read_bytes()[:-300])


BAD = {
    "zero_bytes": lambda p: p.write_bytes(b""),
    "state_dict_contains_itself": _self_state_dict,
    "model_contains_parent": _self_model,
    "rebuild_tensor_from_string": lambda p: torch.save({"state_dict": {"a": _RebuildFromString()}}, p),
    "rebuild_tensor_from_none": lambda p: torch.save({"state_dict": {"a": _RebuildFromNone()}}, p),
    "raw_pickle_protocol_4": lambda p: p.write_bytes(pickle.dumps({"state_dict": {"a": 1}}, protocol=4)),
    "raw_pickle_protocol_2": lambda p: p.write_bytes(pickle.dumps({"state_dict": {"a": 1}}, protocol=2)),
    "random_bytes": lambda p: p.write_bytes(bytes(range(256)) * 3),
    "legacy_truncated": _legacy_truncated,
    "zip_truncated": _zip_truncated,
    "no_tensors": lambda p: torch.save({"epoch": 3}, p),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_ckpt_is_one_line(name, tmp_path, run_cli):
    p = tmp_path / f"{name}.ckpt"
    BAD[name](p)
    with pytest.raises(ModelFileError) as e:
        load_ckpt(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg, msg
    assert "weights_only" not in msg and "Weights only" not in msg, msg  # never advise the unsafe retry
    code, out, err = run_cli("convert", p, "-o", tmp_path / "out.safetensors")
    assert code == 2 and str(p) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.safetensors").exists()


def test_protocol_4_names_the_cause(tmp_path):
    p = tmp_path / "p4.pt"
    p.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    with pytest.raises(ModelFileError, match="protocol 4"):
        load_ckpt(p)


def test_hostile_protocol_4_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}, protocol=4))
    with pytest.raises(ModelFileError):
        load_ckpt(p)
    p2 = tmp_path / "evil2.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "x": _Evil(marker)}, p2, pickle_protocol=4)
    with pytest.raises(ModelFileError):
        load_ckpt(p2)
    assert not marker.exists()


def test_self_referencing_dict_with_tensors_still_loads(tmp_path):
    sd: dict = {"a": torch.ones(2)}
    sd["me"] = sd
    p = tmp_path / "ok.ckpt"
    torch.save({"state_dict": sd}, p)
    assert list(load_ckpt(p)) == ["a"]
