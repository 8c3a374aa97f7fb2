"""Real-size (860M-parameter UNet) random checkpoints: I/O paths and streaming-merge memory."""

import json
import subprocess
import sys

import pytest

from baka.models.tiny import write_random_checkpoint

pytestmark = pytest.mark.realsize


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    return [write_random_checkpoint(d / f"real{s}.safetensors", s) for s in (1, 2)]


def test_real_size_layout(real_files):
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from baka.models.config import sd15_config
    from baka.models.convert import ldm_to_diffusers
    from baka.models.io import describe, open_source

    info = describe(real_files[0], hashes=False)
    assert info["kind"] == "sd1" and info["size"] == "real-size SD1.x" and info["keys"] == 1131
    unet_params = 0
    with open_source(real_files[0]) as src:
        sd = {k: src.get(k) for k in src.keys()}  # memory-mapped views: nothing is copied
        comps, extra = ldm_to_diffusers(sd)
        assert {c: len(v) for c, v in comps.items()} == {"unet": 686, "vae": 248, "text_encoder": 196}
        unet_params = sum(v.numel() for v in comps["unet"].values())
        theirs = convert_ldm_unet_checkpoint(sd, sd15_config().unet)
        assert set(theirs) == set(comps["unet"])
        assert all(torch.equal(theirs[k], comps["unet"][k]) for k in list(theirs)[::40])
    assert 859_000_000 < unet_params < 860_000_000


_CHILD = r"""
import json, sys, threading, time
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
from baka.merge.engine import merge_models
from baka.merge.lora.bake import bake_loras
from baka.merge.lora.common import LoraArg
from baka.merge.recipe import Recipe
from baka.merge.weights import parse_weights
def merge():
    merge_models(Recipe("weight_sum", sys.argv[2:4], parse_weights("GRAD_V"), parse_weights(0)), sys.argv[4],
                 progress=False)
def bake():
    bake_loras(sys.argv[2], [LoraArg.parse(sys.argv[3] + ":0.8")], sys.argv[4], progress=False)
if sys.argv[1] == "bake":  # the key table (built once per config, ~180 MB of module skeletons) first
    from baka.models.safetensors_io import SafetensorsFile
    from baka.models.sources import shapes_of_source
    from baka.models.targets import checkpoint_targets
    with SafetensorsFile(sys.argv[2]) as f:
        checkpoint_targets(shapes_of_source(f))
base = anon(); peak = [base]; stop = []
def watch():
    while not stop:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
t = threading.Thread(target=watch); t.start()
{"merge": merge, "bake": bake}[sys.argv[1]]()
stop.append(1); t.join()
print(json.dumps({"growth": peak[0] - base}))
"""


def _growth(job: str, *args) -> int:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, job, *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])["growth"]


def test_streaming_merge_memory_does_not_grow_with_model(real_files, tmp_path):
    out = tmp_path / "merged.safetensors"
    growth = _growth("merge", *real_files, out)
    size = real_files[0].stat().st_size
    # a load-everything merge needs > 2 x 2.1 GB; streaming stays at a few chunks of the largest tensor
    assert growth < 350 * 2**20, f"anon RSS grew by {growth / 2**20:.0f} MB for a {size / 2**30:.1f} GB model"
    from baka.models.safetensors_io import SafetensorsFile

    with SafetensorsFile(out) as f:
        assert len(f.keys()) == 1131 and "baka_recipe" in f.metadata


def test_lora_bake_streams_a_real_size_model(real_files, tmp_path):
    """A rank-4 LoRA on every attention layer and the text encoder baked into a real-size model:
    memory stays at a few tensors, every other tensor is copied bit for bit."""
    import torch

    from baka.models.safetensors_io import SafetensorsFile, save_file
    from baka.models.sources import shapes_of_source
    from baka.models.targets import checkpoint_targets

    with SafetensorsFile(real_files[0]) as f:
        targets = checkpoint_targets(shapes_of_source(f))
    g = torch.Generator().manual_seed(0)
    lora, keys = {}, set()
    for name, t in targets.items():
        if (
            t.group in ("attn", "te")
            and t.key not in keys
            and name.startswith(("lora_unet_down", "lora_unet_up", "lora_unet_mid", "lora_te_"))
        ):
            keys.add(t.key)
            lora[f"{name}.lora_down.weight"] = torch.randn(4, *t.shape[1:], generator=g) * 0.01
            lora[f"{name}.lora_up.weight"] = torch.randn(t.shape[0], 4, *t.shape[2:], generator=g) * 0.01
    save_file(lora, tmp_path / "l.safetensors")
    out = tmp_path / "baked.safetensors"
    growth = _growth("bake", real_files[0], tmp_path / "l.safetensors", out)
    assert growth < 350 * 2**20, f"anon RSS grew by {growth / 2**20:.0f} MB"
    with SafetensorsFile(out) as o, SafetensorsFile(real_files[0]) as a:
        # kohya: "create LoRA for Text Encoder: 72 modules", "for U-Net: 192 modules"
        assert o.keys() == a.keys() and len(keys) == 72 + 192
        for k in a.keys()[::25]:
            assert torch.equal(o.get(k), a.get(k)) != (k in keys), k


def test_diffusers_from_single_file_with_the_shipped_config_folder(real_files):
    """A real-size SD1.5 file through diffusers alone, offline, with baka's shipped config folder."""
    from importlib import resources

    import torch
    from diffusers import StableDiffusionPipeline

    from baka.models.safetensors_io import SafetensorsFile

    folder = str(resources.files("baka.models").joinpath("configs/sd15"))
    pipe = StableDiffusionPipeline.from_single_file(
        str(real_files[0]),
        config=folder,
        local_files_only=True,
        safety_checker=None,
        torch_dtype=torch.float16,
    )
    with SafetensorsFile(real_files[0]) as f:
        want = f.get("model.diffusion_model.output_blocks.5.1.proj_in.weight")
    assert torch.equal(pipe.unet.up_blocks[1].attentions[2].proj_in.weight, want)
    assert len(pipe.tokenizer) == 49408
