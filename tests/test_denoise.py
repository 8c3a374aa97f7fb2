"""baka's denoising loop: equal to diffusers' pipeline where A1111 and diffusers agree, A1111's rules
(prompt schedules, AND, unpadded prompt / negative) where they differ."""

import pytest
import torch

from baka.generate.conditioning import PromptEncoder
from baka.generate.denoise import CFGDenoiser, at_step, pad_tokens, sample
from baka.generate.engine import Generator, GenParams
from baka.generate.samplers import build_scheduler

P = dict(steps=4, width=64, height=64, seed=5)


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


def _latents(gen, p: GenParams, **over) -> torch.Tensor:
    """The generator's final latents (decode bypassed)."""
    seen = {}
    orig = gen.decode

    def keep(lat):
        seen["lat"] = lat
        return orig(lat)

    gen.decode = keep
    try:
        gen(p.replace(**over))
    finally:
        gen.decode = orig
    return seen["lat"]


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "Heun", "DDIM"])
@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_plain_prompt_equals_diffusers_pipeline(gen, sampler, cfg):
    p = GenParams("a cat", "blurry", sampler=sampler, cfg=cfg, batch=2, **P)
    ours = _latents(gen, p)
    enc = PromptEncoder(gen.pipe.text_encoder)
    sched = build_scheduler(sampler, gen.base_scheduler)
    gen.pipe.scheduler = sched
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens])
    ref = gen.pipe(
        prompt_embeds=enc.encode("a cat").repeat(2, 1, 1),
        negative_prompt_embeds=enc.encode("blurry").repeat(2, 1, 1),
        num_inference_steps=4,
        guidance_scale=cfg,
        latents=noise,
        generator=gens,
        output_type="latent",
    ).images
    assert torch.equal(ours, ref)


def test_schedule_step_rule_is_a1111s():
    a, b = torch.zeros(1, 77, 2), torch.ones(1, 77, 2)
    sched = [(2, a), (4, b)]  # [a:b:2] at 4 steps
    assert [at_step(sched, i).sum().item() for i in range(4)] == [0, 0, 0, 154]
    # alternation [a|b]: (1, a), (2, b), (3, a), (4, b) -> sampler steps 0..3 use a, a, b, a
    alt = [(1, a), (2, b), (3, a), (4, b)]
    assert [int(at_step(alt, i).sum()) for i in range(4)] == [0, 0, 154, 0]


def test_pad_tokens_repeats_last_vector():
    x, y = torch.randn(1, 77, 3), torch.randn(1, 154, 3)
    px, py = pad_tokens([x, y])
    assert px.shape == py.shape == (1, 154, 3) and torch.equal(py, y)
    assert torch.equal(px[:, 77:], x[:, -1:].expand(-1, 77, -1))


