"""supermerger's calc modes through baka's streaming engine, against outputs produced by running
supermerger's own merge function on the same small models (tests/data/supermerger_calcmodes.json,
its source and commit inside): cosineA / cosineB (model-wide similarity range, VAE kept from A),
tensor / tensor2, self, extract (with and without C), Adjust, random R / U / X weights and elemental
block ranges."""

import json
from pathlib import Path

import pytest
import torch

from baka.merge import engine
from baka.merge.elemental import parse_rules
from baka.merge.engine import merge_models
from baka.merge.recipe import Recipe
from baka.merge.weights import BETA_OFFSET, parse_weights
from baka.models.io import read_raw
from baka.models.safetensors_io import save_file

DATA = json.loads((Path(__file__).parent / "data" / "supermerger_calcmodes.json").read_text())
METHOD = {"cosineA": "cosine_a", "cosineB": "cosine_b", "tensor": "tensor", "tensor2": "tensor2",
          "self": "self", "extract": "extract", "normal": "weight_sum"}  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def _tensors(d: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v["data"], dtype=DTYPES[v["dtype"]]).reshape(v["shape"]) for k, v in d.items()}


def _cases(*sections):
    return [pytest.param(c, id=c["name"]) for s in sections for c in DATA[s]]


@pytest.fixture
def no_sd1_check(monkeypatch):
    # the cases are 4-7 key models (supermerger's own inputs), not whole SD1 checkpoints
    monkeypatch.setattr(engine.detect, "require_sd1", lambda *a, **k: None)


@pytest.mark.parametrize("case", _cases("cosine", "tensor", "self", "extract", "adjust"))
def test_calcmode_equals_supermerger(case, tmp_path, no_sd1_check):
    p = case["params"]
    paths = []
    for name in ("A", "B", "C"):
        if name in case:
            paths.append(tmp_path / f"{name}.safetensors")
            save_file(_tensors(case[name]), paths[-1])
    if p.get("useblocks"):
        alpha, beta = parse_weights(p["weights_a"]), parse_weights(p["weights_b"])
    else:
        alpha, beta = (float(p.get("alpha", 0)),) * 26, (float(p.get("beta", 0)),) * 26
    recipe = Recipe(METHOD[p["calcmode"]], [str(x) for x in paths], alpha, beta,
                    gamma=p.get("opt_value", 0.3), adjust=p.get("fine", ""))  # fmt: skip
    out = tmp_path / "out.safetensors"
    merge_models(recipe, out, progress=False, hash_inputs=False)
    got, _ = read_raw(out)
    want = _tensors(case["output"])
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        tol = 2e-3 if torch.float16 in (g.dtype, w.dtype) else 2e-5
        assert torch.allclose(g.double(), w.double(), atol=tol, rtol=tol, equal_nan=True), (k, g, w)


def test_random_block_weights_equal_supermerger():
    for case in DATA["random"]["cases"]:
        seed = case["seed"]
        for token in ("R", "U", "X"):
            for which, offset in (("alpha", 0), ("beta", BETA_OFFSET)):
                want = [float(v) for v in case[f"{token}_default_limits_{which}"].split(",")]
                got = parse_weights(",".join([token] * 26), seed=seed, offset=offset)
                assert list(got) == want, (seed, token, which)
    # numbers stay, random positions drawn at their own index
    got = parse_weights("0.5,0,0,0.3,R,U," + ",".join(["0.1"] * 20), seed=0)
    assert list(got[:6]) == [0.5, 0, 0, 0.3, 0.424, 0.208]
    with pytest.raises(Exception, match="need a seed"):
        parse_weights("R," + ",".join(["0.1"] * 25))


def test_random_elemental_ratios_equal_supermerger():
    for case in DATA["random"]["elemental_ratio_num0"]:
        for token, want in zip("RUX", case["R_U_X"], strict=True):
            (rule,) = parse_rules(f"::{token}")
            from baka.merge.elemental import override

            assert override([rule], "IN01", "k", 0.5, index=0, seed=case["seed"]) == pytest.approx(
                want, abs=1e-9
            )


@pytest.mark.parametrize("spec", list(DATA["elemental"]["blocker"]))
def test_elemental_block_ranges_equal_supermerger(spec):
    want = DATA["elemental"]["blocker"][spec].split()
    (rule,) = parse_rules(f"{spec}::0.5")
    negate = want[0] == "NOT"
    assert rule.not_blocks == negate
    assert rule.blocks == frozenset(want[1:] if negate else want)
