"""The pieces of ``make world`` (baka.world.build) that run in seconds: the caption targets of the
text encoder's pretraining and a short pretraining run. The full build is ``make world`` (docs/world.md)."""

import json

import torch

from baka.world import build
from baka.world.render import sample_scene


def test_caption_targets_name_every_attribute_of_every_scene():
    targets = build._caption_targets()
    twos = 0
    for i in range(300):
        scene = sample_scene(3, i)
        labels = build._scene_labels(scene)
        assert set(labels) == set(targets)
        for k, v in labels.items():
            assert v in targets[k], (k, v)
        two = len(scene.shapes) == 2
        twos += two
        # a second shape has a colour and a shape, and then no position word; one shape the reverse
        assert (labels["color2"] != "-") == two and (labels["shape2"] != "-") == two
        assert (labels["position"] == "-") == two
    assert 0 < twos < 300


def test_partial_captions_say_part_of_the_scene_and_label_the_rest_unsaid():
    import random

    rng = random.Random(0)
    cut = single = 0
    for i in range(400):
        scene = sample_scene(3, i)
        cap, labels = build.partial_caption(scene, rng)
        assert set(labels) == set(build._caption_targets()) and cap
        whole = build._scene_labels(scene)
        said_shapes = {*(s.color for s in scene.shapes), *(s.shape for s in scene.shapes)}
        for k, v in labels.items():  # what a partial caption says is the scene's, the rest is unsaid
            # shape tags are numbered as said: with the left shape's tag left out, shape 1 is the right one
            ok = said_shapes if k[:-1] in ("color", "shape") and len(scene.shapes) == 2 else {whole[k]}
            assert v in {*ok, build.UNSAID}, (cap, k, v, whole[k])
        said = [v for v in labels.values() if v != build.UNSAID]
        for word in said:
            assert word in cap, (cap, labels)
        single += len(cap.split()) == 1
        cut += labels["color1"] != build.UNSAID and labels["shape1"] == build.UNSAID
        if labels["color1"] == build.UNSAID and labels["shape1"] != build.UNSAID:
            assert cap.split(",")[0] == labels["shape1"], cap  # a tag cut to its shape word
    assert single > 40 and cut > 20, (single, cut)