class _Rec(torch.nn.Module):
    """A stand-in UNet that records its calls and returns a function of x and the conditioning."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        self.calls.append((x.shape[0], encoder_hidden_states.shape[1]))
        return (x * 0 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1),)


def _c(v: float, n: int = 77) -> torch.Tensor:
    return torch.full((1, n, 4), v)


def test_and_weights_combine_as_composable_diffusion():
    unet = _Rec()
    d = CFGDenoiser(unet, [([(4, _c(2.0))], 1.0), ([(4, _c(5.0))], 0.5)], [(4, _c(1.0))], cfg=3.0)
    out = d(torch.zeros(2, 4, 8, 8), torch.tensor(1), 0)
    # uncond + sum w * cfg * (cond - uncond) = 1 + 1*3*(2-1) + 0.5*3*(5-1) = 10
    assert torch.allclose(out, torch.full_like(out, 10.0))
    assert unet.calls == [(6, 77)]  # one batched pass: uncond + two sub-prompts, 2 images each


def test_long_prompt_short_negative_run_apart_unless_padded():
    unet = _Rec()
    d = CFGDenoiser(unet, [([(4, _c(2.0, 154))], 1.0)], [(4, _c(1.0))], cfg=7.0)
    d(torch.zeros(1, 4, 8, 8), torch.tensor(1), 0)
    assert unet.calls == [(1, 77), (1, 154)]  # A1111's default: separate passes, nothing padded
    unet.calls.clear()
    d.pad_with = _c(0.0)
    d(torch.zeros(1, 4, 8, 8), torch.tensor(1), 0)
    assert unet.calls == [(2, 154)]


def test_pad_option_changes_the_image_only_when_lengths_differ(gen):
    long = ", ".join(["a red cat"] * 30)
    p = GenParams(long, "blurry", sampler="Euler", **P)
    a, b = _latents(gen, p), _latents(gen, p, pad_cond_uncond=True)
    assert not torch.allclose(a, b)
    short = GenParams("a cat", "blurry", sampler="Euler", **P)
    assert torch.equal(_latents(gen, short), _latents(gen, short, pad_cond_uncond=True))


def test_prompt_editing_changes_conditioning_mid_run(gen):
    p = GenParams("a [cat:dog:2] photo", "", sampler="Euler", **P)
    edit = _latents(gen, p)
    cat, dog = _latents(gen, p, prompt="a cat photo"), _latents(gen, p, prompt="a dog photo")
    assert not torch.allclose(edit, cat) and not torch.allclose(edit, dog)
    # an edit after the last step is the first prompt throughout
    assert torch.equal(_latents(gen, p, prompt="a [cat:dog:99] photo"), cat)
    # each distinct text is encoded once
    enc = PromptEncoder(gen.pipe.text_encoder)
    conds, _ = enc.conditioning("[a|b] x", "", 20)
    assert len(conds[0][0]) == 20 and len(enc._cache) == 3  # "a x", "b x", ""


def test_and_is_not_the_plain_prompt(gen):
    p = GenParams("a cat AND a dog :0.7", "", sampler="Euler", **P)
    both = _latents(gen, p)
    assert not torch.allclose(both, _latents(gen, p, prompt="a cat"))
    zero = _latents(gen, p, prompt="a cat AND a dog :0")
    torch.testing.assert_close(zero, _latents(gen, p, prompt="a cat"), rtol=1e-4, atol=1e-3)


def test_interrupt_stops_the_loop():
    calls = []

    class S:
        timesteps = torch.arange(5)

        def scale_model_input(self, x, t):
            return x

        def step(self, pred, t, x, return_dict=False):
            return (x + 1,)

    out = sample(lambda x, t, i: calls.append(i) or x, S(), torch.zeros(1), 5, on_step=lambda d, n: d == 2)
    assert calls == [0, 1] and out.item() == 2


def test_on_latents_gets_the_schedulers_clean_estimate():
    """The live preview's latents: diffusers' ``pred_original_sample`` where the scheduler gives one."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    for cls, has_x0 in ((EulerDiscreteScheduler, True), (DPMSolverMultistepScheduler, False)):
        sched = cls()
        sched.set_timesteps(4)
        x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
        seen = []
        ref = cls()
        ref.set_timesteps(4)
        want, xr = [], x.clone()
        for t in ref.timesteps:
            ref.scale_model_input(xr, t)  # as sample() does (Euler marks its input scaled)
            o = ref.step(torch.full_like(xr, 0.1), t, xr)
            xr = o.prev_sample
            want.append(o.pred_original_sample if has_x0 else xr)
        out = sample(lambda xi, t, i: torch.full_like(xi, 0.1), sched, x, 4, on_latents=seen.append)
        assert len(seen) == 4 and torch.equal(out, xr)
        for a, b in zip(seen, want, strict=True):
            assert torch.equal(a, b)


def test_cheap_preview_is_a1111s_linear_map():
    from baka.generate.preview import preview_image

    z = torch.zeros(1, 4, 2, 3)
    z[0, 0, 0, 0] = 1.0  # channel 0 alone: (1 + (0.298, 0.207, 0.208)) / 2
    z[0, 3, 1, 2] = 2.0  # channel 3 twice: (1 + 2 * (-0.184, -0.271, -0.473)) / 2
    img = preview_image(z)
    assert img.size == (3, 2)
    assert img.getpixel((0, 0)) == tuple(round((1 + c) / 2 * 255) for c in (0.298, 0.207, 0.208))
    assert img.getpixel((2, 1)) == tuple(round((1 + 2 * c) / 2 * 255) for c in (-0.184, -0.271, -0.473))
    assert img.getpixel((1, 0)) == (128, 128, 128)  # zero latents: mid grey (127.5 rounds to 128)
