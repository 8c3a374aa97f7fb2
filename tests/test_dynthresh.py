"""Dynamic thresholding against the sd-dynamic-thresholding extension's own code (a table it produced,
tests/data/dynthresh_reference.json: 13 settings x 3 steps, with AND weights), then in the engine, the
CLI, infotext and the A1111 API's alwayson_scripts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baka.errors import BakaError
from baka.generate import infotext
from baka.generate.denoise import Prediction
from baka.generate.dynthresh import DynThresh, parse_dynthresh
from baka.generate.engine import Generator, GenParams

TABLE = json.loads((Path(__file__).parent / "data" / "dynthresh_reference.json").read_text())


def _dt(st: dict) -> DynThresh:
    return DynThresh(
        mimic_scale=st["mimic"],
        percentile=st["pct"] * 100,
        mimic_mode=st["mm"],
        mimic_scale_min=st["mmin"],
        cfg_mode=st["cm"],
        cfg_scale_min=st["cmin"],
        sched_val=st["sv"],
        separate_channels=st["sep"],
        startpoint=st["sp"],
        variability=st["var"],
        phi=st["phi"],
    )


@pytest.mark.parametrize("i", range(len(TABLE["cases"])))
def test_equals_the_extension(i):
    case = TABLE["cases"][i]
    uncond = torch.tensor(case["uncond"])
    cond = torch.tensor(case["cond"])
    k = len(case["weights"])
    # the extension stacks sub-prompts per image: rows i*k .. i*k+k-1 belong to image i
    conds = [cond.reshape(-1, k, *cond.shape[1:])[:, j] for j in range(k)]
    dt = _dt(case["settings"])
    out = dt.combine(conds, uncond, case["weights"], case["cfg"], case["step"], case["steps"])
    assert torch.allclose(out, torch.tensor(case["out"]), atol=2e-5), case["settings"]


def test_table_covers_every_mode():
    from baka.generate.dynthresh import MODES

    used = {c["settings"][m] for c in TABLE["cases"] for m in ("mm", "cm")}
    assert used == set(MODES.names())


def test_x0_round_trip():
    ac = torch.linspace(0.999, 0.01, 1000)
    x, pred = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for v in (False, True):
        pr = Prediction(ac, v)
        t = torch.tensor(321.5)
        assert torch.allclose(pr.from_x0(pr.to_x0(pred, x, t), x, t), pred, atol=1e-4)


def test_parse_and_errors():
    assert parse_dynthresh("off") is None and parse_dynthresh(None) is None
    d = parse_dynthresh("5.5,percentile=99.5,cfg_mode=Cosine Down,separate_channels=false,phi=0.8")
    assert d == DynThresh(5.5, 99.5, cfg_mode="Cosine Down", separate_channels=False, phi=0.8)
    with pytest.raises(BakaError, match="did you mean"):
        parse_dynthresh("7,cfg_mode=Cosine Dwn")
    with pytest.raises(BakaError, match="name=value"):
        parse_dynthresh("7,bogus=1")
    with pytest.raises(BakaError, match="MEAN or ZERO"):
        parse_dynthresh("7,startpoint=MIDDLE")


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


P = dict(steps=4, width=64, height=64, seed=3, cfg=15.0)


def test_engine_applies_it_on_the_estimate(gen):
    """The thresholded run differs from plain CFG; with the mimic scale equal to the CFG scale,
    percentile 100 and MEAN / AD it changes nothing (the extension's identity case)."""
    plain = np.asarray(gen(GenParams("a cat", "ugly", sampler="Euler", **P))[0].image, np.int16)
    dt = np.asarray(gen(GenParams("a cat", "ugly", sampler="Euler", dynthresh=DynThresh(5.0), **P))[0].image)
    same = gen(GenParams("a cat", "ugly", sampler="Euler", dynthresh=DynThresh(15.0), **P))[0].image
    assert np.abs(plain - dt).max() > 10
    assert np.abs(plain - np.asarray(same, np.int16)).max() <= 1


def test_infotext_round_trip_and_cli(gen, tiny_files, tmp_path, run_cli):
    d = DynThresh(6.0, 99.0, mimic_mode="Power Up", mimic_scale_min=2.0, sched_val=2.0, variability="STD")
    (r,) = gen(GenParams("a cat", sampler="Euler a", dynthresh=d, **P))
    fields = infotext.parse(r.infotext)[2]
    assert fields["Dynamic thresholding enabled"] == "True" and fields["Mimic scale"] == "6"
    assert fields["Mimic mode"] == "Power Up" and fields["Scheduler value"] == "2"
    assert GenParams.from_infotext(r.infotext).dynthresh == d
    code, out, err = run_cli(
        "generate", tiny_files[0], "-p", "a cat", "--steps", "2", "-W", "64", "-H", "64", "--dynthresh",
        "7,percentile=99", "-o", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    (png,) = tmp_path.glob("*.png")
    assert "Threshold percentile: 99" in infotext.read_png(png)


def test_api_alwayson_scripts():
    body = {
        "prompt": "a",
        "alwayson_scripts": {
            "Dynamic Thresholding (CFG Scale Fix)": {
                "args": [True, 6.5, 99.5, "Constant", 0, "Linear Down", 2, 4, True, "MEAN", "AD", 1]
            }
        },
    }
    p = GenParams.from_api(body, {})
    assert p.dynthresh == DynThresh(6.5, 99.5, cfg_mode="Linear Down", cfg_scale_min=2.0)
    body["alwayson_scripts"]["Dynamic Thresholding (CFG Scale Fix)"]["args"][0] = False
    assert GenParams.from_api(body, {}).dynthresh is None
