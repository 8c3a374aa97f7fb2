"""Hires fix: A1111's step rule and sizes, the second pass equal to diffusers' img2img pipeline on the
upscaled latents, infotext and API fields."""

import pytest
import torch

from baka.errors import BakaError
from baka.generate import infotext
from baka.generate.conditioning import PromptEncoder
from baka.generate.engine import Generator, GenParams
from baka.generate.samplers import build_scheduler
from baka.generate.upscale import UPSCALERS, crop_latents, hires_size, hires_target, img2img_start

P = dict(steps=4, width=64, height=64, seed=3)


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


def _latents(gen, p: GenParams) -> torch.Tensor:
    seen = {}
    orig = gen.decode

    def keep(lat):
        seen["lat"] = lat
        return orig(lat)

    gen.decode = keep
    try:
        gen(p)
    finally:
        gen.decode = orig
    return seen["lat"]


# A1111 1.10 setup_img2img_steps with explicit steps (the hires path): schedule int(steps / min(d, .999)),
# the last `steps` run; hand-computed
@pytest.mark.parametrize(
    ("steps", "denoise", "want"),
    [(20, 0.7, (28, 20)), (10, 0.5, (20, 10)), (20, 1.0, (20, 20)), (7, 0.3, (23, 7)), (15, 0.0, (0, 15))],
)
def test_img2img_step_rule(steps, denoise, want):
    assert img2img_start(steps, denoise) == want


