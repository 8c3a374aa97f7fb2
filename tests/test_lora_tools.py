"""``baka lora extract | bake | merge`` on tiny SD1.x-topology models: the extract -> bake round trip
reproduces B, a baked model equals the live LoRA (weights and image), LoRA merges equal the sum of
their weighted deltas, and the rank rules follow kohya's resize formulas (hand-computed table)."""

import json

import numpy as np
import pytest
import torch

from baka.errors import BakaError
from baka.generate.engine import Generator, GenParams
from baka.generate.lora import LoraPatch, load_network, target_names
from baka.merge.lora.bake import bake_loras
from baka.merge.lora.combine import merge_loras
from baka.merge.lora.common import LoraArg, quantile, svd_factors
from baka.merge.lora.extract import extract_lora
from baka.merge.lora.ranks import RankRule
from baka.models.hashes import addnet_hash
from baka.models.io import save_checkpoint
from baka.models.safetensors_io import SafetensorsFile, save_file
from baka.models.targets import checkpoint_targets

RANK = 4
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # IN01, Linear 32 -> 32
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # IN04, 3x3 conv 32 -> 64
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
LOHA = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_v"  # OUT11
LOKR = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # M00, Linear 512 -> 128
IA3 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"  # OUT03, Linear 128 -> 128
FULL = "lora_unet_up_blocks_2_attentions_1_proj_out"  # OUT07, 1x1 conv 64 -> 64 with a bias
DORA = "lora_te_text_model_encoder_layers_3_mlp_fc1"


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _read(path):
    with SafetensorsFile(path) as f:
        return {k: f.get(k).clone() for k in f.keys()}, dict(f.metadata)


def _read_tensors(path):
    return _read(path)[0]


def _lora_module(t, name, out_ch, in_shape, seed, rank=RANK, alpha=2.0):
    t[f"{name}.lora_down.weight"] = torch.randn(rank, *in_shape, generator=_g(seed)) * 0.1
    t[f"{name}.lora_up.weight"] = (
        torch.randn(out_ch, rank, *([1, 1] if len(in_shape) == 3 else []), generator=_g(seed + 1)) * 0.1
    )
    t[f"{name}.alpha"] = torch.tensor(alpha)


@pytest.fixture(scope="module")
def model_b(tiny_sds, tmp_path_factory):
    """B = A + a rank-4 change on every layer kohya's LoCon targets (attention, resnets, samplers,
    text encoder); everything else equal to A."""
    a = tiny_sds[0]
    b = dict(a)
    changed = []
    targets = checkpoint_targets({k: tuple(v.shape) for k, v in a.items()})
    for i, t in enumerate(
        sorted({t.key: t for t in targets.values() if t.group != "other"}.values(), key=lambda t: t.key)
    ):
        w = a[t.key]
        u = torch.randn(w.shape[0], RANK, generator=_g(2 * i))
        v = torch.randn(RANK, w[0].numel(), generator=_g(2 * i + 1))
        delta = (u @ v).reshape(w.shape)
        b[t.key] = w + delta * (0.3 * float(w.std()) / float(delta.std()))
        changed.append(t.key)
    path = tmp_path_factory.mktemp("lora_tools") / "modelB.safetensors"
    save_checkpoint(b, path)
    return path, b, changed


