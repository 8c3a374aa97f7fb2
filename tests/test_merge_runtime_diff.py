import pytest
import torch

from baka.merge.diff import block_diff, heatmap_png
from baka.merge.engine import merge_models
from baka.merge.recipe import Recipe
from baka.merge.runtime import RuntimeBlockMerge
from baka.merge.weights import parse_weights
from baka.models.io import load_checkpoint
from baka.models.pipeline import build_module


def _unet(path):
    ck = load_checkpoint(path)
    return ck, build_module("unet", ck.config, ck.components()["unet"])


def test_runtime_merge_matches_streaming_merge(tiny_files, tmp_path):
    ck_a, unet = _unet(tiny_files[0])
    ck_b = load_checkpoint(tiny_files[1])
    comps = ("unet", "text_encoder")
    a = {c: ck_a.components()[c] for c in comps}
    b = {c: ck_b.components()[c] for c in comps}
    te = build_module("text_encoder", ck_a.config, a["text_encoder"])
    rt = RuntimeBlockMerge({"unet": unet, "text_encoder": te}, a, b, parse_weights("ALL_A"))
    w = parse_weights("GRAD_A")
    changed = rt.set_weights(w)
    assert changed == [bid for bid, x in zip(rt.groups, w, strict=True) if x != 0]

    out = tmp_path / "m.safetensors"
    merge_models(
        Recipe("weight_sum", [str(f) for f in tiny_files[:2]], w, parse_weights(0)), out, progress=False
    )
    ck_m = load_checkpoint(out)
    want = ck_m.components()["unet"]
    for k, v in unet.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6), k

    # changing one block touches only that block's tensors
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    w2 = list(w)
    w2[6] = 1.0  # IN05
    assert rt.set_weights(tuple(w2)) == ["IN05"]
    after = unet.state_dict()
    diff = {k for k in before if not torch.equal(before[k], after[k])}
    assert diff and all(
        k.startswith("down_blocks.1.") and (".resnets.1." in k or ".attentions.1." in k) for k in diff
    )
    assert rt.set_weights(tuple(w2)) == []


def test_block_diff(tiny_files, tmp_path):
    same = block_diff(tiny_files[0], tiny_files[0])
    assert all(s.cosine == 1.0 or abs(s.cosine - 1) < 1e-12 for s in same)
    assert all(s.rel_change == 0 for s in same)
    out = tmp_path / "m.safetensors"
    merge_models(
        Recipe("weight_sum", [str(f) for f in tiny_files[:2]], parse_weights("OUT07"), parse_weights(0)),
        out,
        progress=False,
    )
    stats = {s.block: s for s in block_diff(tiny_files[0], out)}
    assert stats["IN05"].rel_change == 0 and stats["OUT04"].rel_change == 0
    assert stats["OUT05"].rel_change > 0.1 and stats["OUT11"].rel_change > 0.1
    png = heatmap_png(list(stats.values()), tmp_path / "d.png")
    from PIL import Image

    assert Image.open(png).size[0] > 26 * 40


def test_runtime_merge_by_any_method_equals_the_file_merge(tiny_files, tmp_path):
    """add difference with C, TIES and DARE (seeded per LDM key) with per-block betas: the live
    weights equal the streaming merge's file; only changed (alpha, beta) blocks are recomputed."""
    import pytest

    from baka.errors import BakaError

    comps = ("unet", "text_encoder", "vae")
    ck = [load_checkpoint(p) for p in tiny_files]
    live = {c: build_module(c, ck[0].config, ck[0].components()[c]) for c in comps}
    a, b, c = ({n: k.components()[n] for n in comps} for k in ck)
    alpha, beta = parse_weights("GRAD_V"), parse_weights("0.3;OUT11=0.7")
    for method, models in (("add_difference", 3), ("ties", 3), ("dare", 2)):
        rt = RuntimeBlockMerge(live, a, b, method=method, c=c if models == 3 else None, seed=4)
        rt.set_weights(alpha, beta)
        out = tmp_path / f"{method}.safetensors"
        merge_models(Recipe(method, [str(f) for f in tiny_files[:models]], alpha, beta, seed=4), out,
                     progress=False)  # fmt: skip
        want = load_checkpoint(out).components()
        for comp in comps:
            for k, v in live[comp].state_dict().items():
                src = k if k in want[comp] else "text_model." + k
                if v.is_floating_point():
                    assert torch.allclose(v, want[comp][src].reshape(v.shape), atol=1e-5), (method, k)
        assert rt.set_weights(alpha) == []  # nothing changed
        assert rt.set_weights(alpha, parse_weights("0.3")) == ["OUT11"]  # one beta changed
        rt.remove()
        for comp in comps:
            for k, v in live[comp].state_dict().items():
                src = k if k in a[comp] else "text_model." + k
                assert torch.equal(v, a[comp][src].reshape(v.shape)), (method, "restored", k)
    with pytest.raises(BakaError, match="needs a pass over the whole model files"):
        RuntimeBlockMerge(None, a, b, method="cosine_a")
    with pytest.raises(BakaError, match="needs model C"):
        RuntimeBlockMerge(None, a, b, method="add_difference")


