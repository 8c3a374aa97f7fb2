import base64
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from conftest import job_result, png_b64
from fastapi.testclient import TestClient
from PIL import Image

from baka.errors import BakaError
from baka.models.safetensors_io import save_file
from baka.serve.app import Settings, create_app
from baka.serve.folders import ModelFolders


@pytest.fixture(scope="module")
def a1111_root(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    ck = root / "models" / "Stable-diffusion"
    ck.mkdir(parents=True)
    shutil.copy(tiny_files[0], ck / "alpha.safetensors")
    (ck / "sub").mkdir()
    shutil.copy(tiny_files[1], ck / "sub" / "beta.safetensors")
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, root / "embeddings" / "badhands.safetensors")
    (root / "secret.safetensors").write_bytes(b"not for clients")
    os.symlink(root / "secret.safetensors", ck / "escape.safetensors")
    return root


@pytest.fixture(scope="module")
def client(a1111_root):
    folders = ModelFolders()
    folders.add_root(a1111_root)
    return TestClient(create_app(Settings(folders)))


def test_folders_layouts_and_traversal(a1111_root, tmp_path):
    f = ModelFolders()
    f.add_root(a1111_root)
    # the escaping symlink is hidden
    assert f.list("checkpoints") == ["alpha.safetensors", "sub/beta.safetensors"]
    assert f.resolve("checkpoints", "sub/beta.safetensors").name == "beta.safetensors"
    assert f.resolve("checkpoints", "alpha [c101fe61d1]").name == "alpha.safetensors"  # A1111 title
    for bad in ("../secret.safetensors", "/etc/passwd", "sub/../../secret.safetensors", "escape.safetensors"):
        with pytest.raises(BakaError):
            f.resolve("checkpoints", bad)
    # ComfyUI layout and extra_model_paths.yaml
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    (comfy / "models" / "loras").mkdir()
    other = tmp_path / "shared"
    (other / "sd").mkdir(parents=True)
    (other / "sd" / "x.ckpt").write_bytes(b"")
    (tmp_path / "extra_model_paths.yaml").write_text(
        f"a111:\n  base_path: {other}\n  checkpoints: |\n    sd\n"
    )
    g = ModelFolders()
    g.add_root(comfy)
    g.add_extra_model_paths(tmp_path / "extra_model_paths.yaml")
    assert g.folders["loras"] == [(comfy / "models" / "loras").resolve()]
    assert g.list("checkpoints") == ["x.ckpt"]


def test_a1111_routes(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"].split(" [")[0] for m in models] == ["alpha.safetensors", "sub/beta.safetensors"]
    assert any(s["name"] == "DPM++ 2M Karras" for s in client.get("/sdapi/v1/samplers").json())
    assert client.get("/sdapi/v1/embeddings").json()["loaded"]["badhands"]["vectors"] == 2
    assert client.get("/sdapi/v1/loras").json() == []
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "alpha.safetensors"
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../secret.safetensors"})
    assert r.status_code == 400
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_txt2img_prompt_editing_and_a1111_padding_option(client):
    body = {"prompt": ", ".join(["a [cat:dog:2]"] * 40), "negative_prompt": "lowres", "steps": 3}
    body.update(seed=7, width=64, height=64, sampler_name="Euler")
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    assert "Pad conds" not in json.loads(plain["info"])["infotexts"][0]
    padded = client.post(
        "/sdapi/v1/txt2img", json={**body, "override_settings": {"pad_cond_uncond": True}}
    ).json()
    assert "Pad conds: True" in json.loads(padded["info"])["infotexts"][0]
    assert padded["images"][0] != plain["images"][0]  # long prompt, short negative: padding matters
    assert client.get("/sdapi/v1/options").json()["pad_cond_uncond"] is False


def test_txt2img_hires_fix(client):
    body = {"prompt": "a cat", "steps": 3, "seed": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    body.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic)", denoising_strength=0.4)
    r = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(r["info"])["infotexts"][0]
    assert "Hires upscale: 1.5" in info and "Hires upscaler: Latent (bicubic)" in info
    assert "Denoising strength: 0.4" in info
    img = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
    assert img.size == (96, 96)


def test_img2img(client):
    buf = io.BytesIO()
    Image.new("RGB", (80, 48), (200, 30, 30)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "a cat", "steps": 3, "seed": 1, "width": 64, "height": 64, "init_images": [b64]}
    r = client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 1, "denoising_strength": 0.4})
    assert r.status_code == 200, r.text
    im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert im.size == (64, 64) and "Denoising strength: 0.4" in im.info["parameters"]
    assert "init_images" not in r.json()["parameters"]
    assert client.post("/sdapi/v1/img2img", json={**body, "init_images": ["nope"]}).status_code == 400


