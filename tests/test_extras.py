"""A1111's Extras upscale: sizes and pixels by its rules (scale by the factor or, scale to, by the
larger ratio; Upscaler.upscale floors both sides to multiples of 8; then the centre cut; a second
upscaler blended), through the Python API, the CLI and the API."""

import numpy as np
import pytest
from conftest import b64_image, png_b64
from PIL import Image

from baka.errors import BakaError
from baka.generate.extras import Upscale, upscale


def _picture(w=64, h=48):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# (input size, Upscale, output size): hand-computed from A1111 1.10's rules (Upscaler.upscale's
# target: int(side * scale // 8 * 8))
SIZES = [
    ((64, 48), Upscale("Lanczos", 2.0), (128, 96)),
    ((65, 33), Upscale("Lanczos", 1.5), (96, 48)),  # 97.5 // 8 * 8, 49.5 // 8 * 8
    ((64, 48), Upscale("Nearest", 4.0), (256, 192)),
    ((64, 48), Upscale("None", 4.0), (64, 48)),  # A1111's "None" leaves the picture as it is
    ((64, 48), Upscale("Lanczos", to=(100, 100)), (100, 100)),  # scale 100/48, cut to 100 x 100
    ((64, 48), Upscale("Lanczos", to=(100, 100), crop=False), (128, 96)),  # 133.3 // 8 * 8, 100 // 8 * 8
    ((64, 48), Upscale("Lanczos", to=(256, 96)), (256, 96)),  # the larger ratio: 4, then cut
]


@pytest.mark.parametrize(("size", "u", "want"), SIZES)
def test_sizes(size, u, want):
    assert upscale(_picture(*size), u).size == want


def test_pixels_are_pils_resampling_and_the_centre_cut():
    img = _picture()
    assert upscale(img, Upscale("Lanczos", 2.0)).tobytes() == img.resize((128, 96), Image.LANCZOS).tobytes()
    # off the grid of 8: A1111's pass to int(side * scale), then Lanczos to the floored target
    odd = _picture(65, 33)
    want = odd.resize((97, 49), Image.LANCZOS).resize((96, 48), Image.LANCZOS)
    assert upscale(odd, Upscale("Lanczos", 1.5)).tobytes() == want.tobytes()
    cut = upscale(img, Upscale("Nearest", to=(100, 100)))
    # Nearest to 133 x 100, Lanczos to 128 x 96, pasted at (50 - 64, 50 - 48) = (-14, 2) on black
    scaled = img.resize((133, 100), Image.NEAREST).resize((128, 96), Image.LANCZOS)
    assert cut.getpixel((0, 2)) == scaled.getpixel((14, 0))
    assert cut.getpixel((99, 97)) == scaled.getpixel((113, 95))
    assert cut.getpixel((50, 0)) == cut.getpixel((50, 99)) == (0, 0, 0)
    both = upscale(img, Upscale("Lanczos", 2.0, upscaler_2="Nearest", visibility_2=0.25))
    want = Image.blend(img.resize((128, 96), Image.LANCZOS), img.resize((128, 96), Image.NEAREST), 0.25)
    assert both.tobytes() == want.tobytes()


def test_bad_settings_are_one_clear_error():
    with pytest.raises(BakaError, match="works on latents"):
        Upscale("Latent (bicubic)")
    with pytest.raises(BakaError, match="unknown hires upscaler 'Lancsoz'; did you mean 'Lanczos'"):
        Upscale("Lancsoz")
    with pytest.raises(BakaError, match="Mpx"):
        upscale(_picture(2048, 2048), Upscale("Nearest", 8.0))


def test_cli_upscale_folder_skips_a_bad_file(tmp_path, run_cli):
    from PIL.PngImagePlugin import PngInfo

    src = tmp_path / "in"
    src.mkdir()
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Seed: 1")
    _picture().save(src / "a.png", pnginfo=info)
    (src / "b.png").write_bytes(b"not a picture")
    code, out, _ = run_cli("upscale", src, "--to", "96x96", "-o", tmp_path / "out")
    assert code == 0 and "warning: skipped" in out and "b.png" in out
    res = Image.open(tmp_path / "out" / "a.png")
    assert res.size == (96, 96) and res.info["parameters"] == "a cat\nSteps: 2, Seed: 1"
    code, _, err = run_cli("upscale", src / "b.png")
    assert code != 0 and "b.png: not a readable image" in err and "Traceback" not in err


def test_api_extra_single_image():
    from fastapi.testclient import TestClient

    from baka.serve.app import Settings, create_app
    from baka.serve.folders import ModelFolders

    client = TestClient(create_app(Settings(ModelFolders())))
    body = {"image": png_b64(_picture()), "upscaler_1": "Lanczos", "upscaling_resize": 2}
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200
    assert b64_image(r.json()["image"]).size == (128, 96)
    r = client.post("/sdapi/v1/extra-single-image", json={**body, "gfpgan_visibility": 0.5})
    assert r.status_code == 422 and "face restorers" in r.json()["detail"]
    r = client.post("/sdapi/v1/extra-single-image", json={**body, "upscaler_1": "Latent"})
    assert r.status_code == 400 and "works on latents" in r.json()["detail"]
