import numpy as np
import pytest
import torch

from baka.errors import BakaError, ModelFileError
from baka.generate.engine import Generator, GenParams
from baka.generate.lora import LoraPatch, load_network, parse_lbw, target_names
from baka.models.safetensors_io import save_file

R = 4
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # IN01
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # IN04, LoCon 3x3
LDM = "lora_unet_output_blocks_5_1_proj_in"  # OUT05, LDM-style name (1x1 conv)
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
LOHA = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_v"  # OUT11
LOKR = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # M00, Linear(512 -> 128)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def make_network(path):
    t = {}

    def lora(name, out_shape, in_shape, seed):
        t[f"{name}.lora_down.weight"] = torch.randn(R, *in_shape, generator=_g(seed))
        t[f"{name}.lora_up.weight"] = torch.randn(
            out_shape[0], R, *([1, 1] if len(in_shape) == 3 else []), generator=_g(seed + 1)
        )
        t[f"{name}.alpha"] = torch.tensor(2.0)

    lora(ATTN, (32,), (32,), 1)
    lora(CONV, (64,), (32, 3, 3), 3)
    lora(LDM, (128,), (128, 1, 1), 5)
    lora(TE, (32,), (32,), 7)
    for i, (a, b) in enumerate([(32, R), (R, 32), (32, R), (R, 32)]):
        t[f"{LOHA}.hada_w{1 + i // 2}_{'ab'[i % 2]}"] = torch.randn(a, b, generator=_g(20 + i))
    t[f"{LOHA}.alpha"] = torch.tensor(1.0)
    t[f"{LOKR}.lokr_w1"] = torch.randn(8, 16, generator=_g(30))
    t[f"{LOKR}.lokr_w2"] = torch.randn(16, 32, generator=_g(31))
    t["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(R, 8)
    t["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, R)
    save_file(t, path)
    return t


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    t = make_network(d / "mystyle.safetensors")
    return d / "mystyle.safetensors", t


def _weights(gen):
    return {k: v.clone() for m in (gen.pipe.unet, gen.pipe.text_encoder) for k, v in m.state_dict().items()}


def test_deltas_match_hand_formulas(gen, net_file):
    path, t = net_file
    targets = target_names(gen.pipe.unet, gen.pipe.text_encoder)
    mods = {n: targets[n][1] for n in (ATTN, CONV, LDM, TE, LOHA, LOKR)}
    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    patch = LoraPatch()
    patch.add(load_network(path), targets, te=0.5, unet=0.7)
    assert patch.unmatched == ["mystyle: lora_unet_no_such_layer"]
    s = 2.0 / R  # alpha / rank
    want = {
        ATTN: 0.7 * s * t[f"{ATTN}.lora_up.weight"] @ t[f"{ATTN}.lora_down.weight"],
        CONV: 0.7
        * s
        * (t[f"{CONV}.lora_up.weight"].flatten(1) @ t[f"{CONV}.lora_down.weight"].flatten(1)).reshape(
            64, 32, 3, 3
        ),
        LDM: 0.7
        * s
        * (t[f"{LDM}.lora_up.weight"].flatten(1) @ t[f"{LDM}.lora_down.weight"].flatten(1)).reshape(
            128, 128, 1, 1
        ),
        TE: 0.5 * s * t[f"{TE}.lora_up.weight"] @ t[f"{TE}.lora_down.weight"],
        LOHA: 0.7
        * (1.0 / R)
        * (t[f"{LOHA}.hada_w1_a"] @ t[f"{LOHA}.hada_w1_b"])
        * (t[f"{LOHA}.hada_w2_a"] @ t[f"{LOHA}.hada_w2_b"]),
        LOKR: 0.7 * torch.kron(t[f"{LOKR}.lokr_w1"], t[f"{LOKR}.lokr_w2"]),
    }
    for n, m in mods.items():
        assert torch.allclose(m.weight - before[n], want[n], atol=1e-4), n
    assert mods[LDM] is gen.pipe.unet.up_blocks[1].attentions[2].proj_in  # LDM name -> same layer
    patch.remove()
    for n, m in mods.items():
        assert torch.equal(m.weight, before[n]), n


def test_block_weights(gen, net_file):
    path, _ = net_file
    targets = target_names(gen.pipe.unet, gen.pipe.text_encoder)
    before = _weights(gen)
    patch = LoraPatch()
    patch.add(load_network(path), targets, lbw="OUTALL")  # BASE 1, IN* 0, M00 0, OUT03-11 1
    changed = {k for k, v in _weights(gen).items() if not torch.equal(v, before[k])}
    patch.remove()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" not in changed
    assert "down_blocks.1.resnets.0.conv1.weight" not in changed
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight" not in changed
    assert "up_blocks.1.attentions.2.proj_in.weight" in changed
    assert "encoder.layers.0.self_attn.q_proj.weight" in changed
    assert all(torch.equal(v, before[k]) for k, v in _weights(gen).items())


def test_lbw_parsing():
    full = parse_lbw("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")
    assert full == parse_lbw("OUTALL")
    # 17 values: the 9 blocks they do not name get 0 (IN00, IN03, IN06, IN09-11, OUT00-02), as the
    # lora-block-weight extension's 17 -> 26 expansion does
    unnamed = [1, 4, 7, 10, 11, 12, 14, 15, 16]
    assert [full[i] for i in unnamed] == [0.0] * 9
    assert full[0] == 1 and full[2] == 0 and full[13] == 0 and full[17] == 1 and full[25] == 1
    assert [parse_lbw("ALL")[i] for i in unnamed] == [0.0] * 9
    assert parse_lbw(",".join(["0.5"] * 26)) == (0.5,) * 26
    with pytest.raises(BakaError, match="did you mean 'OUTALL'"):
        parse_lbw("OUTAL")
    with pytest.raises(BakaError, match="17 or 26"):
        parse_lbw("1,2,3")


def test_generate_with_lora_tag_and_restore(tiny_files, net_file):
    path, _ = net_file
    gen = Generator(tiny_files[0], lora_dirs=[path.parent], progress=False)
    p = GenParams("a cat", steps=2, width=64, height=64, seed=3)
    base = np.asarray(gen(p)[0].image)
    r = gen(p.replace(prompt="a cat <lora:mystyle:1.5>"))[0]
    assert not np.array_equal(np.asarray(r.image), base)
    assert 'Lora hashes: "mystyle: ' in r.infotext and "<lora:mystyle:1.5>" in r.infotext
    # A1111 / Civitai name a safetensors LoRA by its addnet hash (tensor payload), 12 hex digits
    from baka.models.hashes import addnet_hash, sha256_file

    assert f'Lora hashes: "mystyle: {addnet_hash(path)[:12]}"' in r.infotext
    assert addnet_hash(path)[:12] != sha256_file(path)[:12]
    assert gen.lora_unmatched == ["mystyle: lora_unet_no_such_layer"]
    assert np.array_equal(np.asarray(gen(p)[0].image), base)  # weights restored after the call
    with pytest.raises(BakaError, match="LoRA 'nope' not found"):
        gen(p.replace(prompt="<lora:nope:1>"))


def test_checkpoint_is_not_a_lora(tiny_files):
    with pytest.raises(ModelFileError, match="not a kohya/A1111 LoRA"):
        load_network(tiny_files[0])


def test_unsupported_module_keys_are_reported_not_applied(gen, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{name}.lora_down.weight": torch.ones(R, 32),
            f"{name}.lora_up.weight": torch.ones(32, R),
            f"{name}.bias_scale": torch.ones(32, 1),  # a key no format defines
        },
        tmp_path / "dora.safetensors",
    )
    targets = target_names(gen.pipe.unet, gen.pipe.text_encoder)
    before = targets[name][1].weight.clone()
    patch = LoraPatch()
    patch.add(load_network(tmp_path / "dora.safetensors"), targets)
    assert patch.unmatched == [f"dora: {name} (unsupported bias_scale)"]
    assert torch.equal(targets[name][1].weight, before)


def test_find_network_folders_first_then_shipped(tmp_path):
    from baka.generate.lora import find_network
    from baka.models.shipped import SHIPPED_NETWORKS, shipped_path

    shipped = shipped_path("world-star", SHIPPED_NETWORKS)
    assert shipped is not None and find_network("world-star", []) == shipped
    (tmp_path / "world-star.safetensors").write_bytes(b"")  # a user's file of the same name wins
    assert find_network("world-star", [tmp_path]) == tmp_path / "world-star.safetensors"
    with pytest.raises(BakaError, match="LoRA 'nope' not found in"):
        find_network("nope", [tmp_path])