def _matches_file(live: dict, want: dict, a: dict, atol: float, label) -> int:
    """Every live floating weight equals the file merge's (``want``); returns how many differ from A."""
    moved = 0
    for comp, module in live.items():
        for k, v in module.state_dict().items():
            src = k if k in want[comp] else "text_model." + k
            if v.is_floating_point():
                assert torch.allclose(v, want[comp][src].reshape(v.shape), atol=atol), (label, k)
                moved += not torch.equal(v, a[comp][src].reshape(v.shape))
    return moved


@pytest.mark.parametrize("method", ["cosine_a", "cosine_b"])
def test_runtime_cosine_merge_equals_the_file_merge(tiny_files, tmp_path, method):
    """supermerger's cosineA / cosineB need a pass over the whole models (their similarity range):
    against() runs it over the two files, so the live weights equal the file merge's."""
    comps = ("unet", "text_encoder", "vae")
    ck = load_checkpoint(tiny_files[0])
    live = {c: build_module(c, ck.config, ck.components()[c]) for c in comps}
    alpha = parse_weights("GRAD_V")
    rt = RuntimeBlockMerge.against(ck, tiny_files[1], method=method)
    assert isinstance(rt.state, tuple) and rt.state[0] < rt.state[1]  # (min, max) of the similarity
    rt.apply(live)
    rt.set_weights(alpha)
    out = tmp_path / f"{method}.safetensors"
    merge_models(Recipe(method, [str(f) for f in tiny_files[:2]], alpha, (0.0,) * 26), out, progress=False)
    moved = _matches_file(live, load_checkpoint(out).components(), ck.components(), 1e-5, method)
    assert moved > 50  # the merge moved most weights away from A


def test_runtime_merge_with_elemental_rules_equals_the_file_merge(tiny_files, tmp_path):
    """supermerger's elemental rules in the runtime merge (number ratios; ranges, NOT, last match
    wins): every live weight equals the file merge of the same recipe, after changing the rules too,
    and remove() restores A even where a rule moved keys of a block at weight 0."""
    import pytest

    from baka.errors import BakaError

    comps = ("unet", "text_encoder", "vae")
    ck = [load_checkpoint(p) for p in tiny_files[:2]]
    live = {c: build_module(c, ck[0].config, ck[0].components()[c]) for c in comps}
    a, b = ({n: k.components()[n] for n in comps} for k in ck)
    alpha = parse_weights("ALL_A")  # every block at 0: only the rules move anything
    rt = RuntimeBlockMerge(live, a, b)
    for rules in ("IN01-IN05:attn2:0.7\nNOT OUT11::0.2\nOUT11:norm:1", "BASE::0.5;M00:proj:0.9"):
        rt.set_elemental(rules)
        rt.set_weights(alpha)
        out = tmp_path / "e.safetensors"
        if out.exists():
            out.unlink()
        merge_models(Recipe("weight_sum", [str(f) for f in tiny_files[:2]], alpha, parse_weights(0),
                            elemental=rules), out, progress=False)  # fmt: skip
        assert _matches_file(live, load_checkpoint(out).components(), a, 1e-6, rules) > 0, rules
    rt.remove()
    for comp in comps:
        for k, v in live[comp].state_dict().items():
            src = k if k in a[comp] else "text_model." + k
            assert torch.equal(v, a[comp][src].reshape(v.shape)), ("restored", k)
    with pytest.raises(BakaError, match="random elemental ratios"):
        RuntimeBlockMerge(None, a, b, elemental="IN05::R")
