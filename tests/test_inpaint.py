"""Inpainting: A1111's mask preparation (OpenCV's blur bit for bit, crop boxes, masked content), the
latent blend, the composite that keeps the picture outside the mask, 9-channel models, CLI and API."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baka.errors import BakaError
from baka.generate import infotext, inpaint
from baka.generate.denoise import Prediction
from baka.generate.engine import Generator, GenParams

DATA = Path(__file__).parent / "data"
P = dict(steps=4, width=64, height=64, seed=5, sampler="Euler", denoise=0.75)


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask(h=64, w=64, box=(16, 16, 40, 48)) -> Image.Image:
    """White (repaint) inside box = (y1, x1, y2, x2)."""
    m = np.zeros((h, w), np.uint8)
    y1, x1, y2, x2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


# -- mask preparation ---------------------------------------------------------------------------------


def test_blur_equals_opencv():
    """A1111 blurs with two cv2.GaussianBlur calls; the table is OpenCV 4.14's output on four masks at
    sigma 1, 2, 4 and 8 (tests/data/a1111_mask_blur_opencv.json, produced by running OpenCV)."""
    table = json.loads((DATA / "a1111_mask_blur_opencv.json").read_text())
    assert len(table["cases"]) == 16
    for case in table["cases"]:
        mask = Image.fromarray(np.array(table["masks"][case["mask"]], np.uint8))
        ours = np.asarray(inpaint.blur_mask(mask, case["sigma"], case["sigma"]))
        assert np.array_equal(ours, np.array(case["blurred"], np.uint8)), (case["mask"], case["sigma"])


def test_fixed_point_kernel_sums_to_256():
    for sigma in (1, 2, 4, 8, 16):
        k = inpaint.fixed_point_kernel(sigma)
        assert k.sum() == 256 and len(k) == 2 * int(2.5 * sigma + 0.5) + 1
        assert np.array_equal(k, k[::-1])


def test_binary_mask():
    grey = Image.fromarray(np.array([[128, 129, 0, 255]], np.uint8))
    assert np.asarray(inpaint.binary_mask(grey)).tolist() == [[0, 255, 0, 255]]
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but the alpha channel decides
    rgba[0, :, 3] = [0, 200, 255]
    assert np.asarray(inpaint.binary_mask(Image.fromarray(rgba, "RGBA"))).tolist() == [[0, 255, 255]]
    opaque = np.full((1, 2, 4), 255, np.uint8)
    opaque[0, 0, :3] = 0  # fully opaque alpha: the colour decides
    assert np.asarray(inpaint.binary_mask(Image.fromarray(opaque, "RGBA"))).tolist() == [[0, 255]]


@pytest.mark.parametrize(("pad", "want"), [(0, (10, 8, 30, 20)), (4, (6, 4, 34, 24)), (50, (0, 0, 40, 32))])
def test_crop_region(pad, want):
    assert inpaint.crop_region(_mask(32, 40, (8, 10, 20, 30)), pad) == want


def test_crop_region_blank():
    assert inpaint.crop_region(Image.new("L", (8, 8)), 4) is None


# hand-computed from A1111's expand_crop_region (masking.py): the short side grows, centred, then is
# shifted back inside the picture and clipped
@pytest.mark.parametrize(
    ("box", "size", "image", "want"),
    [
        ((100, 200, 228, 232), (512, 512), (512, 512), (100, 152, 228, 280)),  # its docstring's case
        ((0, 480, 128, 512), (512, 512), (512, 512), (0, 384, 128, 512)),  # shifted up from the bottom
        ((0, 0, 128, 32), (512, 512), (512, 512), (0, 0, 128, 128)),  # shifted down from the top
        ((10, 10, 42, 138), (512, 768), (200, 200), (0, 10, 85, 138)),  # width grows: int(53.3) = 53
        ((0, 0, 100, 20), (64, 64), (100, 40), (0, 0, 100, 40)),  # cannot grow: clipped to the picture
    ],
)
def test_expand_crop_region(box, size, image, want):
    assert inpaint.expand_crop_region(box, *size, *image) == want


def test_latent_keep():
    keep = inpaint.latent_keep(_mask(64, 64, (16, 8, 40, 32)), 8, 8)
    want = torch.ones(8, 8)
    want[2:5, 1:4] = 0
    assert keep.shape == (1, 1, 8, 8) and torch.equal(keep[0, 0], want)


def test_fill_takes_the_surrounding_colour():
    img = Image.new("RGB", (64, 64), (0, 0, 255))
    img.paste((255, 0, 0), (16, 16, 48, 48))
    out = np.asarray(inpaint.fill_masked(img, _mask(64, 64, (16, 16, 48, 48)))).astype(int)
    inside = out[20:44, 20:44]
    assert (inside[..., 2] > 200).all() and (inside[..., 0] < 30).all()  # blue came in, red is gone
    assert np.array_equal(out[:8, :8], np.asarray(img)[:8, :8])


@pytest.mark.parametrize("name", ["latent noise", "latent nothing"])
def test_latent_masked_content(name):
    z, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:5, 2:5] = 0
    out = inpaint.MASKED_CONTENT.get(name).latent(z, keep, noise)
    k = keep.bool().expand_as(z)
    assert torch.equal(out[k], z[k])
    assert torch.equal(out[~k], noise[~k] if name == "latent noise" else torch.zeros_like(z)[~k])
    assert inpaint.MASKED_CONTENT.canonical("2") == "latent noise"  # A1111's inpainting_fill numbers


# -- the blend ----------------------------------------------------------------------------------------


def test_alpha_at():
    ac = torch.linspace(0.99, 0.01, 1000)
    assert torch.allclose(inpaint.alpha_at(ac, torch.tensor([10.0])), ac[10:11].double())
    # halfway between two steps: the geometric mean of their sigmas (log-sigma interpolation)
    s = ((1 - ac) / ac).sqrt().double()
    mid = 1 / (1 + (s[10] * s[11]))
    assert torch.allclose(inpaint.alpha_at(ac, torch.tensor([10.5])), mid.reshape(1))


@pytest.mark.parametrize("v_pred", [False, True])
def test_blend_gives_init_as_the_estimate(v_pred):
    """Where the picture is kept, the blended prediction's x0 is the init latent (A1111 blends x0);
    elsewhere the prediction is untouched."""
    g = torch.Generator().manual_seed(0)
    init, x, pred = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4, :] = 1
    ac = torch.linspace(0.999, 0.001, 1000)
    t = torch.tensor(400.0)
    out = inpaint.LatentBlend(init, keep, Prediction(ac, v_pred))(pred, x, t)
    a = ac[400].double()
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    x0 = sa * x - s1 * out if v_pred else (x - s1 * out) / sa
    k = keep.bool().expand_as(x)
    assert torch.allclose(x0[k].float(), init[k], atol=1e-4)
    assert torch.equal(out[~k], pred[~k])


def test_blend_finite_at_zero_terminal_snr():
    ac = torch.linspace(0.999, 0.0, 1000)
    ac[-1] = 2**-24  # diffusers' zero-terminal-SNR floor
    init, x, pred = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    for v in (False, True):
        out = inpaint.LatentBlend(init, torch.ones(1, 1, 4, 4), Prediction(ac, v))(pred, x, torch.tensor(999))
        assert torch.isfinite(out).all()


# -- generation ---------------------------------------------------------------------------------------


def _run(gen, p, picture, mask):
    seen = {}
    orig = gen.decode
    gen.decode = lambda lat: (seen.setdefault("lat", lat), orig(lat))[1]
    try:
        results = gen(p, init_image=picture, mask=mask)
    finally:
        gen.decode = orig
    return results, seen["lat"]


@pytest.mark.parametrize("blur", [0, 4])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras", "Euler a"])
def test_whole_picture_keeps_the_outside(gen, picture, blur, sampler, monkeypatch):
    mask = _mask()
    p = GenParams("a cat", "ugly", **{**P, "sampler": sampler}, mask_blur=blur, batch=2)
    calls = []
    blend = inpaint.LatentBlend.__call__
    monkeypatch.setattr(inpaint.LatentBlend, "__call__", lambda s, *a: (calls.append(1), blend(s, *a))[1])
    results, lat = _run(gen, p, picture, mask)
    assert len(calls) == 4  # every step's prediction is blended (denoise 0.75 of 4 steps: 4 run)
    prepared = inpaint.prepare(picture, mask, p)
    keep = inpaint.latent_keep(prepared.mask, 8, 8).bool().expand_as(lat)
    init = gen.encode([picture] * 2)
    assert torch.equal(lat[keep], init[keep])  # latent space: the kept region is the init latents
    assert not torch.allclose(lat[~keep], init[~keep])
    blurred = np.asarray(inpaint.blur_mask(mask, blur, blur)) if blur else np.asarray(mask)
    for r in results:
        out, src = np.asarray(r.image), np.asarray(picture)
        assert np.array_equal(out[blurred == 0], src[blurred == 0])  # pixels: the original outside
        assert (np.abs(out.astype(int) - src)[np.asarray(mask) == 255].sum(-1) > 0).mean() > 0.9
    info = infotext.parse(results[0].infotext)[2]
    assert info.get("Mask blur") == (str(blur) if blur else None)
    assert "Inpaint area" not in info and "Masked content" not in info  # UI defaults: not written


def test_only_masked(gen):
    """A 96x80 picture, a small mask: the padded box is generated at 64x64 and pasted back; outside the
    box the picture is untouched, and the output keeps the picture's size."""
    rng = np.random.default_rng(2)
    pic = Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8))
    mask = _mask(80, 96, (30, 40, 46, 60))
    p = GenParams("a cat", **P, inpaint_area="Only masked", inpaint_padding=8, mask_blur=0)
    prepared = inpaint.prepare(pic, mask, p)
    # box (40, 30)-(60, 46), padded by 8 to (32, 22)-(68, 54): 36x32, grown to 1:1 by 2 above and below
    assert prepared.paste_to == (32, 20, 36, 36)
    (r,) = gen(p, init_image=pic, mask=mask)
    out, src = np.asarray(r.image), np.asarray(pic)
    assert r.image.size == (96, 80)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], src[outside])
    assert (np.abs(out.astype(int) - src)[~outside].sum(-1) > 0).mean() > 0.9
    info = infotext.parse(r.infotext)[2]
    assert info["Inpaint area"] == "Only masked" and info["Masked area padding"] == "8"


