"""A1111's Restart sampler: the segment plan and the result equal A1111's own restart_sampler
(modules/sd_samplers_extra.py with k-diffusion, run locally on a closed-form model: the numbers in
tests/data/a1111_restart_reference.json), through baka's denoising loop and the generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baka.errors import BakaError
from baka.generate.denoise import sample
from baka.generate.samplers import build_scheduler
from baka.models.config import shipped_config

REF = json.loads((Path(__file__).parent / "data" / "a1111_restart_reference.json").read_text())


@pytest.mark.parametrize("steps", ["10", "20", "40"])
def test_restart_equals_a1111(steps):
    case = REF["cases"][steps]
    s = build_scheduler("Restart", shipped_config("scheduler"))
    s.set_timesteps(int(steps))
    # the plan: 10 steps no restart; 20 steps 11 + one restart of 9 Heun steps; 40 steps 20 + 2 x 10
    flat = [v for seg in s.segments for v in seg]
    assert flat == pytest.approx([v for seg in case["segments"] for v in seg], rel=1e-5)
    assert len(s.timesteps) == 2 * len(s.segments) - 1  # two calls a segment, one for the last
    x_t = torch.tensor(case["x_T"]).reshape(1, 4, 2, 2)
    assert float(s.init_noise_sigma) == pytest.approx(REF["sigma_max"], rel=1e-6)

    def denoiser(x_in, t, step):  # eps of the closed-form model A1111 ran: denoised = 0.9 x / (1 + s^2)
        sigma = float(s.call_sigmas[s._call])
        x = x_in * (sigma**2 + 1) ** 0.5
        return (x - 0.9 * x / (1 + sigma**2)) / sigma

    got = sample(denoiser, s, x_t.clone(), int(steps), generator=torch.Generator().manual_seed(11))
    want = torch.tensor(case["result"]).reshape(1, 4, 2, 2)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_restart_in_the_generator_and_its_limits(tiny_files):
    from baka.generate.engine import Generator, GenParams

    gen = Generator(tiny_files[0], progress=False)
    p = GenParams("a cat", steps=20, width=64, height=64, seed=3, sampler="Restart")
    a, b = gen(p)[0], gen(p)[0]
    assert a.image.tobytes() == b.image.tobytes() and "Sampler: Restart" in a.infotext
    with pytest.raises(BakaError, match="cannot use schedule type 'Exponential'"):
        build_scheduler("Restart", shipped_config("scheduler"), schedule="Exponential")
    with pytest.raises(BakaError, match="zero terminal SNR"):
        build_scheduler("Restart", shipped_config("scheduler"), zero_snr=True).set_timesteps(20)
    with pytest.raises(BakaError, match="runs from pure noise only"):
        gen(p.replace(steps=4), init_image=a.image)
