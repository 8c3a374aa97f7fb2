"""A1111 schedule types beside the sampler: sigmas against the published formulas (hand-computed from
the model's own sigma range), the pair read from infotext / API, unsupported types refused."""

import math

import numpy as np
import pytest
import torch

from baka.errors import BakaError
from baka.generate.params import GenParams
from baka.generate.samplers import build_scheduler

SD = {  # SD1.x training schedule
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def _range():
    betas = torch.linspace(SD["beta_start"] ** 0.5, SD["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    sig = ((1 - ac) / ac) ** 0.5
    return float(sig[0]), float(sig[-1])


def test_karras_is_karras_2022_rho_7():
    smin, smax = _range()
    n = 10
    want = [(smax ** (1 / 7) + i / (n - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7 for i in range(n)]
    s = build_scheduler("Euler", SD, schedule="Karras")
    s.set_timesteps(n)
    assert s.sigmas[:-1].tolist() == pytest.approx(want, rel=1e-4)
    assert float(s.sigmas[-1]) == 0.0


def test_exponential_is_log_linear():
    smin, smax = _range()
    n = 8
    want = [math.exp(math.log(smax) + i / (n - 1) * (math.log(smin) - math.log(smax))) for i in range(n)]
    s = build_scheduler("Euler", SD, schedule="Exponential")
    s.set_timesteps(n)
    assert s.sigmas[:-1].tolist() == pytest.approx(want, rel=1e-4)


def test_explicit_schedule_replaces_the_samplers_own():
    a = build_scheduler("DPM++ 2M Karras", SD, schedule="Exponential")
    b = build_scheduler("DPM++ 2M", SD, schedule="Exponential")
    a.set_timesteps(6)
    b.set_timesteps(6)
    assert torch.equal(a.sigmas, b.sigmas)
    c = build_scheduler("DPM++ 2M", SD)
    c.set_timesteps(6)
    assert not torch.equal(b.sigmas, c.sigmas)


def test_unsupported_and_unknown_types_are_errors():
    with pytest.raises(BakaError, match="cannot use"):
        build_scheduler("DDIM", SD, schedule="Karras")  # a timestep sampler: no sigmas to space
    with pytest.raises(BakaError, match="cannot use"):
        build_scheduler("DPM2", SD, schedule="Align Your Steps")  # its sigmas cannot be set
    with pytest.raises(BakaError, match="did you mean"):
        build_scheduler("Euler", SD, schedule="Karas")


# -- A1111 1.10's sd_schedulers.py, restated on numpy from its formulas --------------------------------


def _model():
    _, smax = _range()
    betas = np.linspace(SD["beta_start"] ** 0.5, SD["beta_end"] ** 0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    sig = np.sqrt((1 - ac) / ac)
    return sig, np.log(sig)


def _at(t):
    """k-diffusion's t_to_sigma: log-sigma linear between integer steps."""
    _, ls = _model()
    t = np.asarray(t, dtype=np.float64)
    lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
    return np.exp((1 - (t - lo)) * ls[lo] + (t - lo) * ls[hi])


def _expected(name: str, n: int) -> list[float]:
    sig, _ = _model()
    smin, smax = sig[0], sig[-1]
    zero = [0.0]
    if name in ("Uniform", "Normal"):
        return [*_at(np.linspace(999, 0, n)), *zero]
    if name == "SGM Uniform":
        return [*_at(np.linspace(999, 0, n + 1)[:-1]), *zero]
    if name == "Polyexponential":  # rho 1
        ramp = np.linspace(1, 0, n)
        return [*np.exp(ramp * (np.log(smax) - np.log(smin)) + np.log(smin)), *zero]
    if name == "KL Optimal":  # n + 1 values, the last sigma_min (not 0)
        i = np.arange(n + 1) / n
        return list(np.tan(i * np.arctan(smin) + (1 - i) * np.arctan(smax)))
    if name == "Simple":
        return [*[sig[-(1 + int(x * 1000 / n))] for x in range(n)], *zero]
    if name == "DDIM":
        return [*sig[1 :: 1000 // n][::-1], *zero]
    if name == "Align Your Steps":
        table = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n == len(table):
            return [*table, *zero]
        ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(table[::-1]))
        return [*np.exp(ys)[::-1], *zero]
    raise KeyError(name)


@pytest.mark.parametrize(
    "name",
    [
        "Uniform",
        "Normal",
        "SGM Uniform",
        "Polyexponential",
        "KL Optimal",
        "Simple",
        "DDIM",
        "Align Your Steps",
    ],
)
@pytest.mark.parametrize("n", [7, 11, 20])
def test_schedule_sigmas(name, n):
    s = build_scheduler("Euler", SD, schedule=name)
    s.set_timesteps(n)
    assert s.sigmas.tolist() == pytest.approx(_expected(name, n), rel=5e-5)  # alphas_cumprod are float32
    # the UNet is told each sigma's own (fractional) timestep, by the inverse log-sigma interpolation
    assert s.timesteps[0] == pytest.approx(999, abs=2e-3) or name in ("DDIM", "Align Your Steps")
    # A1111's DDIM type takes every (1000 // n)-th sigma from t = 1: that can be more than n steps
    assert len(s.timesteps) == len(_expected(name, n)) - 1


def test_ddim_schedule_hand_values():
    s = build_scheduler("Euler", SD, schedule="DDIM")
    s.set_timesteps(10)
    # A1111's ddim_scheduler: sigmas of t = 901, 801, ..., 1 (every 100th from t = 1), then 0
    assert s.timesteps.tolist() == pytest.approx([901, 801, 701, 601, 501, 401, 301, 201, 101, 1], abs=1e-3)


@pytest.mark.parametrize(
    "cls",
    [
        "EulerDiscreteScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
    ],
)
@pytest.mark.parametrize(
    ("name", "option"),
    [("Karras", "use_karras_sigmas"), ("Exponential", "use_exponential_sigmas"), ("Beta", "use_beta_sigmas")],
)
def test_set_sigmas_equal_diffusers_own(cls, name, option):
    """Setting sigmas from outside gives what the scheduler builds itself from its option: the same
    sigmas and timesteps (so the setters fill each scheduler the way it expects)."""
    import diffusers

    from baka.generate.samplers import SCHEDULES, with_sigmas

    c = getattr(diffusers, cls)
    own = c.from_config({**SD, option: True})
    ours = with_sigmas(c, SCHEDULES.get(name)).from_config(SD)
    own.set_timesteps(12)
    ours.set_timesteps(12)
    assert torch.allclose(own.sigmas, ours.sigmas, rtol=1e-6, atol=1e-6)
    tol = 1 if own.timesteps.dtype == torch.int64 else 1e-3  # rounded to integers: ties may differ by 1
    assert torch.allclose(own.timesteps.double(), ours.timesteps.double(), atol=tol)
    assert own.timesteps.dtype == ours.timesteps.dtype and len(own.timesteps) == len(ours.timesteps)


def test_automatic_is_a1111s_per_sampler_default():
    def sig(name, **kw):
        s = build_scheduler(name, SD, **kw)
        s.set_timesteps(9)
        return s.sigmas

    assert torch.equal(sig("DPM++ 2M"), sig("DPM++ 2M Karras"))  # A1111 1.9+: DPM++ 2M means Karras
    assert torch.equal(sig("DPM++ 2M SDE"), sig("DPM++ 2M", schedule="Exponential"))
    assert torch.equal(sig("DPM2"), sig("DPM2 Karras")) and torch.equal(
        sig("DPM++ SDE"), sig("DPM++ SDE Karras")
    )
    # no default of its own: the model's own spacing (k-diffusion get_sigmas), not diffusers' linspace
    assert sig("Euler").tolist() == pytest.approx(_expected("Uniform", 9), rel=5e-5)
    assert torch.equal(sig("Euler a"), sig("Euler", schedule="Uniform"))
    # zero-terminal SNR keeps diffusers' trailing spacing
    z = build_scheduler("Euler", SD, zero_snr=True)
    z.set_timesteps(9)
    assert z.timesteps[0] == 999 and float(z.sigmas[0]) > 1000


def test_infotext_writes_the_pair_as_a1111_1_10():
    def pair(**kw):
        f = GenParams("a", **kw).infotext_fields()
        return f["Sampler"], f["Schedule type"]

    assert pair(sampler="DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert pair(sampler="DPM++ 2M") == ("DPM++ 2M", "Karras")  # Automatic resolved, as A1111 writes it
    assert pair(sampler="DPM++ 2M SDE") == ("DPM++ 2M SDE", "Exponential")
    assert pair(sampler="Euler a") == ("Euler a", None)
    assert pair(sampler="Euler", schedule="KL Optimal") == ("Euler", "KL Optimal")
    assert pair(sampler="DPM++ 2M Karras", schedule="Beta") == ("DPM++ 2M", "Beta")
    assert pair(sampler="DPM++ 2M", zero_snr=True) == ("DPM++ 2M", None)
    for kw in ({"sampler": "DPM++ 2M"}, {"sampler": "Euler", "schedule": "Align Your Steps"}):
        p = GenParams("a", **kw)
        back = GenParams.from_infotext(
            "a\n" + ", ".join(f"{k}: {v}" for k, v in p.infotext_fields().items() if v)
        )
        a = build_scheduler(p.sampler, SD, schedule=p.schedule)
        b = build_scheduler(back.sampler, SD, schedule=back.schedule)
        a.set_timesteps(6)
        b.set_timesteps(6)
        assert torch.equal(a.sigmas, b.sigmas)


def test_pairs_from_infotext_and_api():
    # a pair with a combined name folds into it; any other pair is kept, never dropped
    info = "a\\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64"
    p = GenParams.from_infotext(info.replace("\\n", "\n"))
    assert (p.sampler, p.schedule) == ("DPM++ 2M Karras", "Automatic")
    p = GenParams.from_infotext(info.replace("\\n", "\n").replace("DPM++ 2M,", "Euler,"))
    assert (p.sampler, p.schedule) == ("Euler", "Karras")
    assert p.infotext_fields()["Schedule type"] == "Karras"
    assert GenParams("a").infotext_fields()["Schedule type"] is None
    q = GenParams.from_api({"prompt": "a", "sampler_name": "Euler a", "scheduler": "Exponential"}, {})
    assert (q.sampler, q.schedule) == ("Euler a", "Exponential")


def test_any_sampler_schedule_name_is_read():
    from baka.generate.samplers import split_name

    # A1111 1.6-1.8 combined names that baka does not register are split as A1111 1.10 splits them
    assert split_name("DPM++ 3M SDE Karras") == ("DPM++ 3M SDE", "Karras")
    assert split_name("euler a exponential") == ("Euler a", "Exponential")
    assert split_name("DPM++ 2M SDE Heun") == ("DPM++ 2M SDE Heun", None)
    a = build_scheduler("DPM++ 3M SDE Karras", SD)
    b = build_scheduler("DPM++ 3M SDE", SD, schedule="Karras")
    a.set_timesteps(7)
    b.set_timesteps(7)
    assert torch.equal(a.sigmas, b.sigmas)
    with pytest.raises(BakaError, match="unknown sampler"):
        split_name("DPM++ 4M Karras")


def test_sde_variants():
    heun = build_scheduler("DPM++ 2M SDE Heun", SD)
    three = build_scheduler("DPM++ 3M SDE", SD)
    assert (heun.config.algorithm_type, heun.config.solver_type) == ("sde-dpmsolver++", "heun")
    assert (three.config.algorithm_type, three.config.solver_order) == ("sde-dpmsolver++", 3)
    assert GenParams("a", sampler="DPM++ 3M SDE").infotext_fields()["Schedule type"] == "Exponential"
