"""Golden values: pinned numbers for every sampler name -> diffusers scheduler mapping and for one
tiny-model image, so an upgrade of diffusers / transformers / torch that changes results fails loudly.

The table (tests/golden/golden.json) was produced by this file on torch 2.13.0 CPU with the versions
named inside it. After an upgrade that changes results on purpose, check the change, then rewrite the
table with ``BAKA_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and commit it with the reason.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from baka.generate.samplers import SAMPLERS, build_scheduler
from baka.models.config import shipped_config

GOLDEN = Path(__file__).parent / "golden" / "golden.json"
UPDATE = os.environ.get("BAKA_UPDATE_GOLDEN") == "1"


def _sampler_values(name: str) -> dict:
    s = build_scheduler(name, shipped_config("scheduler"))
    s.set_timesteps(10)
    out = {"class": type(s).__name__, "timesteps": [float(t) for t in s.timesteps[:4]]}
    sigmas = getattr(s, "sigmas", None)
    if sigmas is not None:
        out["sigmas"] = [round(float(v), 5) for v in sigmas[:4]]
    out["init_noise_sigma"] = round(float(s.init_noise_sigma), 5)
    return out


def _image_values(tiny_files) -> dict:
    from baka.generate.engine import Generator, GenParams

    gen = Generator(tiny_files[0], progress=False)
    img = gen(GenParams("a red (circle:1.2)", "blue", steps=4, width=64, height=64, seed=7))[0].image
    px = np.asarray(img, dtype=np.float64)
    return {
        "channel_mean": [round(float(v), 2) for v in px.mean(axis=(0, 1))],
        "channel_std": [round(float(v), 2) for v in px.std(axis=(0, 1))],
        "corner": [int(v) for v in px[0, 0]],
    }


def _versions() -> dict:
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def test_golden_table_covers_every_sampler(golden):
    if UPDATE:
        pytest.skip("rewriting the golden table")
    assert sorted(golden["samplers"]) == sorted(SAMPLERS.names())


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_mapping_is_pinned(name, golden):
    got = _sampler_values(name)
    if UPDATE:
        golden.setdefault("samplers", {})[name] = got
        return
    want = golden["samplers"][name]
    assert got["class"] == want["class"]
    assert got["timesteps"] == pytest.approx(want["timesteps"], abs=1e-3), name
    assert ("sigmas" in got) == ("sigmas" in want)
    if "sigmas" in want:
        assert got["sigmas"] == pytest.approx(want["sigmas"], abs=1e-4), name
    assert got["init_noise_sigma"] == pytest.approx(want["init_noise_sigma"], abs=1e-4)


def test_tiny_model_image_is_pinned(tiny_files, golden):
    got = _image_values(tiny_files)
    if UPDATE:
        golden["image"] = got
        golden["versions"] = _versions()
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    want = golden["image"]
    # tolerances allow a last-bit change in a kernel, not a change of maths
    assert got["channel_mean"] == pytest.approx(want["channel_mean"], abs=0.6)
    assert got["channel_std"] == pytest.approx(want["channel_std"], abs=0.6)
    assert got["corner"] == pytest.approx(want["corner"], abs=2)
