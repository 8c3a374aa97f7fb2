"""The one patch contract: LoRA, FreeU and the runtime block merge applied through a ModelPatcher
come off exactly, in any order, and leave the model bit-identical."""

import pytest
import torch

from baka.generate.engine import Generator, GenParams
from baka.generate.freeu import FreeU, FreeUPatch
from baka.generate.grid import GridContext
from baka.generate.lora import LoraPatch, NetworkUse
from baka.merge.runtime import RuntimeBlockMerge
from baka.merge.weights import parse_weights
from baka.models.networks import load_network
from baka.models.patch import ModelPatcher, Patch
from baka.models.safetensors_io import save_file


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


def _state(gen):
    return {
        f"{c}.{k}": v.clone()
        for c, m in gen.patcher.modules.items()
        for k, v in m.state_dict().items()
        if v.is_floating_point()
    }


def _lora(tmp_path, seed=0):
    g = torch.Generator().manual_seed(seed)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    t = {
        f"{name}.lora_down.weight": torch.randn(4, 32, generator=g),
        f"{name}.lora_up.weight": torch.randn(32, 4, generator=g),
        f"{name}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / f"l{seed}.safetensors"
    save_file(t, path)
    return load_network(path)


def test_stacked_patches_unwind_exactly(gen, tiny_files, tmp_path):
    before = _state(gen)
    merge = RuntimeBlockMerge.against(gen.ckpt, tiny_files[1], parse_weights("GRAD_V"))
    lora = LoraPatch([NetworkUse(_lora(tmp_path), unet=0.8)])
    freeu = FreeUPatch(FreeU(1.3, 1.4, 0.9, 0.2), 10)
    p = gen.patcher
    p.apply(merge)
    merged = _state(gen)
    assert any(not torch.equal(merged[k], before[k]) for k in before)
    p.apply(lora)
    p.apply(freeu)
    assert len(freeu.handles) == 10
    # taking the merge (applied first) off: LoRA and FreeU come off, the merge is undone, they go back on
    p.remove(merge)
    assert p.patches == [lora, freeu] and len(freeu.handles) == 10
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    now = _state(gen)
    assert not torch.equal(now[k], before[k])  # the LoRA is on the unmerged weights
    assert all(torch.equal(now[x], before[x]) for x in before if x != k)
    p.remove_all()
    assert p.patches == [] and freeu.handles == []
    after = _state(gen)
    assert all(torch.equal(after[x], before[x]) for x in before)


def test_patched_context_removes_on_error(gen, tmp_path):
    before = _state(gen)
    with pytest.raises(RuntimeError), gen.patcher.patched(LoraPatch([NetworkUse(_lora(tmp_path, 1))]), None):
        assert not all(torch.equal(v, before[k]) for k, v in _state(gen).items())
        raise RuntimeError("boom")
    assert gen.patcher.patches == []
    assert all(torch.equal(v, before[k]) for k, v in _state(gen).items())


def test_runtime_merge_remove_restores_a_and_images(gen, tiny_files):
    p = GenParams("a cat", steps=2, width=64, height=64, seed=5)
    base = gen(p)[0].image.tobytes()
    ctx = GridContext.with_merge(gen, str(tiny_files[1]))
    ctx.merger.set_weights(parse_weights("ALL_B"))
    assert gen(p)[0].image.tobytes() != base
    gen.patcher.remove(ctx.merger)
    assert gen(p)[0].image.tobytes() == base


def test_patch_base_is_a_contract():
    with pytest.raises(NotImplementedError):
        Patch().apply({})
    patcher = ModelPatcher({})
    with pytest.raises(NotImplementedError):
        patcher.apply(Patch())
    assert patcher.patches == []
