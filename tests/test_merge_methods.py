"""Each method against a hand computation on small tensors (a=1, b=3, c=2 style numbers)."""

import pytest
import torch

from baka.merge.methods import METHODS, Ctx

A = torch.tensor([1.0, -2.0, 0.5, 4.0])
B = torch.tensor([3.0, -1.0, 0.5, 0.0])
C = torch.tensor([2.0, -2.0, 1.5, 1.0])


def run(name, a=A, b=B, c=C, alpha=0.25, beta=0.5, seed=0, key="k"):
    return METHODS.get(name).fn(a, b, c, Ctx(key, alpha, beta, seed))


def test_weight_sum():
    # (1-0.25)*1 + 0.25*3 = 1.5 ; 0.75*-2 + 0.25*-1 = -1.75 ; 0.5 ; 0.75*4 = 3
    assert run("Weight sum").tolist() == [1.5, -1.75, 0.5, 3.0]


def test_add_difference():
    # 1 + .25*(3-2) = 1.25 ; -2 + .25*(1) = -1.75 ; .5 + .25*(-1) = .25 ; 4 + .25*(-1) = 3.75
    assert run("add_difference").tolist() == [1.25, -1.75, 0.25, 3.75]


def test_triple_sum():
    # (1-.25-.5)*A + .25*B + .5*C: .25+.75+1 = 2 ; -.5-.25-1 = -1.75 ; .125+.125+.75 = 1 ; 1+0+.5 = 1.5
    assert run("triple_sum").tolist() == [2.0, -1.75, 1.0, 1.5]


def test_sum_twice():
    # inner = [1.5,-1.75,.5,3]; (1-.5)*inner + .5*C = [1.75,-1.875,1.0,2.0]
    assert run("sum_twice").tolist() == [1.75, -1.875, 1.0, 2.0]


def test_train_difference():
    # A + 1.8*a*(B-C)*|B-A|/(|B-C|+|B-A|)
    # e0: 1 + .45*1*2/(1+2) = 1.3 ; e1: -2 + .45*1*1/(1+1) = -1.775
    # e2: |B-C|=1,|B-A|=0 -> 0.5 ; e3: 4 + .45*(-1)*4/(1+4) = 3.64
    assert run("train_difference").tolist() == pytest.approx([1.3, -1.775, 0.5, 3.64])
    same = torch.tensor([1.0])
    assert run("train_difference", same, same, same).tolist() == [1.0]  # 0/0 -> no change


def test_cosine_columns_a_and_b():
    """baka's per-key column forms (supermerger's cosineA / cosineB, with their model-wide pass, are
    tested against supermerger's own outputs in test_supermerger_parity.py)."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    # similarity per column (dim 0): col0 parallel -> 1, col1 orthogonal -> 0
    # cosineA: k = 1 - clamp(sim - 0.25, 0, 1) -> col0 0.25, col1 1.0
    out = run("cosine_a_columns", a, b, None, alpha=0.25)
    assert torch.allclose(out, torch.tensor([[1.25, 1.0], [0.0, 0.0]]))
    # cosineB: sim = (col_sim + A.B/(|A||B|)) / 2 with A.B/(|A||B|) = 2/sqrt(10)
    whole = 2 / 10**0.5
    k0 = 1 - ((1 + whole) / 2 - 0.25)
    k1 = 1 - ((0 + whole) / 2 - 0.25)
    out = run("cosine_b_columns", a, b, None, alpha=0.25)
    assert torch.allclose(out, torch.tensor([[1 + k0, k1], [0.0, 1 - k1]]))


def test_ties():
    a = torch.zeros(4)
    b = torch.tensor([3.0, -1.0, 2.0, 0.1])
    c = torch.tensor([-1.0, -2.0, 2.0, 0.2])
    # density .5: B keeps {3, 2}; C keeps {-2, 2}
    # signs summed: e0 +1 -> +, e1 -1 -> -, e2 +2 -> +, e3 0
    # disjoint mean: e0 3 ; e1 -2 ; e2 (2+2)/2 = 2 ; e3 0 ; result = A + 1.0 * mean
    out = run("ties", a, b, c, alpha=1.0, beta=0.5)
    assert out.tolist() == [3.0, -2.0, 2.0, 0.0]
    # two models only: trim B's delta to its top half, scaled by alpha
    assert run("ties", a, b, None, alpha=0.5, beta=0.5).tolist() == [1.5, 0.0, 1.0, 0.0]


def test_dare_is_seeded_and_rescaled():
    a = torch.zeros(10000)
    b = torch.ones(10000)
    out = run("dare", a, b, None, alpha=1.0, beta=0.75, seed=7, key="x")
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 4.0))  # 1/(1-0.75)
    assert 0.22 < kept.float().mean() < 0.28
    assert out.mean().item() == pytest.approx(1.0, abs=0.1)  # unbiased in expectation
    assert torch.equal(out, run("dare", a, b, None, alpha=1.0, beta=0.75, seed=7, key="x"))
    assert not torch.equal(out, run("dare", a, b, None, alpha=1.0, beta=0.75, seed=8, key="x"))
    assert not torch.equal(out, run("dare", a, b, None, alpha=1.0, beta=0.75, seed=7, key="y"))


def test_smooth_add_difference():
    from scipy.ndimage import gaussian_filter, median_filter

    a = torch.zeros(5, 5)
    b = torch.zeros(5, 5)
    b[2, 2] = 10.0  # a lone spike: the median filter removes it entirely
    assert torch.equal(run("smoothAdd", a, b, torch.zeros(5, 5), alpha=1.0), torch.zeros(5, 5))
    b = torch.arange(25.0).reshape(5, 5)
    want = torch.from_numpy(gaussian_filter(median_filter(b.numpy(), size=3), sigma=1)) * 0.5
    assert torch.allclose(run("smoothAdd", a, b, torch.zeros(5, 5), alpha=0.5), want)


def test_every_method_has_a_formula_docstring():
    for name in METHODS.names():
        assert any(op in METHODS.get(name).doc for op in ("*", "lerp")), name


def test_ties_mecha_equals_sd_mechas_ties_sum():
    """sd-mecha's trim and count vote (values from running sd-mecha 1.1.8 locally,
    tests/data/sdmecha_ties.json); baka's ``ties`` keeps round(n * density) and votes by mass."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parent / "data" / "sdmecha_ties.json").read_text())
    for case in data["cases"]:
        t = {k: torch.tensor(case[k]) if case[k] is not None else None for k in ("a", "b", "c")}
        out = run("ties_mecha", t["a"], t["b"], t["c"], alpha=case["alpha"], beta=case["density"])
        assert torch.allclose(out, torch.tensor(case["out"]), atol=1e-6), case
    # the two votes differ: deltas +3 and -1 have mass +2 (ties keeps 3) but one sign each (a tied
    # count: sign 0, nothing agrees, sd-mecha's 0 / 0 becomes 0)
    a, b, c = torch.zeros(1), torch.tensor([3.0]), torch.tensor([-1.0])
    assert run("ties", a, b, c, alpha=1, beta=1).item() == 3.0
    assert run("ties_mecha", a, b, c, alpha=1, beta=1).item() == 0.0
