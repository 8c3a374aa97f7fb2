"""img2img: A1111's step rule, the loop equal to diffusers' img2img pipeline, resize modes, CLI and API."""

import numpy as np
import pytest
import torch
from PIL import Image

from baka.errors import BakaError
from baka.generate import infotext
from baka.generate.conditioning import PromptEncoder
from baka.generate.engine import Generator, GenParams
from baka.generate.samplers import build_scheduler
from baka.generate.upscale import RESIZE_MODES, img2img_steps

P = dict(steps=4, width=64, height=64, seed=9)


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


# A1111 1.10 (img2img_fix_steps off): t_enc = int(min(denoise, 0.999) * steps), t_enc + 1 steps run
@pytest.mark.parametrize(
    ("steps", "denoise", "want"), [(20, 0.75, 16), (20, 1.0, 20), (20, 0.0, 1), (10, 0.35, 4), (4, 0.5, 3)]
)
def test_step_rule(steps, denoise, want):
    assert img2img_steps(steps, denoise) == want


def _latents(gen, p, init):
    seen = {}
    orig = gen.decode
    gen.decode = lambda lat: (seen.setdefault("lat", lat), orig(lat))[1]
    try:
        gen(p, init_image=init)
    finally:
        gen.decode = orig
    return seen["lat"]


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "Heun"])
def test_loop_equals_diffusers_img2img(gen, picture, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    p = GenParams("a cat", "blurry", sampler=sampler, cfg=5.0, batch=2, denoise=0.5, **P)
    ours = _latents(gen, p, picture)
    pipe = StableDiffusionImg2ImgPipeline(**gen.pipe.components)
    pipe.scheduler = build_scheduler(sampler, gen.base_scheduler)
    pipe.set_progress_bar_config(disable=True)
    enc = PromptEncoder(gen.pipe.text_encoder)
    ref = pipe(
        prompt_embeds=enc.encode("a cat").repeat(2, 1, 1),
        negative_prompt_embeds=enc.encode("blurry").repeat(2, 1, 1),
        image=gen.encode([picture] * 2),  # latents (4 channels); baka encodes with the posterior mean
        num_inference_steps=4,
        strength=0.75,  # diffusers runs int(4 * 0.75) = 3 steps: A1111's rule at denoise 0.5 runs 3 too
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(9 + i) for i in range(2)],
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_denoise_moves_away_from_the_picture(gen, picture):
    x0 = gen.encode([picture])
    near = _latents(gen, GenParams("a cat", denoise=0.2, **P), picture)
    far = _latents(gen, GenParams("a cat", denoise=1.0, **P), picture)
    assert (near - x0).abs().mean() < (far - x0).abs().mean()


def test_infotext_and_errors(gen, picture):
    r = gen(GenParams("a cat", denoise=0.6, **P), init_image=picture)[0]
    assert infotext.parse(r.infotext)[2]["Denoising strength"] == "0.6"
    with pytest.raises(BakaError, match="hires"):
        gen(GenParams("a cat", hr_scale=2, **P), init_image=picture)
    with pytest.raises(BakaError, match="resize mode"):
        gen(GenParams("a cat", resize_mode="Stretch", **P), init_image=picture)


def _bands(w, h, rows):
    a = np.zeros((h, w, 3), np.uint8)
    for (y0, y1, x0, x1), c in rows:
        a[y0:y1, x0:x1] = c
    return Image.fromarray(a)


def test_resize_modes():
    R, G, B = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    # 128x64: red left quarter, green middle, blue right quarter; cropping to 64x64 keeps the middle
    wide = _bands(128, 64, [((0, 64, 0, 32), R), ((0, 64, 32, 96), G), ((0, 64, 96, 128), B)])
    crop = np.asarray(RESIZE_MODES.get("Crop and resize")(wide, 64, 64))
    assert crop.shape == (64, 64, 3) and (crop[:, 2:-2, 1] > 200).all()
    # 64x32 green with a red top row and a blue bottom row: filled to 64x64 by stretching those rows
    flat = _bands(64, 32, [((0, 32, 0, 64), G), ((0, 1, 0, 64), R), ((31, 32, 0, 64), B)])
    fill = np.asarray(RESIZE_MODES.get("2")(flat, 64, 64))
    assert tuple(fill[4, 32]) == R and tuple(fill[60, 32]) == B and fill[32, 32, 1] > 200
    stretched = np.asarray(RESIZE_MODES.get("Just resize")(wide, 64, 64))
    assert stretched[32, 4, 0] > 200 and stretched[32, 60, 2] > 200  # all three bands survive


def test_cli_img2img(run_cli, tiny_files, picture, tmp_path):
    src = tmp_path / "in.png"
    picture.save(src)
    out = tmp_path / "out"
    argv = ["generate", str(tiny_files[0]), "-p", "a cat", "--steps", "3", "-W", "64", "-H", "64"]
    code, _, err = run_cli(*argv, "--init-image", str(src), "--denoise", "0.5", "-o", str(out))
    assert code == 0, err
    (png,) = out.glob("*.png")
    assert "Denoising strength: 0.5" in Image.open(png).info["parameters"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code, out_text, err = run_cli(*argv, "--init-image", str(tmp_path / "bad.png"), "-o", str(out))
    assert code != 0 and "bad.png: not a readable image" in err and "Traceback" not in out_text + err
