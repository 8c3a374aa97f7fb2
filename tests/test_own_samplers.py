"""baka's own samplers against their references, run locally on a closed-form model (denoised =
0.9 x / (1 + sigma^2)) with the same starting noise and noise draws; only numbers committed:
- Restart: A1111 1.10's restart_sampler with k-diffusion (tests/data/a1111_restart_reference.json),
  at 10 (no restart), 20 (one) and 40 (two restarts) steps;
- DPM fast: k-diffusion's sample_dpm_fast (tests/data/kdiffusion_dpm_fast_reference.json), at eta 0 and
  A1111's eta 1, for step counts of every remainder mod 3;
- DPM adaptive: k-diffusion's sample_dpm_adaptive (tests/data/kdiffusion_dpm_adaptive_reference.json),
  at eta 0 and 1 and two tolerances, rejected attempts included;
- img2img (and so the hires second pass) with all three: A1111's sample_img2img path
  (tests/data/a1111_own_img2img.json): the schedule's tail, the picture noised to its first sigma."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baka.errors import BakaError
from baka.generate.denoise import sample
from baka.generate.samplers import build_scheduler
from baka.models.config import shipped_config

DATA = Path(__file__).parent / "data"
RESTART = json.loads((DATA / "a1111_restart_reference.json").read_text())
FAST = json.loads((DATA / "kdiffusion_dpm_fast_reference.json").read_text())
ADAPTIVE = json.loads((DATA / "kdiffusion_dpm_adaptive_reference.json").read_text())
IMG2IMG = json.loads((DATA / "a1111_own_img2img.json").read_text())


def _run(s, ref: dict, steps: int, start: int = 0) -> None:
    """The reference's starting point through baka's loop with the closed-form model; equal result."""

    def denoiser(x_in, t, step):  # its noise prediction at the scheduler's current call
        sigma = float(s.call_sigmas[s._call])
        x = x_in * (sigma**2 + 1) ** 0.5
        return (x - 0.9 * x / (1 + sigma**2)) / sigma

    x_t = torch.tensor(ref["x_T"]).reshape(1, 4, 2, 2)
    got = sample(denoiser, s, x_t, steps, generator=torch.Generator().manual_seed(11), start=start)
    want = torch.tensor(ref["result"]).reshape(1, 4, 2, 2)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("steps", ["10", "20", "40"])
def test_restart_equals_a1111(steps):
    case = RESTART["cases"][steps]
    s = build_scheduler("Restart", shipped_config("scheduler"))
    s.set_timesteps(int(steps))
    # the plan: 10 steps no restart; 20 steps 11 + one restart of 9 Heun steps; 40 steps 20 + 2 x 10
    flat = [v for seg in s.segments for v in seg]
    assert flat == pytest.approx([v for seg in case["segments"] for v in seg], rel=1e-5)
    assert len(s.timesteps) == 2 * len(s.segments) - 1  # two calls a segment, one for the last
    assert float(s.init_noise_sigma) == pytest.approx(RESTART["sigma_max"], rel=1e-6)
    _run(s, case, int(steps))


@pytest.mark.parametrize("case", sorted(FAST["cases"]))
def test_dpm_fast_equals_kdiffusion(case):
    n, eta = case.split("/")
    ref = FAST["cases"][case]
    s = build_scheduler("DPM fast", shipped_config("scheduler"))
    s.eta = float(eta)
    s.set_timesteps(int(n))
    assert len(s.timesteps) == int(n)  # exactly n model calls
    assert [float(v) for v in s.call_sigmas] == pytest.approx(ref["call_sigmas"], rel=1e-5)
    assert s.init_noise_sigma == pytest.approx(FAST["sigma_max"], rel=1e-6)
    _run(s, ref, int(n))


@pytest.mark.parametrize("case", sorted(ADAPTIVE["cases"]))
def test_dpm_adaptive_equals_kdiffusion(case):
    """The same model calls (its own step sizes, retries included) and the same result; the step
    count does not matter."""
    eta, rtol, atol = (float(v) for v in case.split("/"))
    ref = ADAPTIVE["cases"][case]
    s = build_scheduler("DPM adaptive", shipped_config("scheduler"))
    s.eta, s.rtol, s.atol = eta, rtol, atol
    s.set_timesteps(20)
    _run(s, ref, 20)
    assert [float(v) for v in s.call_sigmas] == pytest.approx(ref["call_sigmas"], rel=1e-5)
    assert (s.n_accept, s.n_reject) == (ref["n_accept"], ref["n_reject"])
    assert ref["n_reject"] > 0 or eta == 0  # the ancestral cases exercise retried attempts


@pytest.mark.parametrize("case", sorted(IMG2IMG["cases"]))
def test_own_samplers_img2img_equal_a1111(case):
    from baka.generate.denoise import first_index, noise_to
    from baka.generate.upscale import img2img_steps

    name, steps, denoise = case.split("/")
    steps, denoise, ref = int(steps), float(denoise), IMG2IMG["cases"][case]
    s = build_scheduler(name, shipped_config("scheduler"))
    s.set_timesteps(steps)
    run = img2img_steps(steps, denoise)
    start = first_index(s, steps, run)
    assert start == 0 and s.start_sigma == pytest.approx(ref["start_sigma"], rel=1e-5)
    x0, noise = (torch.tensor(IMG2IMG[k]).reshape(1, 4, 2, 2) for k in ("x0", "noise"))
    latents = noise_to(s, x0, noise, start)
    _run(s, {"x_T": latents.flatten().tolist(), "result": ref["result"]}, run, start=start)
    # the adaptive sampler's step sizes feed back the last digits of the start sigma (baka's Uniform
    # schedule interpolates in float64, k-diffusion in float32): the same calls to 1e-4
    tol = 1e-4 if name == "DPM adaptive" else 1e-5
    assert [float(v) for v in s.call_sigmas] == pytest.approx(ref["call_sigmas"], rel=tol)


@pytest.mark.parametrize(
    "sampler, steps, other_schedule",
    [("Restart", 20, "Exponential"), ("DPM fast", 7, "Karras"), ("DPM adaptive", 5, "Karras")],
)
def test_own_samplers_in_the_generator_and_their_limits(tiny_files, sampler, steps, other_schedule):
    from baka.generate.engine import Generator, GenParams

    gen = Generator(tiny_files[0], progress=False)
    p = GenParams("a cat", steps=steps, width=64, height=64, seed=3, sampler=sampler)
    a, b = gen(p)[0], gen(p)[0]
    assert a.image.tobytes() == b.image.tobytes() and f"Sampler: {sampler}" in a.infotext
    with pytest.raises(BakaError, match=f"cannot use schedule type '{other_schedule}'"):
        build_scheduler(sampler, shipped_config("scheduler"), schedule=other_schedule)
    with pytest.raises(BakaError, match="zero terminal SNR"):
        build_scheduler(sampler, shipped_config("scheduler"), zero_snr=True).set_timesteps(steps)
    # img2img and the hires second pass with the same sampler (A1111 allows both)
    i2i = gen(p.replace(steps=6, denoise=0.5), init_image=a.image)[0]
    assert i2i.image.size == (64, 64) and "Denoising strength: 0.5" in i2i.infotext
    hr = gen(p.replace(steps=4, hr_scale=2.0, denoise=0.6))[0]
    assert hr.image.size == (128, 128) and "Hires upscale: 2" in hr.infotext