def test_img2img_inpaint(client):
    """A mask makes img2img inpaint, with A1111's API defaults (Only masked, fill, padding 0, blur 4)."""

    pic = Image.new("RGB", (64, 64), (30, 30, 200))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 40, 40))
    body = {"prompt": "a cat", "steps": 3, "seed": 1, "width": 64, "height": 64}
    body.update(init_images=[png_b64(pic)], mask=png_b64(mask))
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    info = im.info["parameters"]
    defaults = ("Mask blur: 4", "Inpaint area: Only masked", "Masked area padding: 0", "Masked content: fill")
    assert all(field in info for field in defaults), info
    assert np.array_equal(np.asarray(im.convert("RGB"))[:4, :4], np.asarray(pic)[:4, :4])
    r = client.post(
        "/sdapi/v1/img2img",
        json={**body, "inpainting_fill": 1, "inpaint_full_res": False, "mask_blur": 0},
    )
    info = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).info["parameters"]
    assert "Inpaint area" not in info and "Masked content" not in info and "Mask blur" not in info
    r = client.post("/sdapi/v1/img2img", json={**body, "mask_blur_x": 2, "mask_blur_y": 3})
    assert r.status_code == 400 and "mask_blur_x" in r.text


def test_txt2img_and_png_info(client):
    body = {
        "prompt": "a (cat:1.2), badhands",
        "negative_prompt": "lowres",
        "steps": 3,
        "seed": 42,
        "width": 64,
        "height": 64,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "batch_size": 2,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert len(out["images"]) == 2 and info["all_seeds"] == [42, 43]
    im = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
    assert im.size == (64, 64) and "Sampler: DPM++ 2M, Schedule type: Karras" in im.info["parameters"]
    assert "Clip skip: 2" in info["infotexts"][0] and "TI hashes" in info["infotexts"][0]
    pi = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + out["images"][1]}).json()
    assert pi["parameters"]["Seed"] == "43" and pi["parameters"]["Prompt"] == body["prompt"]
    bad = client.post(
        "/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "/etc/passwd"}}
    )
    assert bad.status_code == 400


def test_error_mapping_by_type(client):
    from baka.errors import ModelFileError, NotFound
    from baka.serve.jobs import QueueFull
    from baka.serve.state import status_for

    assert [status_for(e) for e in (NotFound("x"), BakaError("x"), ModelFileError("f", "x"))] == [
        404,
        400,
        400,
    ]
    assert status_for(QueueFull("x")) == 503 and status_for(ValueError("x")) == 500
    # a missing model is a 404 with one message, wherever it is looked up (a route or a queued job)
    missing = "checkpoints 'nope.safetensors' not found in the configured model folders"
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert (r.status_code, r.json()) == (404, {"detail": missing})
    small = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    r = client.post("/sdapi/v1/txt2img", json={**small, "override_settings": {"sd_model_checkpoint": "nope"}})
    assert (r.status_code, r.json()) == (404, {"detail": missing.replace(".safetensors", "")})
    r = client.post("/baka/v1/preview", json={"model_a": "alpha", "model_b": "nope.safetensors"})
    assert (r.status_code, r.json()) == (404, {"detail": missing})
    assert client.get("/baka/v1/jobs/merge-999").json() == {"detail": "no such job"}
    # a bad parameter is a 400, also when the queued job finds it
    r = client.post(
        "/baka/v1/merge", json={"model_a": "alpha", "model_b": "alpha", "output_name": "m", "method": "nah"}
    )
    assert r.status_code == 400 and r.json()["detail"].startswith("unknown merge method 'nah'")
    r = client.post("/sdapi/v1/txt2img", json={**small, "width": 68})
    assert (r.status_code, r.json()) == (
        400,
        {"detail": "size 68x64: width and height must be multiples of 8"},
    )
    r = client.post("/sdapi/v1/png-info", json={"image": "bm90IGEgcG5n"})
    assert r.status_code == 400 and r.json()["detail"].startswith("not an image: ")


