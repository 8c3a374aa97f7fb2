"""A1111's DPM fast: k-diffusion's sample_dpm_fast (run locally on a closed-form model, numbers in
tests/data/kdiffusion_dpm_fast_reference.json) through baka's scheduler and denoising loop, at eta 0 and
at A1111's eta 1, for step counts of every remainder mod 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baka.errors import BakaError
from baka.generate.denoise import sample
from baka.generate.samplers import build_scheduler
from baka.models.config import shipped_config

REF = json.loads((Path(__file__).parent / "data" / "kdiffusion_dpm_fast_reference.json").read_text())


@pytest.mark.parametrize("case", sorted(REF["cases"]))
def test_dpm_fast_equals_kdiffusion(case):
    n, eta = case.split("/")
    ref = REF["cases"][case]
    s = build_scheduler("DPM fast", shipped_config("scheduler"))
    s.eta = float(eta)
    s.set_timesteps(int(n))
    assert len(s.timesteps) == int(n)  # exactly n model calls
    assert [float(v) for v in s.call_sigmas] == pytest.approx(ref["call_sigmas"], rel=1e-5)
    assert s.init_noise_sigma == pytest.approx(REF["sigma_max"], rel=1e-6)

    def denoiser(x_in, t, step):
        sigma = float(s.call_sigmas[s._call])
        x = x_in * (sigma**2 + 1) ** 0.5
        return (x - 0.9 * x / (1 + sigma**2)) / sigma

    x_t = torch.tensor(ref["x_T"]).reshape(1, 4, 2, 2)
    got = sample(denoiser, s, x_t, int(n), generator=torch.Generator().manual_seed(11))
    want = torch.tensor(ref["result"]).reshape(1, 4, 2, 2)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_dpm_fast_in_the_generator(tiny_files):
    from baka.generate.engine import Generator, GenParams

    gen = Generator(tiny_files[0], progress=False)
    p = GenParams("a cat", steps=7, width=64, height=64, seed=3, sampler="DPM fast")
    a, b = gen(p)[0], gen(p)[0]
    assert a.image.tobytes() == b.image.tobytes() and "Sampler: DPM fast" in a.infotext
    with pytest.raises(BakaError, match="cannot use schedule type 'Karras'"):
        build_scheduler("DPM fast", shipped_config("scheduler"), schedule="Karras")