def test_extract_then_bake_reproduces_b(tiny_files, tiny_sds, model_b, tmp_path, run_cli):
    path_b, b, changed = model_b
    lora = tmp_path / "ab.safetensors"
    code, out, err = run_cli(
        "lora", "extract", tiny_files[0], path_b, "-o", lora, "--dim", RANK, "--conv-dim", RANK, "--te",
        "--clamp-quantile", "1", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "[lora extract]" in out and "relative error per block:" in out
    tensors, meta = _read(lora)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(RANK)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": str(RANK)}
    assert meta["sshs_model_hash"] == addnet_hash(lora)
    assert tensors[f"{CONV}.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert tensors[f"{CONV}.lora_up.weight"].shape == (64, RANK, 1, 1)
    assert {k.rsplit(".", 2)[0] for k in tensors if k.startswith("lora_te_")}, "text encoder extracted"
    # every changed layer has its module: rank-4 changes at dim 4 are held exactly
    assert len({k.split(".")[0] for k in tensors}) == len(changed)

    baked = tmp_path / "baked.safetensors"
    code, out, err = run_cli("lora", "bake", tiny_files[0], f"{lora}:1", "-o", baked, "-q")
    assert code == 0, err
    got = _read_tensors(baked)
    a = tiny_sds[0]
    assert set(got) == set(b)
    for k in b:
        if k in changed:
            rel = float((got[k] - b[k]).norm() / (b[k] - a[k]).norm())
            assert rel < 1e-3, (k, rel)
        else:
            assert torch.equal(got[k], b[k]), k


def test_extract_reports_per_block_error_and_rank_rules(tiny_files, model_b, tmp_path):
    path_b, _, changed = model_b
    # dim 2 < the change's rank 4: every block loses something, reported per block
    r = extract_lora(tiny_files[0], path_b, tmp_path / "d2.safetensors", dim=2, te=True, progress=False)
    assert set(r.block_error) >= {"TE", "IN01", "M00", "OUT11"}
    assert all(0.2 < e < 1 for e in r.block_error.values()), r.block_error
    assert set(r.ranks.values()) == {2} and not r.te_unchanged
    # sv_fro:0.999 keeps the 4 real singular values of each change (capped at --dim 16), no more
    r = extract_lora(
        tiny_files[0], path_b, tmp_path / "fro.safetensors", dim=16, rank_rule="sv_fro:0.999",
        clamp_quantile=1, progress=False,
    )  # fmt: skip
    assert set(r.ranks.values()) == {RANK}
    assert max(r.block_error.values()) < 1e-3


def test_extract_of_equal_text_encoders_says_so(tiny_files, tiny_sds, tmp_path):
    b = dict(tiny_sds[0])
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    b[key] = b[key] + 0.1
    save_checkpoint(b, tmp_path / "b.safetensors")
    r = extract_lora(tiny_files[0], tmp_path / "b.safetensors", tmp_path / "l.safetensors", dim=4, te=True,
                     progress=False)  # fmt: skip
    assert r.te_unchanged and r.modules == 1 and r.unchanged > 100
    assert list(r.ranks) == ["lora_unet_down_blocks_0_attentions_0_proj_in"]


def test_clamp_is_kohyas_joined_quantile():
    diff = torch.randn(48, 40, generator=_g(5))
    up, down = svd_factors(diff, 8, RankRule(), 0.9)
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    raw_up, raw_down = u[:, :8] * s[:8], vh[:8]
    hi = torch.quantile(torch.cat([raw_up.flatten(), raw_down.flatten()]), 0.9)
    assert torch.allclose(up, raw_up.clamp(-hi, hi), atol=1e-5)
    assert torch.allclose(down, raw_down.clamp(-hi, hi), atol=1e-5)
    x = torch.randn(1001, generator=_g(6))
    for q in (0.0, 0.5, 0.99, 1.0):
        assert torch.allclose(quantile(x, q), torch.quantile(x, q))


@pytest.mark.parametrize(
    ("rule", "want"),
    [
        # S = 10, 5, 2, 1, 0.5 (kohya resize_lora's formulas, by hand)
        ("fixed", 5),
        ("sv_ratio:4", 2),  # values > 10 / 4 = 2.5: 10 and 5
        ("sv_ratio:100", 4),  # all five, capped at len(S) - 1
        ("sv_fro:0.9", 2),  # cumulative S^2 / 130.25 = .768, .960: first >= 0.81 is the 2nd
        ("sv_fro:0.99", 3),  # .9904 >= .9801 at the 3rd
        ("sv_cumulative:0.9", 3),  # cumulative S / 18.5 = .541, .811, .919: first >= 0.9 is the 3rd
        ("sv_cumulative:0.5", 1),
    ],
)
def test_rank_rules_table(rule, want):
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert RankRule.parse(rule).rank(s, 64) == want
    assert RankRule.parse(rule).rank(s, 1) == 1  # capped at the dim


def test_rank_rule_errors():
    with pytest.raises(BakaError, match="did you mean 'sv_fro'"):
        RankRule.parse("sv_frob:0.9")
    with pytest.raises(BakaError, match="NAME:NUMBER"):
        RankRule.parse("sv_fro:x")


@pytest.fixture(scope="module")
def lyco_file(tmp_path_factory):
    """Every module format the live patch applies, on layers of the tiny model."""
    t = {}
    _lora_module(t, ATTN, 32, (32,), 1)
    _lora_module(t, CONV, 64, (32, 3, 3), 3)
    _lora_module(t, TE, 32, (32,), 7)
    for i, (a, b) in enumerate([(32, RANK), (RANK, 32), (32, RANK), (RANK, 32)]):
        t[f"{LOHA}.hada_w{1 + i // 2}_{'ab'[i % 2]}"] = torch.randn(a, b, generator=_g(20 + i)) * 0.3
    t[f"{LOHA}.alpha"] = torch.tensor(1.0)
    t[f"{LOKR}.lokr_w1"] = torch.randn(8, 16, generator=_g(30)) * 0.1
    t[f"{LOKR}.lokr_w2"] = torch.randn(16, 32, generator=_g(31)) * 0.1
    t[f"{IA3}.weight"] = torch.randn(128, generator=_g(40)) * 0.1
    t[f"{IA3}.on_input"] = torch.tensor(False)
    t[f"{FULL}.diff"] = torch.randn(64, 64, 1, 1, generator=_g(41)) * 0.01
    t[f"{FULL}.diff_b"] = torch.randn(64, generator=_g(42)) * 0.01
    _lora_module(t, DORA, 64, (32,), 50)
    t[f"{DORA}.dora_scale"] = torch.rand(1, 32, generator=_g(52)) + 0.5
    path = tmp_path_factory.mktemp("lyco") / "lyco.safetensors"
    save_file(t, path)
    return path


def test_bake_equals_live_application(tiny_files, lyco_file, tmp_path):
    """Weights bit-equal to the live patch (two networks, block weights, every format), and the same
    image at the same seed."""
    other = tmp_path / "other.safetensors"
    t = {}
    _lora_module(t, ATTN, 32, (32,), 60, rank=8, alpha=4.0)
    _lora_module(t, LOHA.replace("attn1_to_v", "attn1_to_k"), 32, (32,), 62)
    save_file(t, other)
    lbw = "1,0.5,0.5,1,1,1,1,0.3,1,1,1,1,1,1,1,1,0.7"
    baked = tmp_path / "baked.safetensors"
    loras = [LoraArg.parse(f"{lyco_file}:0.8:{lbw}"), LoraArg.parse(f"{other}:-0.6")]
    r = bake_loras(tiny_files[0], loras, baked, progress=False)
    assert r.unmatched == [] and r.applied == 10  # 8 modules + 2

    gen = Generator(tiny_files[0], lora_dirs=[lyco_file.parent, tmp_path], progress=False)
    targets = target_names(gen.pipe.unet, gen.pipe.text_encoder)
    patch = LoraPatch()
    patch.add(load_network(lyco_file), targets, te=0.8, unet=0.8, lbw=lbw)
    patch.add(load_network(other), targets, te=-0.6, unet=-0.6)
    got = _read_tensors(baked)
    for name in (ATTN, CONV, TE, LOHA, LOKR, IA3, FULL, DORA):
        comp, mod, _ = targets[name]
        key = checkpoint_targets({k: tuple(v.shape) for k, v in got.items()})[name].key
        assert torch.equal(got[key], mod.weight.detach()), name
    full_bias = checkpoint_targets({k: tuple(v.shape) for k, v in got.items()})[FULL].key[:-6] + "bias"
    assert torch.equal(got[full_bias], targets[FULL][1].bias.detach())
    patch.remove()

    p = GenParams("a cat", steps=2, width=64, height=64, seed=3)
    live = gen(p.replace(prompt=f"a cat <lora:lyco:0.8:0.8:lbw={lbw}> <lora:other:-0.6>"))[0].image
    from_file = Generator(baked, progress=False)(p)[0].image
    assert np.array_equal(np.asarray(live), np.asarray(from_file))
    assert not np.array_equal(np.asarray(gen(p)[0].image), np.asarray(live))  # the LoRAs do something


def test_bake_metadata_names_the_loras_and_keeps_the_input(tiny_files, lyco_file, tmp_path, run_cli):
    before = tiny_files[0].read_bytes()
    out = tmp_path / "b.safetensors"
    code, stdout, err = run_cli(
        "lora", "bake", tiny_files[0], f"{lyco_file}:0.5", "-o", out, "--dtype", "fp16"
    )
    assert code == 0, err
    tensors, meta = _read(out)
    rec = json.loads(meta["baka_lora_bake"])
    assert rec == [
        {"lora": "lyco.safetensors", "hash": addnet_hash(lyco_file)[:12], "weight": 0.5, "lbw": None}
    ]
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert tiny_files[0].read_bytes() == before
    code, _, err = run_cli("lora", "bake", tiny_files[0], lyco_file, "-o", tiny_files[0])
    assert code == 2 and "refusing to overwrite an input file" in err


def _delta_of(path, name, shape):
    net = load_network(path)
    return net.modules[name].delta_weight(torch.Size(shape))


def test_merge_concatenates_ranks_exactly(tmp_path, run_cli):
    l1, l2 = tmp_path / "l1.safetensors", tmp_path / "l2.safetensors"
    t1, t2 = {}, {}
    _lora_module(t1, ATTN, 32, (32,), 1, rank=4, alpha=2.0)
    _lora_module(t1, CONV, 64, (32, 3, 3), 3, rank=4, alpha=1.0)
    _lora_module(t2, ATTN, 32, (32,), 5, rank=8, alpha=8.0)
    _lora_module(t2, TE, 32, (32,), 7, rank=2, alpha=1.0)
    save_file(t1, l1)
    save_file(t2, l2)
    out = tmp_path / "m.safetensors"
    # l2 at -0.3 in every block but IN01 (where ATTN lives: lbw 17-value list)
    lbw = "1,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"
    code, stdout, err = run_cli("lora", "merge", f"{l1}:0.7", f"{l2}:-0.3:{lbw}", "-o", out, "-q")
    assert code == 0, err
    got, meta = _read(out)
    assert meta["ss_network_dim"] == "4" and json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    shapes = {ATTN: (32, 32), CONV: (64, 32, 3, 3), TE: (32, 32)}
    want = {
        ATTN: 0.7 * _delta_of(l1, ATTN, shapes[ATTN]),  # l2's ATTN is switched off by its lbw
        CONV: 0.7 * _delta_of(l1, CONV, shapes[CONV]),
        TE: -0.3 * _delta_of(l2, TE, shapes[TE]),
    }
    assert got[f"{ATTN}.lora_down.weight"].shape == (4, 32)  # ... so only l1's 4 ranks are there
    for name, w in want.items():
        assert torch.allclose(_delta_of(out, name, shapes[name]), w, atol=1e-6), name
    code, stdout, err = run_cli("lora", "merge", f"{l1}:0.7", f"{l2}:-0.3", "-o", out, "-q")
    assert code == 0, err
    both = 0.7 * _delta_of(l1, ATTN, (32, 32)) - 0.3 * _delta_of(l2, ATTN, (32, 32))
    assert torch.allclose(_delta_of(out, ATTN, (32, 32)), both, atol=1e-6)
    got, meta = _read(out)
    assert got[f"{ATTN}.lora_down.weight"].shape == (4 + 8, 32) and meta["ss_network_dim"] == "12"


def test_merge_by_svd_keeps_the_best_rank(tmp_path, lyco_file, tiny_files):
    l1, l2 = tmp_path / "l1.safetensors", tmp_path / "l2.safetensors"
    t1, t2 = {}, {}
    _lora_module(t1, ATTN, 32, (32,), 1)
    _lora_module(t2, ATTN, 32, (32,), 5)
    save_file(t1, l1)
    save_file(t2, l2)
    out = tmp_path / "svd.safetensors"
    r = merge_loras([LoraArg(l1, 1.0), LoraArg(l2, 0.5)], out, dim=3, clamp_quantile=1, progress=False)
    assert r.ranks == {ATTN: 3} and 0 < r.block_error["IN01"] < 1
    total = _delta_of(l1, ATTN, (32, 32)) + 0.5 * _delta_of(l2, ATTN, (32, 32))
    u, s, vh = torch.linalg.svd(total)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(_delta_of(out, ATTN, (32, 32)), best, atol=1e-5)
    # LyCORIS modules: concatenation refuses them, SVD takes them given the model's layers
    with pytest.raises(BakaError, match="give --dim"):
        merge_loras([LoraArg(lyco_file)], tmp_path / "x.safetensors", progress=False)
    with pytest.raises(BakaError, match="give\\s+--model"):
        merge_loras([LoraArg(lyco_file)], tmp_path / "x.safetensors", dim=4, progress=False)
    r = merge_loras([LoraArg(lyco_file)], tmp_path / "y.safetensors", dim=128, model=tiny_files[0],
                    clamp_quantile=1, progress=False)  # fmt: skip
    assert max(r.block_error.values()) < 1e-5  # 128 >= every layer's rank (LoKr, IA3 are full rank): exact
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_cli_errors_are_one_line(tiny_files, lyco_file, tmp_path, run_cli):
    code, _, err = run_cli("lora", "bake", tiny_files[0], tiny_files[1], "-o", tmp_path / "o.safetensors")
    assert code == 2 and "not a kohya/A1111 LoRA" in err and err.count("\n") == 1
    code, _, err = run_cli("lora", "extract", lyco_file, tiny_files[1], "-o", tmp_path / "o.safetensors")
    assert code == 2 and "lyco.safetensors" in err and err.count("\n") == 1
    code, _, err = run_cli("lora", "extract", tiny_files[0], tiny_files[0], "-o", tmp_path / "o.safetensors")
    assert code == 2 and "do not differ" in err
    code, _, err = run_cli("lora", "bake", tiny_files[0], f"{lyco_file}:x", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "is not a number" in err
    code, _, err = run_cli("lora", "bake", tiny_files[0], "nope:1", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "LoRA 'nope' not found" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_shipped_lora_bakes_by_name(tmp_path, run_cli):
    """``world-star`` (shipped) baked into ``world-flat`` (shipped), both by name."""
    out = tmp_path / "flat-star.safetensors"
    code, stdout, err = run_cli("lora", "bake", "world-flat", "world-star:1", "-o", out, "-q")
    assert code == 0, err
    assert "warning" not in stdout