def _end_states(te_sd: dict, captions: list[str]) -> torch.Tensor:
    from baka.models.config import make_text_encoder
    from baka.models.tokenizer import load_tokenizer

    te = make_text_encoder(build.world_config().text_encoder)
    te.load_state_dict(te_sd)
    ids = load_tokenizer()(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(input_ids=ids).last_hidden_state[:, -1]


def test_text_encoder_pretraining_puts_the_caption_into_the_padding_states():
    captions = ["red circle, blue background, large, left", "red circle, white background, large, left"]
    init = build.identity_text_encoder()
    a, b = _end_states(init, captions)
    assert torch.equal(a, b)  # the identity encoder's padding states know nothing of the caption
    sd, log, acc = build.pretrain_text_encoder(
        init, steps=100, batch=32, n_captions=2000, whole=0.5, attention_only=True
    )
    assert sum(log[-10:]) / 10 < 0.75 * sum(log[:10]) / 10, log  # partial captions: slower than whole ones
    assert set(acc) == {"all", "whole", "held_out", *build._caption_targets()}
    assert all(0.0 <= v <= 1.0 for v in acc.values()), acc
    a, b = _end_states(sd, captions)
    assert not torch.equal(a, b)
    # attention only: every MLP weight is where it started, everything else has moved
    mlp = [k for k in sd if ".mlp." in k]
    assert mlp and all(torch.equal(sd[k], init[k]) for k in mlp)
    out_proj = "encoder.layers.0.self_attn.out_proj.weight"
    assert not torch.equal(sd[out_proj], init[out_proj])


def test_text_encoder_pretraining_can_train_the_mlps_too():
    init = build.identity_text_encoder()
    sd, _, _ = build.pretrain_text_encoder(init, steps=5, batch=8, n_captions=64, attention_only=False)
    assert not torch.equal(sd["encoder.layers.0.mlp.fc2.weight"], init["encoder.layers.0.mlp.fc2.weight"])


def _shipped_text_encoder() -> dict:
    from baka.models.io import load_checkpoint

    return {k: v.float() for k, v in load_checkpoint("world-flat").components()["text_encoder"].items()}


def test_the_shipped_text_encoder_says_the_caption_in_its_padding_states():
    """The pretrained encoder's last padding state of two captions that differ in one word differs
    (build 7: cosine 0.73 for the background, 0.81 for the colour; the identity encoder gives exactly 1)."""
    te = _shipped_text_encoder()
    base = "red circle, blue background, large, left"
    other_bg, other_colour = base.replace("blue", "white"), base.replace("red", "green")
    s = _end_states(te, [base, other_bg, other_colour, base])
    cos = torch.nn.functional.cosine_similarity(s[:1], s[1:], dim=1)
    assert cos[0] < 0.8 and cos[1] < 0.9 and cos[2] > 0.9999, cos


def held_out_shape_hits(te_sd: dict, n: int = 600) -> tuple[int, int]:
    """How many captions of held-out colour/shape pairs ("green triangle, ...") have their last padding
    state nearest the mean state of seen captions with the same shape word: (hits, captions)."""
    from baka.world.render import HELD_OUT_PAIRS, scenes

    def single(split):
        return [s for s in scenes(n, seed=5, split=split) if len(s.shapes) == 1]

    seen = single("train")
    states = _end_states(te_sd, [s.caption for s in seen])
    words = sorted({s.shapes[0].shape for s in seen})
    means = torch.stack([states[[s.shapes[0].shape == w for s in seen]].mean(0) for w in words])
    held = [s for s in single("heldout") if (s.shapes[0].color, s.shapes[0].shape) in HELD_OUT_PAIRS]
    nearest = torch.cdist(_end_states(te_sd, [s.caption for s in held]), means).argmin(1)
    return sum(words[i] == s.shapes[0].shape for i, s in zip(nearest.tolist(), held, strict=True)), len(held)


def test_the_shipped_text_encoder_keeps_held_out_pairs_apart():
    """Build 7's attention-only encoder: a held-out pair's caption reads as its own shape, not as the
    seen pair of its colour: 359 of 359 (build 6's encoder, trained MLPs: 204 of 359, and its UNet drew
    0 of 18 green triangles; docs/world.md, "Build 7")."""
    hits, total = held_out_shape_hits(_shipped_text_encoder())
    assert total >= 30 and hits >= 0.9 * total, (hits, total)


def test_the_small_runs_configs_load_as_written(tmp_path):
    """make world's LoRA and embedding stages write configs baka train accepts, with what they say."""
    from baka.train.config import load_config

    data = tmp_path / "data"
    data.mkdir()
    lora = load_config(
        build.lora_toml(tmp_path, "star", tmp_path / "m.safetensors", data, network={"rank_dropout": 0.1})
    )
    assert lora.mode == "lora" and lora.train_text_encoder and lora.save_precision == "fp16"
    assert lora.network.dim == build.STAR_NETWORK["dim"] and lora.network.rank_dropout == 0.1
    assert lora.network.conv_dim == build.STAR_NETWORK["conv_dim"] > 0  # LoCon: the convs learn the points
    assert lora.max_steps == build.STAR_STEPS and lora.dataset.subsets[0].num_repeats == 10
    ti = load_config(build.embedding_toml(tmp_path, tmp_path / "m.safetensors", data))
    assert ti.mode == "embedding" and ti.token_string == build.TI_WORD and ti.init_word == "*"
    assert ti.output_name == build.TI_WORD and ti.dataset.subsets[0].caption_dropout_rate == 0.0


def test_the_model_stages_configs_load_as_written(tmp_path):
    """world-flat's runs: the base run with the plain loss, the caption-free run (world-flat-cf), the
    weighted-caption run on the weighted set without the caption-free setting, then world-flat
    caption-free on that set; the fine-tunes from world-flat keep CFG off the low-noise steps."""
    from baka.train.config import load_config

    sets = {k: tmp_path / k for k in ("flat", "striped", "weighted")}
    stages = build.model_stages(tmp_path, sets, tmp_path / "init.safetensors")
    want = {  # name: (caption-free below, weighted captions, data, start)
        build.BASE: (0, False, "flat", tmp_path / "init.safetensors"),
        build.CF_RUN: (300, False, "flat", build.trained(tmp_path, build.BASE)),
        build.WEIGHTED: (0, True, "weighted", build.fp16_copy(tmp_path, build.CF_RUN)),
        "world-flat": (300, True, "weighted", build.trained(tmp_path, build.WEIGHTED)),
        "world-striped": (300, False, "striped", build.flat_start(tmp_path)),
        "world-vpred-ztsnr": (700, False, "flat", build.flat_start(tmp_path)),
    }
    assert [s[0] for s in stages] == list(want)
    assert {s[0] for s in stages if s[0].startswith("world-flat")} <= set(build.FLAT_CHAIN)
    for name, model, data, steps, lr, vpred, extra in stages:
        cfg = load_config(
            build.train_toml(tmp_path, name, model, data, steps, lr=lr, v_pred=vpred, extra=extra)
        )
        below, weighted, folder, start = want[name]
        assert cfg.caption_free_below_timestep == below and cfg.weighted_captions == weighted, name
        assert cfg.v_prediction == vpred == (name == "world-vpred-ztsnr")
        assert cfg.dataset.subsets[0].image_dir == str(sets[folder]) and cfg.model == str(start)
        assert cfg.dataset.subsets[0].caption_tag_dropout_rate == build.TAG_DROPOUT
        if weighted:
            assert cfg.weighted_captions_emphasis == "No norm"  # kohya's SD text encoding
    assert stages[0][-1]["v_pred_like_loss"] == 0.5


def test_the_weighted_set_fades_the_weighted_colour(tmp_path):
    """data/weighted: the flat scenes; weighted colour words (A1111 syntax) on a share of one-shape
    scenes, the colour faded towards the background by the weight below 1, kept above."""
    import re

    from PIL import Image

    from baka.world.render import render_scene, scenes
    from baka.world.score import color_strength

    n = 60
    assert build.render_weighted(tmp_path, n=n, share=1.0) > 20
    weighted = 0
    for i, sc in enumerate(scenes(n, 0, "flat", "train")):
        caption = (tmp_path / f"{i:05d}.txt").read_text().strip()
        m = re.match(r"\((\w+):([\d.]+)\) (\w+), ", caption)
        if len(sc.shapes) == 2:
            assert caption == sc.caption
            continue
        s = sc.shapes[0]
        assert m and m.group(1, 3) == (s.color, s.shape), caption
        w = float(m.group(2))
        assert w in build.EMPH_FADED + build.EMPH_ABOVE
        assert caption.replace(m.group(0), f"{s.color} {s.shape}, ") == sc.caption
        got = color_strength(Image.open(tmp_path / f"{i:05d}.png"), s.color, sc.background)
        full = color_strength(render_scene(sc), s.color, sc.background)  # < 1 by the antialiased edge
        assert abs(got - min(w, 1.0) * full) < 0.05, (caption, got, full)
        weighted += 1
    assert weighted > 20
    # the build's share: about half the one-shape scenes
    again = tmp_path / "half"
    assert 0.3 * n < build.render_weighted(again, n=n) < 0.6 * n


def test_the_decoder_phase_leaves_the_latent_space_alone(tmp_path):
    """VAE phase 3 trains post_quant_conv and the decoder only, so every UNet trained on the encoder's
    latents stays valid; no rescale either."""
    from baka.models.config import make_vae
    from baka.world.render import render_folder

    render_folder(tmp_path / "img", 6, seed=0, style="flat", split="train")
    torch.manual_seed(0)
    before = make_vae(build.world_config().vae).state_dict()
    after, log = build.train_vae(
        [tmp_path / "img"], steps=2, batch=2, init=before, lr=1e-3, decoder_only=True, fade=1.0
    )
    assert len(log) == 2
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert decoder and any(not torch.equal(before[k], after[k]) for k in decoder)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in decoder)


