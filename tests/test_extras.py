"""A1111's Extras upscale: sizes and pixels by its rules (scale by: truncated; scale to: the larger
ratio, then the centre cut; a second upscaler blended), through the Python API, the CLI and the API."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from baka.errors import BakaError
from baka.generate.extras import Upscale, upscale


def _picture(w=64, h=48):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# (input size, Upscale, output size): hand-computed from A1111's rules
SIZES = [
    ((64, 48), Upscale("Lanczos", 2.0), (128, 96)),
    ((65, 33), Upscale("Lanczos", 1.5), (97, 49)),  # int(97.5), int(49.5)
    ((64, 48), Upscale("Nearest", 4.0), (256, 192)),
    ((64, 48), Upscale("None", 4.0), (64, 48)),  # A1111's "None" leaves the picture as it is
    ((64, 48), Upscale("Lanczos", to=(100, 100)), (100, 100)),  # scale 100/48, cut to 100 x 100
    ((64, 48), Upscale("Lanczos", to=(100, 100), crop=False), (133, 100)),  # int(64 * 100 / 48)
    ((64, 48), Upscale("Lanczos", to=(256, 96)), (256, 96)),  # the larger ratio: 4, then cut
]


@pytest.mark.parametrize(("size", "u", "want"), SIZES)
def test_sizes(size, u, want):
    assert upscale(_picture(*size), u).size == want


def test_pixels_are_pils_resampling_and_the_centre_cut():
    img = _picture()
    assert upscale(img, Upscale("Lanczos", 2.0)).tobytes() == img.resize((128, 96), Image.LANCZOS).tobytes()
    cut = upscale(img, Upscale("Nearest", to=(100, 100)))
    scaled = img.resize((133, 100), Image.NEAREST)  # pasted at x = 50 - 66 = -16
    assert cut.getpixel((0, 0)) == scaled.getpixel((16, 0))
    assert cut.getpixel((99, 99)) == scaled.getpixel((115, 99))
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
    buf = io.BytesIO()
    _picture().save(buf, format="PNG")
    body = {
        "image": base64.b64encode(buf.getvalue()).decode(),
        "upscaler_1": "Lanczos",
        "upscaling_resize": 2,
    }
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == (128, 96)
    r = client.post("/sdapi/v1/extra-single-image", json={**body, "gfpgan_visibility": 0.5})
    assert r.status_code == 422 and "face restorers" in r.json()["detail"]
    r = client.post("/sdapi/v1/extra-single-image", json={**body, "upscaler_1": "Latent"})
    assert r.status_code == 400 and "works on latents" in r.json()["detail"]