def test_only_masked_blank_mask_is_img2img(gen, picture):
    p = GenParams("a cat", **P, inpaint_area="Only masked")
    (r,) = gen(p, init_image=picture, mask=Image.new("L", (64, 64)))
    assert gen.notes and "blank" in gen.notes[0]
    (plain,) = gen(p, init_image=picture)
    assert np.array_equal(np.asarray(r.image), np.asarray(plain.image))
    assert "Inpaint area" not in r.infotext


def test_invert_and_masked_content_infotext_round_trip(gen, picture):
    p = GenParams(
        "a cat",
        **P,
        mask_invert=True,
        masked_content="latent nothing",
        inpaint_area="Only masked",
        inpaint_padding=12,
        mask_blur=2,
    )
    (r,) = gen(p, init_image=picture, mask=_mask())
    info = infotext.parse(r.infotext)[2]
    assert info["Mask mode"] == "Inpaint not masked" and info["Masked content"] == "latent nothing"
    back = GenParams.from_infotext(r.infotext)
    for k in ("mask_invert", "masked_content", "inpaint_area", "inpaint_padding", "mask_blur", "denoise"):
        assert getattr(back, k) == getattr(p, k), k
    # inverted: the masked box is now what is kept
    out, src = np.asarray(r.image), np.asarray(picture)
    assert np.array_equal(out[22:34, 22:42], src[22:34, 22:42])


