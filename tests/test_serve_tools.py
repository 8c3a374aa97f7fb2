"""The model-making tools over HTTP (issue 13): LoRA extract / bake / merge and merge probe / search as
jobs, names inside the configured folders only, outputs as new files, registered scorers only."""

from __future__ import annotations

import base64
import io

import pytest
from conftest import job_result
from fastapi.testclient import TestClient
from PIL import Image

from baka.serve.app import create_app
from baka.serve.folders import ModelFolders
from baka.serve.state import Settings


@pytest.fixture(scope="module")
def root(webui_root):
    return webui_root


@pytest.fixture(scope="module")
def client(root):
    folders = ModelFolders()
    folders.add_root(root)
    return TestClient(create_app(Settings(folders, outputs=root / "outputs")))


def test_lora_extract_bake_merge_as_jobs(client, root):
    lora_dir, ck = root / "models" / "Lora", root / "models" / "Stable-diffusion"
    body = {"model_a": "alpha", "model_b": "beta", "output_name": "diff", "dim": 4, "clamp_quantile": 1}
    res = job_result(client, client.post("/baka/v1/lora/extract", json=body))
    assert (
        res["lora"] == "diff.safetensors" and res["modules"] > 0 and (lora_dir / "diff.safetensors").is_file()
    )
    assert "diff" in [x["name"] for x in client.get("/sdapi/v1/loras").json()]
    res = job_result(
        client,
        client.post(
            "/baka/v1/lora/bake",
            json={"model": "alpha", "loras": [{"name": "diff", "weight": 1.0}], "output_name": "baked"},
        ),
    )
    assert res["checkpoint"] == "baked.safetensors" and res["applied"] > 0 and res["unmatched"] == []
    assert (ck / "baked.safetensors").is_file()
    res = job_result(
        client,
        client.post(
            "/baka/v1/lora/merge",
            json={
                "loras": [{"name": "diff", "weight": 0.5}, {"name": "diff", "weight": 0.5}],
                "output_name": "two",
            },
        ),
    )
    assert res["lora"] == "two.safetensors" and (lora_dir / "two.safetensors").is_file()
    # an existing output is never overwritten; names outside the folders, unknown settings: 4xx now
    bad = [
        ("/baka/v1/lora/extract", {**body}, 409),
        ("/baka/v1/lora/extract", {**body, "model_b": "../../secret", "output_name": "x"}, 400),
        ("/baka/v1/lora/extract", {**body, "rank_rule": "sv_nope:1", "output_name": "x"}, 400),
        ("/baka/v1/lora/bake", {"model": "alpha", "loras": [{"name": "../diff"}], "output_name": "y"}, 400),
        ("/baka/v1/lora/bake", {"model": "alpha", "loras": [{"name": "nope"}], "output_name": "y"}, 404),
        (
            "/baka/v1/lora/bake",
            {"model": "alpha", "loras": [{"name": "diff", "lbw": "BOGUS"}], "output_name": "y"},
            400,
        ),
        ("/baka/v1/lora/merge", {"loras": [], "output_name": "z"}, 422),
    ]
    for path, req, code in bad:
        assert client.post(path, json=req).status_code == code, (path, req)
    assert not (lora_dir / "x.safetensors").exists() and not (ck / "y.safetensors").exists()


def _b64_png(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s)))


def test_merge_probe_and_search_as_jobs(client, root):
    scoring = {"model_a": "alpha", "model_b": "beta", "score": "image-diff", "prompts": ["red circle"],
               "steps": 2, "width": 64, "height": 64}  # fmt: skip
    probe = {**scoring, "blocks": ["IN01", "OUT11"]}
    res = job_result(client, client.post("/baka/v1/merge/probe", json=probe))
    assert set(res["effects"]) == {"IN01", "OUT11"} and "score" in res["base"]
    assert res["base"]["score"] == pytest.approx(1.0)  # A against itself
    assert _b64_png(res["heatmap"]).size[0] > 100 and "effect" in res["table"]
    res = job_result(
        client,
        client.post(
            "/baka/v1/merge/search", json={**scoring, "blocks": ["OUT11"], "trials": 2, "output_name": "best"}
        ),
    )
    assert res["trials"] == 2 and len(res["values"]) == 2 and len(res["best_weights"]) == 26
    assert res["checkpoint"] == "best.safetensors"
    assert (root / "models" / "Stable-diffusion" / "best.safetensors").is_file()
    assert _b64_png(res["plot"]).size[0] > 100
    assert list((root / "outputs" / "searches").glob("*.db"))
    for req, code in (
        ({**scoring, "score": "os:system"}, 400),  # user code is never named by a client
        ({**scoring, "score": "wrld"}, 400),
        ({**scoring, "prompts": []}, 400),  # image-diff needs prompts
        ({**scoring, "blocks": ["IN99"]}, 400),
        ({**scoring, "method": "nah"}, 400),
        ({**scoring, "mode": "sideways"}, 400),
        ({**scoring, "model_b": "/etc/passwd"}, 400),
    ):
        assert client.post("/baka/v1/merge/probe", json=req).status_code == code, req


def test_scorers_listed_for_the_web_ui(client):
    """The registered scorers and what the page needs to know of them (user code never listed)."""
    got = {s["name"]: s for s in client.get("/baka/v1/scorers").json()}
    assert set(got) == {"world", "image-diff"}
    assert got["world"]["own_prompts"] and got["world"]["size"] == [64, 64]
    assert not got["image-diff"]["own_prompts"] and got["image-diff"]["size"] is None
    assert all(s["doc"] and s["objective"] == "score" for s in got.values())