# int(side * scale) floored to the latent grid: the model card's 600x896 at 1.5 gives 896x1344
@pytest.mark.parametrize(
    ("w", "h", "s", "want"),
    [(600, 896, 1.5, (896, 1344)), (512, 512, 2, (1024, 1024)), (64, 64, 1.3, (80, 80))],
)
def test_hires_size(w, h, s, want):
    assert hires_size(w, h, s) == want


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "Heun", "DDIM"])
def test_second_pass_equals_diffusers_img2img(gen, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    base = GenParams("a cat", "blurry", sampler=sampler, cfg=6.0, batch=2, **P)
    first = _latents(gen, base)
    ours = _latents(gen, base.replace(hr_scale=2.0, hr_steps=3, denoise=0.5))
    assert ours.shape == (2, 4, 16, 16)
    up = torch.nn.functional.interpolate(first, size=(16, 16), mode="bilinear", antialias=False)
    pipe = StableDiffusionImg2ImgPipeline(**gen.pipe.components)
    pipe.scheduler = build_scheduler(sampler, gen.base_scheduler)
    pipe.set_progress_bar_config(disable=True)
    enc = PromptEncoder(gen.pipe.text_encoder)
    ref = pipe(
        prompt_embeds=enc.encode("a cat").repeat(2, 1, 1),
        negative_prompt_embeds=enc.encode("blurry").repeat(2, 1, 1),
        image=up,  # 4 channels: taken as latents
        num_inference_steps=6,  # int(3 / 0.5)
        strength=0.5,  # diffusers then runs the last int(6 * 0.5) = 3
        guidance_scale=6.0,
        generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_upscalers_sizes_and_errors(gen):
    for name in ("Latent (nearest-exact)", "Lanczos"):
        r = gen(GenParams("a cat", hr_scale=1.5, hr_upscaler=name, denoise=0.5, **P))
        assert r[0].image.size == (96, 96)
    # A1111's "None" (listed first by /sdapi/v1/upscalers): a plain Lanczos resize, as Lanczos on the grid
    none = gen(GenParams("a cat", hr_scale=1.5, hr_upscaler="None", denoise=0.5, **P))[0]
    assert "Hires upscaler: None" in none.infotext and none.image.tobytes() == r[0].image.tobytes()
    with pytest.raises(BakaError, match="Lanczos"):
        gen(GenParams("a cat", hr_scale=2, hr_upscaler="lanczos2", **P))
    with pytest.raises(BakaError, match="denoising strength"):
        gen(GenParams("a cat", hr_scale=2, denoise=1.5, **P))
    assert UPSCALERS.get("Latent (bilinear)").name == "Latent"


def test_denoise_zero_only_upscales(gen):
    calls = []
    h = gen.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = gen(GenParams("a cat", hr_scale=2, denoise=0.0, sampler="Euler", **P))
    finally:
        h.remove()
    assert len(calls) == P["steps"] and r[0].image.size == (128, 128)


def test_interrupt_in_first_pass_skips_the_second(gen):
    def on_step(i, total):
        if i == 2:
            gen.interrupt()

    gen.on_step = on_step
    try:
        r = gen(GenParams("a cat", hr_scale=2, **P))
    finally:
        gen.on_step = None
    assert r[0].image.size == (64, 64)


def test_progress_counts_both_passes(gen):
    seen = []
    gen.on_step = lambda i, n: seen.append((i, n))
    try:
        gen(GenParams("a cat", hr_scale=2, hr_steps=3, denoise=0.5, sampler="Euler", **P))
    finally:
        gen.on_step = None
    assert seen == [(i, 7) for i in range(1, 8)]


def test_infotext_fields_and_round_trip(gen):
    p = GenParams("a cat", hr_scale=1.5, hr_upscaler="Lanczos", hr_steps=6, denoise=0.45, **P)
    text = gen(p)[0].infotext
    fields = infotext.parse(text)[2]
    assert fields["Hires upscale"] == "1.5" and fields["Hires upscaler"] == "Lanczos"
    assert fields["Hires steps"] == "6" and fields["Denoising strength"] == "0.45"
    back = GenParams.from_infotext(text)
    assert (back.hr_scale, back.hr_upscaler, back.hr_steps, back.denoise) == (1.5, "Lanczos", 6, 0.45)
    plain = infotext.parse(gen(GenParams("a cat", **P))[0].infotext)[2]
    assert not {"Hires upscale", "Hires upscaler", "Denoising strength"} & set(plain)
    # A1111 does not write Hires steps when the second pass reuses the first pass's count
    assert "Hires steps" not in infotext.parse(gen(p.replace(hr_steps=0))[0].infotext)[2]


def test_api_fields_need_enable_hr():
    body = {"prompt": "a", "hr_scale": 3, "hr_upscaler": "Lanczos", "denoising_strength": 0.3}
    assert not GenParams.from_api(body, {}).hires
    on = GenParams.from_api({**body, "enable_hr": True, "hr_second_pass_steps": 5}, {})
    assert (on.hr_scale, on.hr_upscaler, on.hr_steps, on.denoise) == (3, "Lanczos", 5, 0.3)
    assert GenParams.from_api({"prompt": "a", "enable_hr": True}, {}).hr_scale == 2.0


def test_second_pass_sampler_and_prompt(gen, monkeypatch):
    """Hires sampler / schedule / prompt / negative: the second pass is built and conditioned with
    them (A1111's hr_sampler_name, hr_scheduler, hr_prompt, hr_negative_prompt)."""
    import baka.generate.engine as engine

    built, texts = [], []
    real_build = engine.build_scheduler
    monkeypatch.setattr(
        engine,
        "build_scheduler",
        lambda name, *a, **kw: (built.append((name, kw["schedule"])), real_build(name, *a, **kw))[1],
    )
    real_cond = PromptEncoder.conditioning
    monkeypatch.setattr(
        PromptEncoder,
        "conditioning",
        lambda self, a, b, *r, **kw: (texts.append((a, b)), real_cond(self, a, b, *r, **kw))[1],
    )
    p = GenParams(
        "a cat", "ugly", hr_scale=1.5, denoise=0.5, sampler="Euler a", hr_sampler="DPM++ 2M",
        hr_schedule="Exponential", hr_prompt="a cat, detailed", **P,
    )  # fmt: skip
    (r,) = gen(p)
    assert built == [("Euler a", "Automatic"), ("DPM++ 2M", "Exponential")]
    assert texts == [("a cat", "ugly"), ("a cat, detailed", "ugly")]
    info = infotext.parse(r.infotext)[2]
    assert info["Hires sampler"] == "DPM++ 2M" and info["Hires schedule type"] == "Exponential"
    assert info["Hires prompt"] == "a cat, detailed" and "Hires negative prompt" not in info
    back = GenParams.from_infotext(r.infotext)
    assert (back.hr_sampler, back.hr_schedule, back.hr_prompt) == (
        "DPM++ 2M",
        "Exponential",
        "a cat, detailed",
    )
    # the same as the first pass: not written (A1111)
    same = GenParams("a", hr_scale=1.5, hr_sampler="Euler a", hr_prompt="a", **P).infotext_fields()
    assert "Hires sampler" not in same and "Hires prompt" not in same


def test_second_pass_prompt_cannot_change_networks(gen):
    with pytest.raises(BakaError, match="extra networks"):
        gen(GenParams("a cat", hr_scale=1.5, hr_prompt="a cat <lora:other:1>", **P))


def test_second_pass_fields_from_the_api():
    body = {"prompt": "a", "enable_hr": True, "hr_sampler_name": "Use same sampler", "hr_prompt": ""}
    p = GenParams.from_api(body, {})
    assert (p.hr_sampler, p.hr_prompt) == ("", "")
    p = GenParams.from_api({**body, "hr_sampler_name": "Euler", "hr_negative_prompt": "bad"}, {})
    assert (p.hr_sampler, p.hr_negative) == ("Euler", "bad")
    assert GenParams.from_api({**body, "enable_hr": False, "hr_sampler_name": "Euler"}, {}).hr_sampler == ""


# A1111 1.10 calculate_target_resolution (hand-computed): one side 0 keeps the aspect; both sides
# upscale to cover the box (side = other * w // h), then (over // 8) latent columns / rows are cut
@pytest.mark.parametrize(
    ("w", "h", "resize", "want"),
    [
        (512, 768, (1024, 0), ((1024, 1536), (0, 0))),
        (512, 768, (0, 1000), ((664, 1000), (0, 0))),  # 1000 * 512 // 768 = 666, floored to the grid
        (512, 768, (1000, 1000), ((1000, 1496), (0, 62))),  # 1500 tall: (1500 - 1000) // 8
        (768, 512, (1000, 1000), ((1496, 1000), (62, 0))),
        (600, 896, (900, 1400), ((936, 1400), (4, 0))),  # 1400 * 600 // 896 = 937: (937 - 900) // 8
        (512, 512, (0, 0), ((1024, 1024), (0, 0))),  # no resize: by the scale (2 here)
    ],
)
def test_hires_resize_target(w, h, resize, want):
    assert hires_target(w, h, 2, resize) == want


def test_crop_latents_centre():
    lat = torch.arange(10 * 7).reshape(1, 1, 10, 7)
    out = crop_latents(lat, (3, 4))  # A1111: cut 3 // 2 = 1 column before, 2 after; 2 rows each side
    assert out.shape[-2:] == (6, 4) and out[0, 0, 0, 0] == lat[0, 0, 2, 1]


@pytest.mark.parametrize(("resize", "size"), [((96, 0), (96, 96)), ((96, 80), (96, 80)), ((0, 72), (72, 72))])
def test_hires_resize_gives_the_size(gen, resize, size):
    (r,) = gen(GenParams("a cat", hr_resize=resize, denoise=0.5, **P))
    assert r.image.size == size
    info = infotext.parse(r.infotext)[2]
    assert info["Hires resize"] == "{}x{}".format(*resize) and "Hires upscale" not in info
    assert GenParams.from_infotext(r.infotext).hr_resize == resize


def test_hires_resize_to_the_same_size_is_no_second_pass(gen):
    (r,) = gen(GenParams("a cat", hr_resize=(64, 64), denoise=0.5, **P))
    assert "Hires resize" not in r.infotext and "Denoising strength" not in r.infotext


def test_hires_resize_from_the_api_and_cli():
    body = {"prompt": "a", "enable_hr": True, "hr_resize_x": 1024, "hr_resize_y": 0}
    p = GenParams.from_api(body, {})
    assert p.hr_resize == (1024, 0) and p.hires
    assert GenParams.from_api({**body, "enable_hr": False}, {}).hr_resize == (0, 0)
    with pytest.raises(BakaError, match="WIDTHxHEIGHT"):
        GenParams.from_infotext("a\nSteps: 4, Sampler: Euler, Hires resize: 1024")
