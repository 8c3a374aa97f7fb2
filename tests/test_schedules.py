"""A1111 schedule types beside the sampler: sigmas against the published formulas (hand-computed from
the model's own sigma range), the pair read from infotext / API, unsupported types refused."""

import math

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
    with pytest.raises(BakaError, match="baka does not yet"):
        build_scheduler("Euler", SD, schedule="Align Your Steps")
    with pytest.raises(BakaError, match="did you mean"):
        build_scheduler("Euler", SD, schedule="Karas")
    with pytest.raises(BakaError, match="cannot use"):
        build_scheduler("DDIM", SD, schedule="Karras")


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