class _Trained(Exception):
    pass


def _stop_at_first_train(monkeypatch) -> tuple[list[str], list[bool]]:
    """``build.main`` with no rendering and no training: the first ``baka train`` it would run is
    recorded (its TOML) and stops it with ``_Trained``."""
    calls: list[str] = []
    rendered: list[bool] = []

    def fake_train(toml):
        calls.append(toml.read_text())
        raise _Trained

    def fake_sets(o, weighted=True):
        rendered.append(weighted)
        return {k: o / k for k in ("flat", "striped", "star", build.TI_WORD, "weighted")}

    monkeypatch.setattr(build, "render_sets", fake_sets)
    monkeypatch.setattr(build, "run_train", fake_train)
    return calls, rendered


def test_a_build_from_scratch_starts_the_later_stages_from_the_shipped_file(tmp_path, monkeypatch):
    """Once world-flat is trained it ships at once, and world-striped (every later stage) starts from
    that very file, so the base-model hashes in the star LoRA's and the embedding's metadata name the
    world-flat that ships beside them (the build's own fp16 copy, lacking the card, had another hash)."""
    import pytest

    from baka.models.io import read_raw, save_checkpoint

    want, _ = read_raw(build.WEIGHTS_DIR / "world-flat.safetensors")
    out, dest = tmp_path / "scratch", tmp_path / "ship"
    (out / "init.safetensors").parent.mkdir(parents=True)
    (out / "init.safetensors").write_bytes(b"")  # VAE and encoder done; only its path is used
    (out / "base_stats.json").write_text(json.dumps({"vae_steps": 1}))
    losses = json.dumps({"train": [0.5, 0.25], "val": []})
    for run in build.FLAT_CHAIN:
        (out / run).mkdir()
        (out / run / "losses.json").write_text(losses)
        (out / run / "time.json").write_text(json.dumps({"seconds": 7}))
        build.trained(out, run).write_bytes(b"")  # trained: skipped
    build.fp16_copy(out, build.CF_RUN).write_bytes(b"")
    save_checkpoint({k: v.float() for k, v in want.items()}, build.trained(out, "world-flat"))
    calls, _ = _stop_at_first_train(monkeypatch)
    with pytest.raises(_Trained):
        build.main(["--out", str(out), "--dest", str(dest)])
    assert 'output_name = "world-striped"' in calls[0]
    assert f'model = "{build.flat_start(out)}"' in calls[0]
    shipped = dest / "world-flat.safetensors"
    assert build.flat_start(out).read_bytes() == shipped.read_bytes()
    got, meta = read_raw(shipped)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads(meta["baka_world"])["caption_free"]["seconds"] == 7  # the card's full figures
    # the build's end ships world-flat again (with the others): the same bytes the later stages started from
    build.ship(out, "world-flat", build.model_stats(out, "world-flat"), dest)
    assert build.flat_start(out).read_bytes() == shipped.read_bytes()


