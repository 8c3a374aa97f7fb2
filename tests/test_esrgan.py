"""ESRGAN-family upscaler files (#12's model upscaler for hires fix and Extras).

Parity table: tests/data/esrgan/ holds what spandrel 0.4.2 (the library A1111 1.10 loads these files
with) and A1111 1.10's upscale path (upscaler_utils' BGR tiles, images.split_grid / combine_grid,
Upscaler.upscale) made of the same small random files (tests/esrgan_files.py) and picture, run
locally; spandrel_reference.json has the raw network outputs. Five layouts: the original ESRGAN
sequence at x4 and (inside a state_dict) x2, BSRGAN's names, Real-ESRGAN's params_ema at x4 and its
pixel-unshuffled x2.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import b64_image, png_b64
from esrgan_files import layouts, picture, save
from PIL import Image

from baka.errors import BakaError, ModelFileError
from baka.generate.extras import Upscale, upscale
from baka.generate.model_upscale import model_upscaler, model_upscalers, tiled_upscale
from baka.generate.upscale import get_upscaler, upscale_by
from baka.models.esrgan import load_esrgan

DATA = Path(__file__).parent / "data" / "esrgan"
REF = json.loads((DATA / "spandrel_reference.json").read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("esrgan")
    return d, {layout: save(name, contents, d) for layout, (name, contents, _) in layouts().items()}


def _same(img, name: str) -> None:
    want = np.asarray(Image.open(DATA / name))
    got = np.asarray(img)
    assert got.shape == want.shape, name
    assert np.array_equal(got, want), f"{name}: {int((got != want).sum())} values differ"


@pytest.mark.parametrize("layout", list(REF))
def test_equal_to_spandrel_and_a1111(files, layout):
    _, paths = files
    ref = REF[layout]
    net = load_esrgan(paths[layout])
    assert net.scale == ref["scale"]
    pic = picture()
    x = torch.from_numpy(np.asarray(pic, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    raw = net(x)
    assert float(raw.double().sum()) == pytest.approx(ref["raw_sum"], rel=1e-6)
    assert raw[0, :, 0, 0].tolist() == pytest.approx(ref["raw_00"], abs=1e-6)
    _same(tiled_upscale(net, pic, tile=0), f"{layout}-pass.png")  # one piece
    _same(tiled_upscale(net, pic, tile=8, overlap=2), f"{layout}-tiled.png")  # 6 tiles, blended
    # A1111's Upscaler.upscale by 3: x4 once, x2 twice, then Lanczos to 56 x 40 (floored to 8)
    up = upscale_by(model_upscaler(layout, paths[layout], tile=8, overlap=2), pic, 3.0)
    assert up.size == tuple(ref["sizes"]["x3"]) == (56, 40)
    _same(up, f"{layout}-x3.png")


def test_a_picture_smaller_than_a_tile_is_one_padded_tile(files):
    _, paths = files
    net = load_esrgan(paths["esrgan-x4"])
    pic = picture()  # 20 x 14 < the default 192 tile: A1111 pads it with black on the left / top
    padded = Image.new("RGB", (192, 192))
    padded.paste(pic, (192 - 20, 192 - 14))
    want = tiled_upscale(net, padded, tile=0).crop(((192 - 20) * 4, (192 - 14) * 4, 192 * 4, 192 * 4))
    assert np.array_equal(np.asarray(tiled_upscale(net, pic)), np.asarray(want))


def test_names_and_bad_files(files, tmp_path):
    d, paths = files
    found = model_upscalers([d])
    assert set(found) == set(REF) and found["bsrgan-x4"] == Path(paths["bsrgan-x4"])
    assert get_upscaler("ESRGAN-X4", [d]).name == "esrgan-x4"  # names compare as the registries do
    assert get_upscaler("Lanczos", [d]).name == "Lanczos"
    with pytest.raises(BakaError, match=r"unknown hires upscaler 'esrgan-x3'; did you mean 'esrgan-x4'"):
        get_upscaler("esrgan-x3", [d])
    bad = tmp_path / "sd.pth"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, bad)
    with pytest.raises(ModelFileError, match=r"sd\.pth: not an ESRGAN \(RRDBNet\) file"):
        load_esrgan(bad)
    plus = {k.replace("conv5", "conv1x1"): v for k, v in layouts()["esrgan-x4"][1].items()}  # type: ignore[union-attr]
    torch.save(plus, tmp_path / "plus.pth")
    with pytest.raises(ModelFileError, match="plus.pth: an ESRGAN\\+ file"):
        load_esrgan(tmp_path / "plus.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.pth: not a loadable checkpoint"):
        load_esrgan(tmp_path / "empty.pth")


def test_extras_and_hires_use_model_files(files, tiny_files, run_cli, tmp_path):
    from baka.generate.engine import Generator, GenParams
    from baka.generate.infotext import parse

    d, _ = files
    pic = picture(24, 16)
    # Extras: x2 model twice covers 3x, then Lanczos to (72, 48) floored to 8 -> (72, 48)
    out = upscale(pic, Upscale("esrgan-x2", 3.0, upscaler_dirs=(d,)))
    want = upscale_by(model_upscaler("esrgan-x2", d / "esrgan-x2.pth"), pic, 3.0)
    assert out.size == (72, 48) and out.tobytes() == want.tobytes()
    pic.save(tmp_path / "p.png")
    code, text, _ = run_cli("upscale", tmp_path / "p.png", "--upscaler", "realesrgan-x4", "--upscaler-dir", d,
                            "-o", tmp_path / "up")  # fmt: skip
    assert code == 0 and Image.open(tmp_path / "up" / "p.png").size == (48, 32)
    code, _, err = run_cli("upscale", tmp_path / "p.png", "--upscaler", "realesrgan-x3", "--upscaler-dir", d)
    assert code != 0 and "did you mean 'realesrgan-x4'" in err and "Traceback" not in err
    # hires fix: the first pass decoded, upscaled by the model file, encoded, second pass
    gen = Generator(tiny_files[0], upscaler_dirs=[d], progress=False)
    p = GenParams(
        "a cat", steps=2, width=64, height=64, seed=1, hr_scale=2, hr_upscaler="esrgan-x4", denoise=0.5
    )
    res = gen(p)[0]
    assert res.image.size == (128, 128)
    assert parse(res.infotext)[2]["Hires upscaler"] == "esrgan-x4"
    lanczos = gen(p.replace(hr_upscaler="Lanczos"))[0]
    assert res.image.tobytes() != lanczos.image.tobytes()
    code, text, _ = run_cli("generate", tiny_files[0], "-p", "a cat", "--steps", "2", "-W", "64", "-H", "64",
                            "--hr-scale", "1.5", "--hr-upscaler", "bsrgan-x4", "--upscaler-dir", d,
                            "-o", tmp_path / "gen")  # fmt: skip
    assert code == 0 and Image.open(next((tmp_path / "gen").glob("*.png"))).size == (96, 96)


def test_server_lists_and_uses_model_files(files, tiny_files):
    from fastapi.testclient import TestClient

    from baka.serve.app import Settings, create_app
    from baka.serve.folders import ModelFolders

    d, paths = files
    folders = ModelFolders()
    folders.add("upscalers", d)
    folders.add("checkpoints", tiny_files[0].parent)
    client = TestClient(create_app(Settings(folders)))
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed[:3]] == ["None", "Lanczos", "Nearest"]
    assert {u["name"]: u["model_path"] for u in listed[3:]} == {
        k: str(Path(p).resolve()) for k, p in paths.items()
    }
    body = {"image": png_b64(picture()), "upscaler_1": "esrgan-x4", "upscaling_resize": 2}
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200
    got = b64_image(r.json()["image"])
    assert got.size == (40, 24)  # 20 x 14 by 2, floored to multiples of 8
    want = upscale_by(model_upscaler("esrgan-x4", paths["esrgan-x4"]), picture(), 2)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    # hires fix through the API with a model file's name
    body = {"prompt": "a cat", "steps": 2, "seed": 2, "width": 64, "height": 64, "enable_hr": True}
    body.update(hr_scale=1.5, hr_upscaler="realesrgan-x2", denoising_strength=0.4)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Hires upscaler: realesrgan-x2" in json.loads(r.json()["info"])["infotexts"][0]
    assert b64_image(r.json()["images"][0]).size == (96, 96)
    r = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "realesrgan-x5"})
    assert r.status_code == 400 and "did you mean 'realesrgan-x4'" in r.text