def test_mask_needs_an_init_image(gen):
    with pytest.raises(BakaError, match="needs an init image"):
        gen(GenParams("a cat", **P), mask=_mask())


# -- 9-channel inpainting models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    from safetensors.torch import save_file

    from baka.models.config import tiny_config
    from baka.models.tiny import tiny_checkpoint

    cfg = tiny_config()
    cfg.unet["in_channels"] = 9
    path = tmp_path_factory.mktemp("inpaint") / "tiny-inpainting.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_checkpoint(3, cfg).items()}, path)
    return Generator(path, progress=False)


def _image_conds(g, p, **kw):
    seen = []
    orig = g.pipe.unet.forward

    def spy(x, t, **k):
        seen.append(x[:, 4:].clone())
        return orig(x, t, **k)

    g.pipe.unet.forward = spy
    try:
        results = g(p, **kw)
    finally:
        g.pipe.unet.forward = orig
    return results, seen


def test_inpainting_model_conditioning(inpaint_model, picture):
    g = inpaint_model
    assert g.inpainting_model
    mask = _mask(64, 64, (16, 8, 40, 32))
    p = GenParams("a cat AND a dog", "ugly", **P, mask_blur=0, batch=2)
    results, conds = _image_conds(g, p, init_image=picture, mask=mask)
    c = conds[0]
    assert c.shape == (2 * 3, 5, 8, 8)  # uncond + two AND prompts, each for the 2 images
    want_mask = torch.zeros(8, 8)
    want_mask[2:5, 1:4] = 1
    assert all(torch.equal(c[i, 0], want_mask) for i in range(6))
    m = np.asarray(mask)[..., None] > 0
    # the picture's masked part is blanked to grey (0 in -1..1) before encoding
    x = torch.from_numpy(np.asarray(picture, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = x * torch.from_numpy(~m[..., 0]).float()
    vae = g.pipe.vae
    want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(c[0, 1:], want[0], atol=1e-5)
    info = infotext.parse(results[0].infotext)[2]
    assert info["Conditional mask weight"] == "1"
    out = np.asarray(results[0].image)
    assert np.array_equal(out[~m[..., 0]], np.asarray(picture)[~m[..., 0]])


def test_inpainting_model_txt2img_and_weight(inpaint_model, picture):
    g = inpaint_model
    _, conds = _image_conds(g, GenParams("a cat", **{**P, "denoise": 1.0}))
    vae = g.pipe.vae
    grey = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean * vae.config.scaling_factor
    assert torch.equal(conds[0][:, 0], torch.ones(2, 8, 8))  # txt2img: all-ones mask, grey picture
    assert torch.allclose(conds[0][0, 1:], grey[0], atol=1e-5)
    # weight 0: the model is shown the whole picture, masked part included
    p = GenParams("a cat", **P, inpaint_weight=0.0, mask_blur=0)
    _, conds = _image_conds(g, p, init_image=picture, mask=_mask())
    full = g.encode([picture])
    assert torch.allclose(conds[0][0, 1:], full[0], atol=1e-5)


# -- CLI and API --------------------------------------------------------------------------------------


def test_cli_inpaint(tiny_files, tmp_path, run_cli, picture):
    pic, mask = tmp_path / "pic.png", tmp_path / "mask.png"
    picture.save(pic)
    _mask().save(mask)
    args = ("generate", tiny_files[0], "-p", "a cat", "--steps", "3", "-W", "64", "-H", "64")
    code, out, err = run_cli(*args, "--mask", mask, "-o", tmp_path / "o")
    assert code == 2 and "--mask needs --init-image" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(*args, "--init-image", pic, "--mask", tmp_path / "nope.png", "-o", tmp_path)
    assert code == 2 and "nope.png: no such file" in err
    code, out, err = run_cli(
        *args,
        "--init-image",
        pic,
        "--mask",
        mask,
        "--masked-content",
        "fill",
        "--inpaint-area",
        "Only masked",
        "--mask-blur",
        "3",
        "-o",
        tmp_path / "o",
    )
    assert code == 0, err
    (png,) = (tmp_path / "o").glob("*.png")
    info = infotext.parse(infotext.read_png(png))[2]
    assert info["Masked content"] == "fill" and info["Mask blur"] == "3"
    assert info["Inpaint area"] == "Only masked" and info["Masked area padding"] == "32"
    code, out, err = run_cli(
        *args, "--init-image", pic, "--mask", mask, "--masked-content", "latent", "-o", tmp_path / "e"
    )
    assert code == 2 and "unknown masked content" in err and "latent noise" in err