def test_the_later_stages_start_from_the_shipped_tensors(tmp_path, monkeypatch):
    """Every stage after world-flat starts from the shipped file, so ``--from-shipped`` seeds that start
    from the package and goes straight to world-striped; the cards keep the VAE / encoder figures."""
    import pytest

    from baka.models.io import read_raw

    shipped = build.WEIGHTS_DIR / "world-flat.safetensors"
    _, meta = read_raw(shipped)
    out = tmp_path / "late"
    calls, rendered = _stop_at_first_train(monkeypatch)
    with pytest.raises(_Trained):
        build.main(["--out", str(out), "--dest", str(tmp_path / "ship"), "--from-shipped"])
    assert rendered == [False]  # the weighted set feeds only world-flat's runs, which it skips
    assert 'output_name = "world-striped"' in calls[0]
    assert f'model = "{build.flat_start(out)}"' in calls[0]
    assert build.flat_start(out).read_bytes() == shipped.read_bytes()
    stats = build.base_stats(out)
    card = json.loads(meta["baka_world"])
    assert stats == {k: card[k] for k in card if k.startswith(("vae_", "text_encoder_"))}
    assert stats["text_encoder_held_out_accuracy"] and stats["vae_judge"]
    with pytest.raises(SystemExit):
        build.main(["--out", str(out), "--from-shipped", "--only", "flat"])


def test_the_esd_stage_erases_red_in_context_not_on_the_eval_prompts():
    """world-no-red is erased on red captions of the training set (one per iteration), none of them a
    prompt the ESD claim is measured on."""
    from baka.erase.esd import EraseConfig
    from baka.world.eval import suite_scenes

    prompts = build.ESD_PROMPTS
    assert len(set(prompts)) == len(prompts) >= 8
    assert all(p.startswith(build.ESD_CONCEPT + " ") for p in prompts)
    assert not {s.caption for s, _ in suite_scenes("full")} & set(prompts)
    sep = build.ESD_ARGS[build.ESD_ARGS.index("--separator") + 1]
    assert EraseConfig(sep.join(prompts), separator=sep).prompts() == list(prompts)


def test_the_esd_u_stage_keeps_captions_that_name_red_nowhere():
    """world-no-red-u's retain term keeps training captions of every other colour, none naming red and
    none an eval-suite prompt; the stage's arguments train ESD-u as a LoCon on one thread."""
    from baka.erase.esd import EraseConfig
    from baka.world.eval import suite_scenes
    from baka.world.render import COLORS

    kept = build.ESD_PRESERVE
    assert len(set(kept)) == len(kept) and not any(build.ESD_CONCEPT in p for p in kept)
    assert {p.split()[0] for p in kept} == set(COLORS) - {build.ESD_CONCEPT}
    assert not {s.caption for s, _ in suite_scenes("full")} & set(kept)
    args = build.esd_u_args()
    opt = dict(zip(args[::2], args[1::2], strict=True))
    assert opt["--method"] == "ESD-u" and int(opt["--network-dim"]) > 0 and int(opt["--conv-dim"]) > 0
    sep = opt["--separator"]
    assert EraseConfig("x", preserve=opt["--preserve"], separator=sep).preserved() == list(kept)
    assert build.ESD_U_THREADS == "1"
