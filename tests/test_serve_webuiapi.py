"""``webuiapi`` (the A1111 client most scripts use, a dev dependency) drives ``baka serve`` over real
HTTP on loopback: connect with Basic auth, models and options, txt2img, png-info, img2img and
inpainting, refresh, interrupt, and the 422 / --lenient rule for fields baka does not build."""

import base64
import io
import threading
import time

import pytest
from PIL import Image

from baka.serve.app import Settings
from baka.serve.folders import ModelFolders

webuiapi = pytest.importorskip("webuiapi")  # pyproject's dev extra installs it: `make test` has it

SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def root(webui_root):
    return webui_root


def _settings(root, tmp_path, **kw) -> Settings:
    folders = ModelFolders()
    folders.add_root(root)
    return Settings(folders, api_auth=("ann:s3cret",), outputs=tmp_path / "outputs", **kw)


def _api(url: str, user: str | None = "ann", password: str | None = "s3cret"):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username=user, password=password)


def test_webuiapi_session(root, tmp_path, live_server):
    url = live_server(_settings(root, tmp_path))
    api = _api(url)
    assert api.get_scripts()["txt2img"] == ["dynamic thresholding (cfg scale fix)"]
    titles = api.util_get_model_names()
    assert [t.split(" [")[0] for t in titles] == ["alpha.safetensors", "beta.safetensors"]
    api.util_set_model("beta")  # closest title, sent back as "beta.safetensors [hash]" or the name
    assert api.util_get_current_model().startswith("beta.safetensors")
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert api.refresh_checkpoints() is None

    # txt2img with webuiapi's full default body (eta 1, s_noise 1, styles [], restore_faces false, ...)
    r = api.txt2img(prompt="a red circle", seed=7, batch_size=2, save_images=True, **SMALL)
    assert len(r.images) == 2 and r.images[0].size == (64, 64)
    assert r.info["all_seeds"] == [7, 8] and r.info["sampler_name"] == "Euler a"
    assert "Clip skip: 2" in r.info["infotexts"][0] and "Model: beta" in r.info["infotexts"][0]
    assert "ignored_fields" not in r.info
    saved = sorted((tmp_path / "outputs" / "txt2img-images").glob("*/*.png"))
    assert [p.name for p in saved] == ["00000-7.png", "00001-8.png"]  # A1111's NNNNN-SEED layout
    assert Image.open(saved[0]).info["parameters"] == r.info["infotexts"][0]

    # png-info reads the infotext back from the PNG webuiapi decoded
    info = api.png_info(r.images[0])
    assert info.info == r.info["infotexts"][0]
    assert info.parameters["Seed"] == "7" and info.parameters["Prompt"] == "a red circle"

    # img2img, then inpainting with a mask
    init = r.images[0]
    r2 = api.img2img(images=[init], prompt="a blue circle", denoising_strength=0.5, seed=3, **SMALL)
    assert r2.images[0].size == (64, 64) and "Denoising strength: 0.5" in r2.info["infotexts"][0]
    assert "init_images" not in r2.parameters  # A1111 echoes them only with include_init_images
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r3 = api.img2img(images=[init], mask_image=mask, inpaint_full_res=False, seed=3, **SMALL)
    assert "Mask blur: 4" in r3.info["infotexts"][0]
    out, before = r3.images[0].convert("RGB"), init.convert("RGB")
    assert out.getpixel((1, 1)) == before.getpixel((1, 1))  # outside the mask: the picture itself

    # the Extras upscale, as webuiapi sends it
    up = api.extra_single_image(image=init, upscaler_1="Lanczos", upscaling_resize=2)
    assert up.image.size == (128, 128)

    # send_images=False: the job runs, no pictures come back
    assert api.txt2img(prompt="x", send_images=False, **SMALL).images == []


def test_webuiapi_basic_auth_refused(root, tmp_path, live_server):
    url = live_server(_settings(root, tmp_path))
    for user, password in ((None, None), ("ann", "wrong"), ("bob", "s3cret")):
        api = _api(url, user, password)
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="x", **SMALL)
        assert e.value.args[0] == 401


def test_webuiapi_interrupt(root, tmp_path, live_server):
    url = live_server(_settings(root, tmp_path))
    api = _api(url)
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(r=api.txt2img(prompt="a cat", steps=150, width=64, height=64, n_iter=3))
    )
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and api.get_progress()["state"]["sampling_step"] < 2:
        time.sleep(0.05)
    prog = api.get_progress()
    api.interrupt()
    # mid-run: a third of a third at most (batch 1 of 3), seconds left, a latent-sized live preview
    assert 0 < prog["progress"] < 1 / 3 and prog["state"]["job_no"] == 0
    assert prog["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(prog["current_image"])))
    assert preview.size == (8, 8) and preview.mode == "RGB"
    t.join(60)
    r = out["r"]
    assert len(r.images) == 1  # the first batch as far as it got; the other two never ran
    assert "Steps: 150" in r.info["infotexts"][0]
    assert api.get_progress()["state"]["job_count"] == 0


def test_unbuilt_fields_are_422_unless_lenient(root, tmp_path, live_server):
    api = _api(live_server(_settings(root, tmp_path)))
    cases = {
        "restore_faces": {"restore_faces": True},
        "tiling": {"tiling": True},
        "styles": {"styles": ["my style"]},
        "subseed_strength": {"subseed_strength": 0.3},
        "s_churn": {"s_churn": 1.0},
        "eta": {"eta": 0.5},  # Euler a runs at eta 1
        "ADetailer": {"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face"}]}}},
    }
    for field, kw in cases.items():
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="x", **SMALL, **kw)
        status, text = e.value.args
        assert status == 422 and field in text and "--lenient" in text, (field, text)
    # the values that ask for nothing pass: eta on a sampler without eta, a disabled script
    r = api.txt2img(
        prompt="x",
        sampler_name="Euler",
        eta=0.3,
        alwayson_scripts={"ADetailer": {"args": [False]}},
        **SMALL,
    )
    assert len(r.images) == 1
    # a field A1111 does not have is named too
    with pytest.raises(RuntimeError) as e:
        api.custom_post("txt2img", {"prompt": "x", **SMALL, "restore_face": True}, baseurl=True)
    assert e.value.args[0] == 422 and "'restore_face': not an A1111 1.10 request field" in e.value.args[1]
    lenient = _api(live_server(_settings(root, tmp_path, lenient=True)))
    r = lenient.txt2img(prompt="x", restore_faces=True, styles=["s"], **SMALL)
    assert len(r.images) == 1 and sorted(r.info["ignored_fields"]) == ["restore_faces", "styles"]