def test_token_auth(a1111_root):
    folders = ModelFolders()
    folders.add_root(a1111_root)
    c = TestClient(create_app(Settings(folders, token="s3cret")))
    assert c.get("/sdapi/v1/sd-models").status_code == 401
    assert c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # every path needs it, the page and the API docs too; a browser may give it as ?token= on a GET
    for path in ("/", "/docs", "/redoc", "/openapi.json", "/baka/v1/presets"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    assert c.get("/?token=s3cret").status_code == 200 and c.get("/?token=nope").status_code == 401
    assert c.post("/sdapi/v1/png-info?token=s3cret", json={"image": ""}).status_code == 401  # GET only


def test_bounded_queue(a1111_root):
    folders = ModelFolders()
    folders.add_root(a1111_root)
    app = create_app(Settings(folders, queue_size=1))
    q = app.state.baka.queue
    gate = threading.Event()
    q.submit("block", lambda job: gate.wait(10))  # occupies the worker
    deadline = time.time() + 5
    while q.current is None and time.time() < deadline:
        time.sleep(0.01)
    q.submit("wait", lambda job: None)  # fills the one queue slot
    r = TestClient(app).post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 503 and "queue is full" in r.json()["detail"]
    gate.set()


def test_merge_job_and_preview(client, a1111_root):
    r = client.post(
        "/baka/v1/merge",
        json={
            "model_a": "alpha.safetensors",
            "model_b": "sub/beta.safetensors",
            "alpha": "GRAD_V",
            "output_name": "mixed",
        },
    )
    job_result(client, r)
    out = a1111_root / "models" / "Stable-diffusion" / "mixed.safetensors"
    assert out.exists() and "mixed.safetensors" in [
        m["title"] for m in client.get("/sdapi/v1/sd-models").json()
    ]
    assert (
        client.post(
            "/baka/v1/merge", json={"model_a": "alpha", "model_b": "alpha", "output_name": "mixed"}
        ).status_code
        == 409
    )
    assert (
        client.post(
            "/baka/v1/merge", json={"model_a": "alpha", "model_b": "alpha", "output_name": "../x"}
        ).status_code
        == 400
    )
    p = {
        "model_a": "alpha.safetensors",
        "model_b": "sub/beta.safetensors",
        "steps": 2,
        "width": 64,
        "height": 64,
    }
    first = client.post("/baka/v1/preview", json={**p, "weights": "ALL_A"}).json()
    assert first["changed_blocks"] == []  # the live model is A: nothing to re-merge
    second = client.post("/baka/v1/preview", json={**p, "weights": "ALL_A;OUT05=1"}).json()
    assert second["changed_blocks"] == ["OUT05"] and second["image"] != first["image"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("CI"):
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
    if path is None:
        pytest.skip("chromium not installed here (apt-get install chromium); CI always runs this test")
    return path


CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=8000",
]


def test_web_ui_in_headless_chromium(a1111_root, tmp_path):
    import uvicorn

    chromium = _chromium()
    folders = ModelFolders()
    folders.add_root(a1111_root)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Settings(folders, token="t0k")), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/?tab=merge&token=t0k"
        base = [chromium, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        import re

        sliders = re.findall(r'<input type="range"[^>]* id="w-(BASE|IN\d\d|M00|OUT\d\d)"', dom)
        assert len(sliders) == 26 and sliders[0] == "BASE" and sliders[-1] == "OUT11"  # the 26 block sliders
        assert ">GRAD_V<" in dom and ">alpha.safetensors<" in dom  # presets and models came from the API
        assert 'class="tab active" id="merge"' in dom or 'id="merge" class="tab active"' in dom
        shot = tmp_path / "merge.png"
        subprocess.run(
            [*base, "--window-size=1400,900", f"--screenshot={shot}", url], capture_output=True, timeout=120
        )
        img = Image.open(shot).convert("RGB")
        assert img.size == (1400, 900)
        colors = img.getcolors(1_000_000)
        assert colors is not None and len(colors) > 50  # a rendered page, not a blank one
        assert img.getpixel((10, 10)) == (0x2B, 0x2D, 0x42)  # the header bar
    finally:
        server.should_exit = True
        th.join(10)


def _png_claiming(width: int, height: int) -> str:
    """A PNG whose header claims ``width`` x ``height`` (a decompression-bomb header, tiny file)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def test_bad_requests_are_4xx_never_500(client):
    cases = [
        ("post", "/sdapi/v1/options", {"sd_model_checkpoint": "a\x00b.safetensors"}),
        ("post", "/sdapi/v1/options", {"sd_model_checkpoint": 12}),
        ("post", "/sdapi/v1/options", {"sd_model_checkpoint": None}),
        ("post", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": "abc"}),
        ("post", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1000}),
        ("post", "/sdapi/v1/txt2img", {"prompt": "x", "seed": 2**70}),
        (
            "post",
            "/sdapi/v1/txt2img",
            {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": "abc"}},
        ),
        ("post", "/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": 5}}),
        ("post", "/sdapi/v1/txt2img", {"prompt": "x" * 20_001, "steps": 1, "width": 64, "height": 64}),
        ("post", "/sdapi/v1/png-info", {"image": "data:image/png;base64"}),
        ("post", "/sdapi/v1/png-info", {"image": _png_claiming(100_000, 100_000)}),
        ("post", "/baka/v1/merge", {"model_a": "alpha", "model_b": "alpha", "output_name": "x" * 300}),
        ("post", "/baka/v1/merge", {"model_a": "alpha", "model_b": "alpha", "output_name": "a\x00b"}),
        ("post", "/baka/v1/merge", {"model_a": "a\x00", "model_b": "alpha", "output_name": "ok"}),
    ]
    for method, path, body in cases:
        r = getattr(client, method)(path, json=body)
        assert 400 <= r.status_code < 500, (
            path,
            body if len(str(body)) < 200 else "long",
            r.status_code,
            r.text,
        )
        assert isinstance(r.json()["detail"], str | list)
    # a txt2img with clip skip past the encoder's layers is refused by the generator, as a 400
    r = client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "x",
            "steps": 1,
            "width": 64,
            "height": 64,
            "override_settings": {"CLIP_stop_at_last_layers": 40},
        },
    )
    assert r.status_code == 400 and "clip skip 40" in r.json()["detail"]
    # nothing above changed the options
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "alpha.safetensors"


def test_request_body_limit(a1111_root):
    folders = ModelFolders()
    folders.add_root(a1111_root)
    c = TestClient(create_app(Settings(folders, max_body=10_000)))
    r = c.post("/sdapi/v1/png-info", json={"image": "A" * 20_000})
    assert r.status_code == 413 and "10000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 2_000

    r = c.post("/sdapi/v1/png-info", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert c.post("/sdapi/v1/png-info", json={"image": "bm90IGEgcG5n"}).status_code == 400  # small: passes


def test_sd_models_carry_hashes_once_hashed(client, a1111_root):
    from baka.models.hashes import sha256_file

    client.get("/sdapi/v1/sd-models")
    client.app.state.baka.hashes.join()
    m = client.get("/sdapi/v1/sd-models").json()[0]
    want = sha256_file(a1111_root / "models" / "Stable-diffusion" / "alpha.safetensors")
    assert m["sha256"] == want and m["hash"] == want[:10] and m["title"] == f"alpha.safetensors [{want[:10]}]"
    # a title with its hash is accepted back as the checkpoint name, as A1111 clients send it
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": m["title"]})
    assert r.status_code == 200
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha.safetensors"})


def test_connect_routes(client):
    scheds = client.get("/sdapi/v1/schedulers").json()
    labels = [s["label"] for s in scheds]
    # A1111 1.10's twelve, in its order
    assert labels == [
        *("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal"),
        *("Align Your Steps", "Simple", "Normal", "DDIM", "Beta"),
    ]
    assert {s["name"]: s["default_rho"] for s in scheds}["karras"] == 7.0
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes and "Lanczos" not in modes
    for path in ("sd-modules", "hypernetworks", "prompt-styles", "face-restorers"):
        assert client.get(f"/sdapi/v1/{path}").json() == [], path
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/cmd-flags").json()["api"] is True
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-embeddings", "refresh-vae"):
        assert client.post(f"/sdapi/v1/{path}").status_code == 200, path
    mem = client.get("/sdapi/v1/memory").json()
    assert mem["ram"]["total"] > mem["ram"]["free"] > 0 and "cuda" in mem


def test_basic_auth_as_a1111(a1111_root):
    folders = ModelFolders()
    folders.add_root(a1111_root)
    c = TestClient(create_app(Settings(folders, api_auth=("ann:pw1", "bob:pw:2"))))
    r = c.get("/sdapi/v1/sd-models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert c.get("/sdapi/v1/sd-models", auth=("ann", "pw1")).status_code == 200
    assert c.get("/sdapi/v1/sd-models", auth=("bob", "pw:2")).status_code == 200  # ':' in a password
    assert c.get("/sdapi/v1/sd-models", auth=("ann", "pw2")).status_code == 401
    for path in ("/", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 401 and c.get(path, auth=("ann", "pw1")).status_code == 200


def test_api_auth_flag_parsing():
    from baka.serve.cli import _credentials

    assert _credentials("a:b, c:d:e") == ("a:b", "c:d:e")
    with pytest.raises(BakaError, match="user:pass"):
        _credentials("nopass")


def test_interrupt_stops_within_a_step(client):
    body = {"prompt": "a cat", "steps": 150, "width": 64, "height": 64, "seed": 3, "n_iter": 3}
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=client.post("/sdapi/v1/txt2img", json=body)))
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = client.get("/sdapi/v1/progress").json()["state"]
        if st["sampling_step"] >= 2:
            break
        time.sleep(0.05)
    client.post("/sdapi/v1/interrupt")
    t.join(60)
    r = out["r"]
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 1  # the first batch, as far as it got; no further batches
    assert info["all_seeds"] == [3]
    job = client.app.state.baka.queue
    last = list(job.jobs.values())[-1]
    assert last.interrupted and last.step < 150


# A1111 1.10's own defaults for the request fields baka does not build (StableDiffusionProcessing,
# its txt2img / img2img subclasses and the API models): a body carrying them asks for nothing.
A1111_DEFAULTS = {
    "styles": None,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "s_min_uncond": None,
    "s_churn": None,
    "s_tmax": None,
    "s_tmin": None,
    "s_noise": None,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "comments": None,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_checkpoint_name": None,
    "script_name": None,
    "script_args": [],
    "force_task_id": None,
    "infotext": None,
    "image_cfg_scale": None,
    "mask_round": True,
    "initial_noise_multiplier": None,
    "latent_mask": None,
}


def test_a1111_defaults_ask_for_nothing_and_every_unbuilt_field_is_listed():
    from baka.serve.fields import UNBUILT, check

    assert check(A1111_DEFAULTS, A1111_DEFAULTS, lenient=False) == []
    assert sorted(UNBUILT.names()) == sorted(A1111_DEFAULTS)  # the table is A1111's field list


@pytest.mark.parametrize(
    ("extra", "body", "refused"),
    [
        ({"eta": 1.0}, {"sampler_name": "DDIM"}, ["eta"]),  # DDIM runs at eta 0 here
        ({"eta": 0.0}, {"sampler_name": "DDIM"}, []),
        ({"eta": 1.0}, {"sampler_name": "DPM++ 2M SDE Karras"}, []),
        ({"eta": 0.5}, {"sampler_name": "DPM++ 2M Karras"}, []),  # no eta: any value is moot
        ({"eta": 0.5}, {"sampler_name": None, "sampler_index": "Euler a"}, ["eta"]),
        ({"s_tmin": 3.0, "s_tmax": 9.0}, {"s_churn": 0}, []),  # bounds of a churn that is off
        ({"s_tmin": 3.0}, {"s_churn": 0.5}, ["s_tmin"]),
        ({"subseed": 1234}, {"subseed_strength": 0}, []),
        ({"subseed": 1234}, {"subseed_strength": 0.1}, ["subseed"]),
        ({"script_args": [1, 2]}, {"script_name": ""}, []),
        ({"hr_checkpoint_name": "Use same checkpoint"}, {}, []),
        ({"hr_checkpoint_name": "other.safetensors"}, {}, ["hr_checkpoint_name"]),
        ({"s_noise": True}, {}, ["s_noise"]),  # a bool is not A1111's number
        ({"mask_round": False}, {}, ["mask_round"]),
        ({"restore_faces": False, "tiling": 0, "styles": []}, {}, []),
        ({"seed_resize_from_h": 768}, {}, ["seed_resize_from_h"]),
        ({"seed_resize_from_w": "big"}, {}, ["seed_resize_from_w"]),  # not a number: refused, not a 500
        ({"sampler": "Euler"}, {}, ["sampler"]),  # not an A1111 field at all
        ({}, {"alwayson_scripts": {"Dynamic Thresholding (CFG Scale Fix)": {"args": [True, 7]}}}, []),
        (
            {},
            {"alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}},
            ["alwayson_scripts.controlnet"],
        ),
        ({}, {"alwayson_scripts": {"controlnet": {"args": []}}}, []),
    ],
)
def test_unbuilt_field_rules(extra, body, refused):
    from baka.serve.fields import Unsupported, check

    full = {**body, **extra}
    assert check(full, extra, lenient=True) == refused
    if refused:
        with pytest.raises(Unsupported, match=refused[0].split(".")[-1]):
            check(full, extra, lenient=False)


def test_outputs_number_on_from_the_folder_and_never_overwrite(tmp_path):
    from baka.generate.engine import Result
    from baka.serve.outputs import Outputs

    out = Outputs(tmp_path)
    day = out.folder("txt2img")
    day.mkdir(parents=True)
    (day / "00041-99.png").write_bytes(b"old")
    (day / "notes.txt").write_text("not numbered")
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    saved = out.save("txt2img", [Result(img, s, f"x\nSeed: {s}") for s in (5, 6)])
    assert [p.name for p in saved] == ["00042-5.png", "00043-6.png"]
    assert (day / "00041-99.png").read_bytes() == b"old"
    assert Image.open(saved[1]).info["parameters"] == "x\nSeed: 6"
    assert set(out.history()) == {day / "00041-99.png", *saved}
    assert not list(day.glob("*.part"))


def test_progress_reports_the_model_load(client):
    st = client.app.state.baka
    gate, real = threading.Event(), st.generator_for

    def slow_load(*a):
        gate.wait(30)  # the model "loads" until the test has looked at /progress
        return real(*a)

    st.generator_for = slow_load
    try:
        body = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
        t = threading.Thread(target=lambda: client.post("/sdapi/v1/txt2img", json=body))
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and st.queue.current is None:
            time.sleep(0.01)
        prog = client.get("/sdapi/v1/progress").json()
        assert prog["textinfo"] == "Loading alpha.safetensors" and prog["state"]["job_count"] == 1
        assert prog["progress"] == 0 and prog["current_image"] is None
    finally:
        gate.set()
        t.join(60)
        st.generator_for = real
    assert client.get("/sdapi/v1/progress").json()["textinfo"] is None


def test_one_worker_per_device_runs_jobs_side_by_side(a1111_root):
    folders = ModelFolders()
    folders.add_root(a1111_root)
    client = TestClient(create_app(Settings(folders, devices=("cpu", "cpu"), queue_size=4)))
    st = client.app.state.baka
    assert st.queue.devices == ("cpu", "cpu")
    both, real = threading.Barrier(2, timeout=30), st.generator_for
    seen = []

    def load(*a):
        seen.append(len(st.queue.running_jobs()))
        both.wait()  # passes only when the two jobs are running at once
        return real(*a)

    st.generator_for = load
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    out: list = []
    threads = [
        threading.Thread(target=lambda: out.append(client.post("/sdapi/v1/txt2img", json=body))) for _ in "ab"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in out] == [200, 200]
    assert len(st.generators) == 2  # each worker its own loaded model: no two jobs share one
    workers = {j.worker for j in st.queue.jobs.values()}
    assert workers == {0, 1}


def test_default_devices():
    from baka.serve.state import default_devices

    folders = ModelFolders()
    want = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count())) or ("cpu",)
    assert default_devices(Settings(folders)) == want
    assert default_devices(Settings(folders, devices=("cuda:1",))) == ("cuda:1",)


def test_models_load_in_two_threads_at_once(tiny_files):
    """Two workers loading at once: accelerate's meta patch is process-wide, baka serialises it
    (without that, both loads end with parameters left on the meta device)."""
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_pipeline

    metas: list = []

    def load(path):
        pipe = build_pipeline(load_checkpoint(path), torch.float32)
        mods = (pipe.unet, pipe.vae, pipe.text_encoder)
        metas.append([n for m in mods for n, p in [*m.named_parameters(), *m.named_buffers()] if p.is_meta])

    for _ in range(3):
        threads = [threading.Thread(target=load, args=(p,)) for p in tiny_files[:2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert metas == [[]] * 6


def test_history_outputs_freeu_xy_and_preview_release(a1111_root, tmp_path):
    folders = ModelFolders()
    folders.add_root(a1111_root)
    client = TestClient(create_app(Settings(folders, outputs=tmp_path / "out")))
    st = client.app.state.baka
    small = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 11}
    r = client.post("/sdapi/v1/txt2img", json={**small, "save_images": True, "freeu": "sd1"}).json()
    info = json.loads(r["info"])["infotexts"][0]
    assert 'FreeU: "1.3,1.4,0.9,0.2,1,0,1,0"' in info
    hist = client.get("/baka/v1/history").json()
    assert [h["file"].split("/")[-1] for h in hist] == ["00000-11.png"] and hist[0]["kind"] == "txt2img"
    assert hist[0]["infotext"] == info
    png = client.get(hist[0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    for bad in ("../secret.safetensors", "txt2img-images/nope.png", "%2e%2e/%2e%2e/etc/passwd"):
        assert client.get(f"/baka/v1/outputs/{bad}").status_code == 404
    r = client.post("/sdapi/v1/txt2img", json={**small, "freeu": "sd9"})
    assert r.status_code == 400 and "FreeU preset" in r.json()["detail"]
    assert client.get("/baka/v1/freeu-presets").json()["sd1"] == [1.3, 1.4, 0.9, 0.2, 1]

    grid = client.post("/baka/v1/xy", json={**small, "x": "cfg=5,7", "y": "steps=1,2"}).json()
    assert grid["size"] == [8 + 7 * len("steps: 1") + 128, 24 + 128] and len(grid["infotexts"]) == 4
    assert "CFG scale: 7" in grid["infotexts"][1] and "Steps: 2" in grid["infotexts"][3]
    bad = client.post("/baka/v1/xy", json={**small, "x": "colour=1,2"})
    assert bad.status_code == 400 and "unknown grid axis" in bad.json()["detail"]
    assert st.generators and st.preview is None

    pv = {
        "model_a": "alpha.safetensors",
        "model_b": "sub/beta.safetensors",
        "steps": 2,
        "width": 64,
        "height": 64,
    }
    r = client.post("/baka/v1/preview", json={**pv, "weights": "0.5"}).json()
    assert "Model: alpha + beta (weight_sum)" in r["info"] and "Model hash" not in r["info"]
    assert 'Merge weights: "' + ",".join(["0.5"] * 26) + '"' in r["info"]
    assert st.preview is not None and 0 not in st.generators  # the worker's model went for the preview
    blocks = client.post(
        "/baka/v1/xy",
        json={
            **small,
            "x": "blocks=ALL_A,ALL_B",
            "model": "alpha.safetensors",
            "merge_with": "sub/beta.safetensors",
        },
    ).json()
    assert len(blocks["infotexts"]) == 2
    assert "Model: alpha + beta (weight_sum)" in blocks["infotexts"][1]
    # merge axes: one block's weight, B by name (never a raw path), a Z axis of stacked grids
    xyz = {**small, "model": "alpha.safetensors", "merge_with": "sub/beta.safetensors", "x": "OUT11=0,1"}
    r = client.post("/baka/v1/xy", json={**xyz, "z": "model_b=sub/beta.safetensors|alpha.safetensors"})
    assert r.status_code == 200 and len(r.json()["infotexts"]) == 4
    assert "Model: alpha + alpha (weight_sum)" in r.json()["infotexts"][3]
    bad = client.post("/baka/v1/xy", json={**xyz, "z": "model_b=../../etc/passwd"})
    assert bad.status_code in (400, 404) and "passwd" in bad.json()["detail"]
    # the method / beta / model_c axes, C by name too
    r = client.post(
        "/baka/v1/xy",
        json={**xyz, "merge_c": "alpha.safetensors", "merge_beta": "0.5", "x": "method=sum_twice|triple_sum",
              "y": "model_c=alpha.safetensors|sub/beta.safetensors"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    infos = r.json()["infotexts"]
    assert "Model: alpha + beta + alpha (sum_twice)" in infos[0] and "(triple_sum)" in infos[1]
    assert "Model: alpha + beta + beta (sum_twice)" in infos[2] and "Merge beta:" in infos[0]
    r = client.post("/baka/v1/xy", json={**xyz, "merge_elemental": "OUT11::1", "x": "elemental=none|IN05::1"})
    assert r.status_code == 200 and 'Merge elemental: "IN05::1"' in r.json()["infotexts"][1]
    assert 'Merge elemental: "OUT11::1"' not in r.json()["infotexts"][0]  # 'none' drops the base rules
    for extra in ({"z": "model_c=/etc/passwd"}, {"merge_method": "nah"}, {"merge_elemental": "IN05:x"}):
        assert client.post("/baka/v1/xy", json={**xyz, **extra}).status_code in (400, 404), extra
    nob = {k: v for k, v in xyz.items() if k != "merge_with"}
    assert client.post("/baka/v1/xy", json={**nob, "merge_c": "alpha"}).status_code == 400
    client.post("/sdapi/v1/txt2img", json=small)
    assert st.preview is None  # back to generating: the preview pair is not kept beside it


def test_web_ui_end_to_end_in_headless_chromium(a1111_root, tmp_path, live_server):
    """Chromium drives the page as a person would: generate (the picture, its infotext and a saved
    copy), an error shown as text, interrupt mid-run, the history gallery, a merge preview."""
    from cdp import Browser

    chromium = _chromium()
    folders = ModelFolders()
    folders.add_root(a1111_root)
    url = live_server(Settings(folders, token="t0k", outputs=tmp_path / "out"))
    flags = [f for f in CHROME_FLAGS if not f.startswith("--virtual-time")]
    b = Browser(chromium, flags, str(tmp_path / "profile"))
    try:
        b.open(f"{url}/?token=t0k")
        b.wait(
            "document.getElementById('g-sampler').options.length > 0"
            " && document.getElementById('m-method').options.length > 0"
        )
        models = b.js("[...document.getElementById('g-model').options].map(o => o.value)")
        # the folder's checkpoints (an earlier test in this module may have merged another into it)
        assert models[0] == "alpha.safetensors" and "sub/beta.safetensors" in models
        set_fields = """(() => { const s = (id, v) => document.getElementById(id).value = v;
          s('g-prompt', 'a red circle'); s('g-steps', 2); s('g-w', 64); s('g-h', 64); s('g-seed', 5);
          s('g-sampler', 'Euler'); s('g-freeu', 'sd1'); return true; })()"""
        b.js(set_fields)
        b.js("document.getElementById('g-lora-add').click(); document.getElementById('g-go').click()")
        info = b.wait("document.getElementById('g-info').textContent")
        assert "Steps: 2" in info and "Seed: 5" in info and "FreeU:" in info and "Size: 64x64" in info
        assert b.js("document.getElementById('g-img').naturalWidth") == 64
        b.screenshot(tmp_path / "generate.png")
        shot = Image.open(tmp_path / "generate.png").convert("RGB")
        assert shot.size == (1400, 1000) and shot.getpixel((10, 10)) == (0x2B, 0x2D, 0x42)
        assert len(list((tmp_path / "out" / "txt2img-images").glob("*/00000-5.png"))) == 1

        # send to img2img, paint a mask over its centre, inpaint
        b.js("document.getElementById('g-send').click()")
        b.wait("document.getElementById('g-mask').width === 64")
        b.js(
            "(() => { const c = document.getElementById('g-mask'), r = c.getBoundingClientRect();"
            " const at = (t, f) => c.dispatchEvent(new MouseEvent(t, {bubbles: true,"
            " clientX: r.left + r.width * f, clientY: r.top + r.height * f}));"
            " at('mousedown', 0.4); at('mousemove', 0.5); at('mousemove', 0.6);"
            " window.dispatchEvent(new MouseEvent('mouseup'));"
            " document.getElementById('g-info').textContent = '';"
            " document.getElementById('g-go').click(); })()"
        )
        info = b.wait("document.getElementById('g-info').textContent")
        assert "Denoising strength: 0.75" in info and "Mask blur: 4" in info  # the painted mask went
        assert len(list((tmp_path / "out" / "img2img-images").glob("*/00000-5.png"))) == 1
        b.js("document.getElementById('g-i2i').checked = false")

        # a bad size: the server's message as text, not [object Object]
        b.js("document.getElementById('g-w').value = 68; document.getElementById('g-go').click()")
        err = b.wait("document.getElementById('g-error').textContent")
        assert "object Object" not in err and "68" in err

        # interrupt: 150 steps, three batches; stopped after a few steps, one picture back
        b.js(
            "document.getElementById('g-w').value = 64; document.getElementById('g-steps').value = 150;"
            "document.getElementById('g-niter').value = 3;"
            "document.getElementById('g-info').textContent = '';"
            "document.getElementById('g-go').click()"
        )
        b.wait("document.getElementById('g-progress').value > 0.01")
        b.js("document.getElementById('g-stop').click()")
        info = b.wait("document.getElementById('g-info').textContent")
        assert "Steps: 150" in info
        assert b.js("document.getElementById('g-live').naturalWidth") == 8  # the latent-sized live preview

        # the history gallery: the three saved pictures, newest first, after a reload too
        # a marker on the old page: the wait below cannot be answered by it while the reload is under way
        b.js("window.beforeReload = true; location.reload()")
        b.wait(
            "!window.beforeReload && document.getElementById('g-sampler').options.length > 0"
            " && document.querySelector('header button[data-tab=history]') !== null"
        )
        b.js("document.querySelector('header button[data-tab=history]').click()")
        files = b.wait(
            "(() => { const g = [...document.querySelectorAll('#gallery img')];"
            " return g.length >= 3 && g.map(i => i.dataset.file); })()"
        )
        assert (
            len(files) == 3 and files[-1].startswith("txt2img-images/") and files[-1].endswith("/00000-5.png")
        )
        assert any(f.startswith("img2img-images/") for f in files)
        b.screenshot(tmp_path / "history.png")
        assert len(Image.open(tmp_path / "history.png").convert("RGB").getcolors(1 << 20) or []) > 50

        # a merge preview through the runtime merge: its infotext names the merge
        b.js(
            "document.querySelector('header button[data-tab=merge]').click();"
            "const s = (id, v) => document.getElementById(id).value = v;"
            "s('m-b', 'sub/beta.safetensors'); s('m-w', 64); s('m-h', 64);"
            "s('m-steps', 2); s('m-preset', 'GRAD_V');"
            "document.getElementById('m-preset').dispatchEvent(new Event('change'));"
            "document.getElementById('m-preview').click()"
        )
        minfo = b.wait("document.getElementById('m-info').textContent")
        assert "Model: alpha + beta (weight_sum)" in minfo
        assert b.js("document.getElementById('m-img').naturalWidth") == 64
        b.screenshot(tmp_path / "merge.png")
        img = Image.open(tmp_path / "merge.png").convert("RGB")
        # the preview stays in view: its panel's picture is inside the window
        top = b.js("document.getElementById('m-img').getBoundingClientRect().top")
        assert 0 <= top < 1000 and img.getpixel((10, 10)) == (0x2B, 0x2D, 0x42)

        # the tools tab: a LoRA of B - A extracted as a job, its report shown, the LoRA listed at once
        b.js(
            "{ document.querySelector('header button[data-tab=tools]').click();"
            "const s = (id, v) => document.getElementById(id).value = v;"
            "s('t-ex-b', 'sub/beta.safetensors'); s('t-ex-dim', 4); s('t-ex-name', 'ui-lora');"
            "document.getElementById('t-ex-go').click() }"
        )
        res = b.wait("document.getElementById('t-result').textContent")
        assert res.startswith("wrote ui-lora.safetensors: ") and "error per block" in res, res
        b.wait("[...document.getElementById('g-lora').options].some(o => o.value === 'ui-lora')")
        # a bake with no LoRA: the server's message as text
        b.js("document.getElementById('t-bk-go').click()")
        assert "loras" in b.wait("document.getElementById('t-error').textContent")
        # a one-block probe with the image-diff scorer: its table and heatmap
        b.js(
            "{ const s = (id, v) => document.getElementById(id).value = v;"
            "s('t-pr-b', 'sub/beta.safetensors'); s('t-pr-score', 'image-diff');"
            "document.getElementById('t-pr-score').dispatchEvent(new Event('change'));"
            "s('t-pr-prompts', 'a cat'); s('t-pr-blocks', 'OUT11'); s('t-pr-steps', 2);"
            "s('t-pr-w', 64); s('t-pr-h', 64); document.getElementById('t-pr-go').click() }"
        )
        table = b.wait("document.getElementById('t-result').textContent")
        assert "OUT11" in table and "pixel_diff" in table, table
        assert b.wait("document.getElementById('t-plot').naturalWidth") > 100
    finally:
        b.close()


def test_override_settings_only_for_options_baka_has(client):
    from baka.serve.fields import check

    body = {"override_settings": {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}}
    opts = client.app.state.baka.options
    assert check(body, {}, lenient=True, options=opts) == ["override_settings.eta_noise_seed_delta"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64, **body})
    assert (
        r.status_code == 422
        and "'eta_noise_seed_delta': an A1111 option baka does not have" in r.json()["detail"]
    )
