import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from baka.models.io import save_checkpoint  # noqa: E402
from baka.models.tiny import tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sds():
    """Three different tiny SD1.x-topology models (LDM layout, fp32)."""
    return [tiny_checkpoint(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="session")
def tiny_files(tiny_sds, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    paths = []
    for i, sd in enumerate(tiny_sds):
        p = d / f"model{'ABC'[i]}.safetensors"
        save_checkpoint(sd, p)
        paths.append(p)
    return paths


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from baka.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def free_port() -> int:
    """A TCP port free now: each multi-process test gets its own rendezvous port, so tests running side
    by side (pytest-xdist workers) never meet on torch's default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_result(client, r) -> dict:
    """The result of a server job (``r`` answered ``{"job": id}``), polled until it ends (at most a
    minute); fails unless it succeeded."""
    import time

    assert r.status_code == 200, r.text
    job = r.json()["job"]
    for _ in range(1200):
        s = client.get(f"/baka/v1/jobs/{job}").json()
        if s["state"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert s["state"] == "done", s
    return s["result"]


def assert_same_tensors(x: dict, y: dict):
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:5]
    for k in x:
        assert x[k].dtype == y[k].dtype, k
        assert torch.equal(x[k], y[k]), k


@pytest.fixture
def live_server():
    """Start ``baka serve``'s app for a Settings on a free loopback port (uvicorn in a thread):
    ``url = live_server(settings)``; every server started is stopped when the test ends."""
    import socket
    import threading
    import time

    import uvicorn

    from baka.serve.app import create_app

    started = []

    def start(settings) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
        )
        t = threading.Thread(target=srv.run, daemon=True)
        t.start()
        started.append((srv, t))
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for srv, t in started:
        srv.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def webui_root(tiny_files, tmp_path_factory):
    """An A1111 folder: models A and B as alpha / beta in models/Stable-diffusion, an empty LoRA and
    embeddings folder, and a file outside the model folders that clients must never reach."""
    import shutil

    root = tmp_path_factory.mktemp("webui")
    ck = root / "models" / "Stable-diffusion"
    ck.mkdir(parents=True)
    shutil.copy(tiny_files[0], ck / "alpha.safetensors")
    shutil.copy(tiny_files[1], ck / "beta.safetensors")
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "embeddings").mkdir()
    (root / "secret.safetensors").write_bytes(b"not for clients")
    return root


def png_b64(img) -> str:
    """A picture as the A1111 API carries one: PNG bytes, base64."""
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def b64_image(data: str):
    """The picture in an A1111 API reply's base64 field."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data)))
