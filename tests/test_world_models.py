"""Issue #10's measured claims on the shipped shapes-world models (docs/world.md): fixed seeds, the
normal generator, the judge. They load the packaged files (never retrain).

They hold what build 9 does, each at the issue's target or with a margin below its figures, so a
change that breaks prompt following, emphasis, the merge, v-prediction, zero-terminal SNR, LoRA loading
(the shipped star LoRA), ESD or embeddings (the shipped textual-inversion vector) fails the default run.
(Up to build 8 the targets it still missed were marked ``world`` and ran in ``make test-world``; build 9
meets the last two, emphasis and the texture gap.)
"""

from pathlib import Path

import pytest

from baka.models.shipped import SHIPPED, shipped_path
from baka.world.eval import color_share, colour_word_prompts, evaluate, readings, star_scores

FLAT, STRIPED, VPRED = "world-flat", "world-striped", "world-vpred-ztsnr"
REVERSE_OUT12 = ",".join(["0"] + ["1"] * 13 + ["0"] * 12)  # BASE from A, IN00-M00 from B, OUT from A
# issue #10's targets
COLOR_MIN, SHAPE_MIN, BG_MIN = 0.9, 0.8, 0.9
BLACK_MAX, WHITE_MIN = 0.08, 0.92
STAR_MIN = 0.8  # star share with the star LoRA at weight 1
ESD_MAX, ESD_OTHERS_MIN = 0.2, 0.85  # erased colour's share, the other colours' accuracy
# effects the issue names without a number: gaps far outside the judge's seed-to-seed noise
N = 24  # seeds per single-prompt claim
# "clearly worse": CFG 7's accuracy above CFG 1's by this many standard errors of the difference
CFG_Z = 2.0
NEG_GAP = 0.25  # share of red shapes a negative "red" removes
EMPH_GAP = 0.1  # colour strength (palette colour 1, background 0) of (red:1.4) over (red:0.6)
TEX_GAP = 0.02  # texture energy of world-striped over world-flat (renders: ~0.055 vs ~0.0002)


def test_the_world_models_are_shipped():
    for name in SHIPPED:
        p = shipped_path(name)
        assert p is not None and p.stat().st_size < 16e6, name
    from baka.models.io import load_checkpoint

    ck = load_checkpoint(FLAT)
    assert ck.metadata["modelspec.title"] == FLAT and ck.metadata["modelspec.prediction_type"] == "epsilon"
    assert load_checkpoint(VPRED).metadata["modelspec.prediction_type"] == "v"


@pytest.fixture(scope="module")
def flat():
    from baka.generate.engine import Generator

    return Generator(FLAT, progress=False)


@pytest.fixture(scope="module")
def quick7(flat):
    return evaluate(flat, suite="quick", cfg=7, progress=False).metrics


@pytest.fixture(scope="module")
def full7(flat):
    return evaluate(flat, suite="full", cfg=7, progress=False).metrics


def test_prompt_following_holds(full7):
    """Position and the seen prompts (build 7, full suite of 180 images: seen colour 98%, position
    100%); the issue's own figures are test_prompt_following_targets."""
    m = full7
    assert m["position_accuracy"] >= 0.9 and m["seen"]["color_accuracy"] >= COLOR_MIN, m


def test_a_random_model_follows_nothing(tiny_files):
    """The judge's accuracies above mean something: the same suite on random weights is near chance."""
    m = evaluate(tiny_files[0], suite="quick", steps=4, progress=False).metrics
    assert m["background_accuracy"] <= 0.4 and m["color_accuracy"] <= 0.4, m


UNSAID_COLOUR = "circle, grey background, large, center"  # a prompt that names no colour


@pytest.fixture(scope="module")
def favourite(flat):
    """world-flat's favourite colour for UNSAID_COLOUR and its share of N seeds (one generation for
    both negative-prompt tests)."""
    from collections import Counter

    rs = readings(flat, UNSAID_COLOUR, n=N)
    colour = Counter(r.main.color for r in rs if r.main is not None).most_common(1)[0][0]
    return colour, color_share(rs, colour)


def test_a_whole_caption_negative_prompt_moves_away_from_it(flat, favourite):
    """A caption-like negative prompt steers: the colour the prompt draws on every seed goes (build 7:
    purple 24/24 -> yellow 24/24)."""
    colour, without = favourite
    with_neg = color_share(readings(flat, UNSAID_COLOUR, negative=f"{colour} {UNSAID_COLOUR}", n=N), colour)
    assert with_neg <= without - NEG_GAP, (colour, without, with_neg)


def test_prompt_following_targets(full7):
    """Issue #10's targets, met by build 7 (full suite, CFG 7): colour / shape / background 98% / 83% /
    100%, held-out pairs 98% / 80% / 100% (build 6: 90% / 77%, held-out 70% / 53%: its text encoder had
    lost the held-out pairs; docs/world.md, "Build 7")."""
    m, held = full7, full7["held_out"]
    assert m["background_accuracy"] >= BG_MIN and held["background_accuracy"] >= BG_MIN, m
    assert m["color_accuracy"] >= COLOR_MIN and held["color_accuracy"] >= COLOR_MIN, m
    assert m["shape_accuracy"] >= SHAPE_MIN and held["shape_accuracy"] >= SHAPE_MIN, m


def _clearly_above(hi: float, lo: float, n: int) -> bool:
    """``hi`` exceeds ``lo`` by CFG_Z standard errors of the difference of two shares of ``n`` images."""
    return hi - lo >= CFG_Z * ((hi * (1 - hi) + lo * (1 - lo)) / n) ** 0.5


def test_guidance_works(flat, full7):
    """CFG 1 (no guidance) follows the prompt clearly worse than CFG 7 (build 7, full suite: colour
    91% vs 98% over 180 images, held-out colour 82% vs 98%; build 6: 72% vs 90%), and guidance costs
    nothing else (shape 81% vs 83%, background 99% vs 100%)."""
    m1 = evaluate(flat, suite="full", cfg=1, progress=False).metrics
    for a, b in ((m1, full7), (m1["held_out"], full7["held_out"])):
        assert _clearly_above(b["color_accuracy"], a["color_accuracy"], b["n_images"]), (m1, full7)
    for k in ("shape_accuracy", "background_accuracy"):
        assert full7[k] >= m1[k] - 0.05, (k, m1, full7)


def test_negative_prompt_removes_what_it_names(flat, favourite):
    """A prompt that names no colour gets world-flat's favourite colour on most seeds; one word in the
    negative prompt naming that colour removes part of it (the text encoder was pretrained on single
    tags too, the UNet trained with kohya's tag dropout; build 7: purple 24/24 -> 0/24, build 5: blue 24/24 ->
    16/24)."""
    colour, without = favourite
    with_neg = color_share(readings(flat, UNSAID_COLOUR, negative=colour, n=N), colour)
    assert without >= 0.5 and with_neg <= without - NEG_GAP, (colour, without, with_neg)


def test_emphasis_moves_colour(flat):
    """A1111 emphasis on the colour word: ``(red:0.6)`` draws a fainter red than ``(red:1.4)``, measured
    as colour strength (1 the palette red, 0 the grey background; the colour class, nearest palette
    colour, reads both red). Build 8's world-flat read its colour from the padding states, which
    emphasis never touches (0.87 vs 0.87); build 9 learnt the weighted word (bench, 16 seeds: 0.74 vs
    0.93; docs/world.md, "Build 9")."""
    import statistics

    from baka.world.eval import color_strength

    got = {}
    for w in ("0.6", "1.4"):
        got[w] = color_strength(flat, f"(red:{w}) {UNSAID_COLOUR}", "red", "grey", n=N, emphasis="No norm")
    weak, strong = (statistics.mean(got[w]) for w in ("0.6", "1.4"))
    se = ((statistics.variance(got["0.6"]) + statistics.variance(got["1.4"])) / N) ** 0.5
    assert strong - weak >= max(EMPH_GAP, CFG_Z * se), (strong, weak, se)
    # generation's default (Original: the chunk's mean restored) moves it as well
    orig = {
        w: statistics.mean(color_strength(flat, f"(red:{w}) {UNSAID_COLOUR}", "red", "grey", n=N))
        for w in ("0.6", "1.4")
    }
    assert orig["1.4"] - orig["0.6"] >= EMPH_GAP, orig


@pytest.fixture(scope="module")
def merged(flat):
    """world-flat with world-striped's OUT blocks (supermerger preset OUT12), merged at run time."""
    from baka.merge.runtime import RuntimeBlockMerge
    from baka.merge.weights import parse_weights

    merge = flat.patcher.apply(RuntimeBlockMerge.against(flat.ckpt, STRIPED))
    yield merge, parse_weights
    flat.patcher.remove(merge)


@pytest.fixture(scope="module")
def merge_scores(flat, merged):
    merge, weights = merged
    scores = {}
    for name in ("ALL_B", "OUT12", REVERSE_OUT12):
        merge.set_weights(weights(name))
        scores[name] = evaluate(flat, suite="quick", progress=False).metrics
    merge.set_weights(weights("ALL_A"))
    return scores


def test_block_merge_moves_style_with_the_out_blocks(quick7, merge_scores):
    """Build 7 (quick suite, 18 images): OUT12 shape 72%, most of the way to striped's texture, the
    reverse split at flat's. On the full suite (180 images, bench/world_claims.py --suite full) OUT12
    keeps shape 86% (the issue's 80%) and moves texture 66% of the way (0.0063 -> 0.0160 of 0.0211)."""
    t_flat, t_striped = quick7["texture_energy"], merge_scores["ALL_B"]["texture_energy"]
    assert t_striped > 2 * t_flat, (t_flat, t_striped)
    out12, rev = merge_scores["OUT12"], merge_scores[REVERSE_OUT12]
    # the OUT blocks carry the style: most of the way to striped's texture, the prompt still followed
    assert out12["texture_energy"] >= t_flat + 0.6 * (t_striped - t_flat), merge_scores
    assert out12["shape_accuracy"] >= 0.7, merge_scores  # one image of the 18 is 5.6 points
    assert out12["background_accuracy"] >= BG_MIN, merge_scores
    # the reverse split (IN blocks from striped) leaves the texture near flat's
    assert rev["texture_energy"] <= t_flat + 0.4 * (t_striped - t_flat), merge_scores


def test_block_merge_targets(quick7, merge_scores):
    """A texture gap far outside seed noise (baka's own figure; build 9: 0.0211, quick suite; builds 6 /
    8: 0.0197 / 0.0193)."""
    assert merge_scores["ALL_B"]["texture_energy"] > quick7["texture_energy"] + TEX_GAP, merge_scores


def test_runtime_merge_matches_the_file_merge(flat, merged, tmp_path, run_cli):
    import numpy as np

    from baka.generate.engine import Generator, GenParams

    merge, weights = merged
    code, _, err = run_cli("merge", FLAT, STRIPED, "--alpha", "OUT12", "-o", tmp_path / "m.safetensors", "-q")
    assert code == 0, err
    p = GenParams(
        "blue square, yellow background, medium, center",
        steps=12,
        sampler="DPM++ 2M Karras",
        seed=3,
        width=64,
        height=64,
        batch=4,
    )
    merge.set_weights(weights("OUT12"))
    live = [np.asarray(r.image, np.int16) for r in flat(p)]
    merge.set_weights(weights("ALL_A"))
    filed = [np.asarray(r.image, np.int16) for r in Generator(tmp_path / "m.safetensors", progress=False)(p)]
    for a, b in zip(live, filed, strict=True):
        assert np.abs(a - b).mean() < 1.0  # fp16 file vs fp32 live lerp: rounding only


def _luminance(gen, bg: str) -> float:
    rs = readings(gen, f"red circle, {bg} background, small, center", n=N)
    return sum(r.luminance for r in rs) / len(rs)


@pytest.fixture(scope="module")
def vpred_lum():
    from baka.generate.engine import Generator

    vpred = Generator(VPRED, progress=False)
    return _luminance(vpred, "black"), _luminance(vpred, "white")


def test_zero_terminal_snr_spreads_black_and_white(flat, vpred_lum):
    """Issue #10: world-vpred-ztsnr draws "black background" at mean luminance <= 0.08 and "white
    background" >= 0.92 (build 9: 0.039 / 0.937, 2000 steps; build 8: 0.036 / 0.933; caption-free below
    t = 700), further apart than world-flat (epsilon; build 9: 0.040 / 0.893; Lin et al. 2023: the
    epsilon model stays nearer mid-grey). The ground-truth render of the prompt reads 0.039 / 0.927."""
    black, white = vpred_lum
    assert black <= BLACK_MAX and white >= WHITE_MIN, (black, white)
    eps_black, eps_white = _luminance(flat, "black"), _luminance(flat, "white")
    assert eps_white - eps_black < white - black, (eps_black, eps_white, black, white)


def test_a_lora_teaches_the_unseen_star(flat):
    """Issue #10: ``world-star`` (baka train, 40 large stars, UNet + text encoder LoCon) draws stars in
    >= 80% of images at weight 1, and world-flat alone never does (it draws the circles / squares /
    triangles it knows; build 7: in the asked colour 62% of the time, the word `star` being new to it).
    Build 9: 83% (3000 steps; 2000 gave 79%); builds 7 / 8: 88% (build 5 with the LoCon: 83%, linear
    layers only: 67%)."""
    from baka.models.shipped import SHIPPED_NETWORKS

    assert shipped_path("world-star", SHIPPED_NETWORKS).stat().st_size < 3e6
    with_lora = star_scores(flat, N, lora="<lora:world-star:1>")
    assert with_lora["star_share"] >= STAR_MIN and with_lora["color_accuracy"] >= 0.8, with_lora
    assert flat.lora_unmatched == []  # every module of the shipped LoRA found its layer
    without = star_scores(flat, N)
    assert without["star_share"] <= 0.05, without


def test_a_textual_inversion_embedding_used_by_name(tmp_path):
    """Issue #10: ``world-azure`` (baka train ``mode = "embedding"``: one vector, started from ``*``,
    learnt from 40 blue shapes) placed in an embeddings folder: prompts that name it get blue shapes,
    and a negative prompt that names it removes the blue that prompts asking for blue draw. Without the
    file the same word does neither. (Up to build 8 the negative half used a colourless prompt that
    world-flat happened to draw blue, 13 of 16 seeds; the build 9 candidate draws it purple.)"""
    import shutil

    from baka.generate.engine import Generator
    from baka.models.shipped import SHIPPED_EMBEDDINGS

    folder = tmp_path / "embeddings"
    folder.mkdir()
    shutil.copy(shipped_path("world-azure", SHIPPED_EMBEDDINGS), folder)
    with_file = Generator(FLAT, embedding_dirs=[folder], progress=False)
    without = Generator(FLAT, progress=False)

    def blue(gen, prompts, negative=""):
        rs = [
            r for k, p in enumerate(prompts) for r in readings(gen, p, negative=negative, n=1, seed=100 * k)
        ]
        return color_share(rs, "blue")

    prompts = colour_word_prompts("world-azure", 16, avoid="blue")
    assert blue(with_file, prompts) >= 0.8 and blue(without, prompts) <= 0.5
    # the negative: captions that ask for blue, the embedding's name alone as negative prompt (A1111's
    # use of negative embeddings); build 8 and the build 9 candidate 4 of 24 blue, 24 without the file
    asking = colour_word_prompts("blue", N, avoid="blue")
    assert blue(with_file, asking) >= 0.9
    assert blue(with_file, asking, "world-azure") <= 0.2 and blue(without, asking, "world-azure") >= 0.75


def test_esd_erases_red_and_keeps_the_other_colours(flat):
    """Issue #10's ESD claim (the paper's erased-class vs other-classes table): with ``world-no-red``
    (``baka erase`` ESD-x on 16 red training captions, one per iteration, extracted as a LoRA by ``baka
    lora extract``) prompts asking for red give red in <= 20% of images while the other colours keep
    >= 85%, the other colours' prompts naming red nowhere (build 9: 8% / 88%, the word `red` alone 42%
    red; build 8: 0% / 92%; without the LoRA 100% / 100%). Build 7 erased the word alone: red captions
    stayed red, 24/24."""
    from baka.world.eval import erase_scores

    before = erase_scores(flat, "red", N)
    assert before["erased_share"] >= 0.9 and before["others_color_accuracy"] >= 0.9, before
    erased = erase_scores(flat, "red", N, lora="<lora:world-no-red:1>")
    assert flat.lora_unmatched == []
    assert erased["erased_share"] <= ESD_MAX and erased["others_color_accuracy"] >= ESD_OTHERS_MIN, erased


def test_esd_u_erases_red_and_keeps_the_other_colours(flat):
    """The same claim for ESD-u: ``world-no-red-u`` (``baka erase --method ESD-u --network-dim 8
    --conv-dim 8``, a LoRA trained directly on the same 16 red captions, with a retain term on 20
    captions of the other colours at weight 4) gives red on <= 20% of red captions while the other
    colours keep >= 85% (2026-12-07: 0% / 100%, the word `red` alone 0%; on 48 seeds / captions 6% /
    100%). Extracting a full ESD-u edit as a LoRA lost the claim (docs/world.md)."""
    from baka.models.shipped import SHIPPED_NETWORKS
    from baka.world.eval import erase_scores

    assert shipped_path("world-no-red-u", SHIPPED_NETWORKS).stat().st_size < 1.5e6
    erased = erase_scores(flat, "red", N, lora="<lora:world-no-red-u:1>")
    assert flat.lora_unmatched == []
    assert erased["erased_share"] <= ESD_MAX and erased["others_color_accuracy"] >= ESD_OTHERS_MIN, erased


def test_the_shipped_loras_carry_their_addnet_hash():
    """Each shipped LoRA's ``sshs_model_hash`` (what A1111 and Civitai match LoRAs by) is its own
    tensors' hash, also after the build's fp16 cast."""
    from baka.models.io import read_raw
    from baka.models.safetensors_io import payload_sha256
    from baka.models.shipped import SHIPPED_NETWORKS

    for name in SHIPPED_NETWORKS:
        tensors, meta = read_raw(shipped_path(name, SHIPPED_NETWORKS))
        assert meta["sshs_model_hash"] == payload_sha256(tensors), name


def test_the_shipped_lora_and_embedding_name_the_shipped_world_flat_as_their_base():
    """The trainer's base-model hashes (kohya's ``ss_sd_model_hash``, A1111's legacy hash, and
    ``ss_new_sd_model_hash``, the file's sha256) in the star LoRA and the embedding are those of the
    world-flat that ships beside them, so A1111 / Civitai can tell which model they were trained on."""
    from baka.models.hashes import legacy_hash, sha256_file
    from baka.models.io import read_raw
    from baka.models.shipped import SHIPPED_EMBEDDINGS, SHIPPED_NETWORKS

    flat = shipped_path("world-flat")
    want = {"ss_sd_model_hash": legacy_hash(flat), "ss_new_sd_model_hash": sha256_file(flat)}
    files = [shipped_path("world-star", SHIPPED_NETWORKS), shipped_path("world-azure", SHIPPED_EMBEDDINGS)]
    for f in files:
        _, meta = read_raw(f)
        assert {k: meta[k] for k in want} == want, f.name


def test_the_shipped_files_fit_the_package_budget():
    """Issue #10: the shipped variants together at most ~40 MB (taken as 40 MiB: models, LoRAs,
    embedding and cards)."""
    from importlib import resources

    weights = Path(str(resources.files("baka").joinpath("world/weights")))
    total = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, total


def test_demo_merges_the_world_models_and_the_stripes_follow_the_out_blocks(run_cli, tmp_path):
    import re

    code, out, err = run_cli("demo", "--out", tmp_path)
    assert code == 0, err
    assert "tensors identical = True" in out and (tmp_path / "preview-grid.png").is_file()
    texture = {m[0]: float(m[1]) for m in re.findall(r"^\s+(\S+)\s+texture energy ([0-9.]+):", out, re.M)}
    assert set(texture) == {"ALL_A", "OUT12", "ALL_B"}, out
    assert texture["ALL_A"] < texture["OUT12"] <= texture["ALL_B"] * 1.2, texture
    rows = dict(re.findall(r"^\s+(\S+)\s+texture energy [0-9.]+: (.*)$", out, re.M))
    named = "red circle, yellow square, orange triangle, purple circle"
    assert rows["ALL_A"] == named and rows["ALL_B"] == named, rows  # both models draw what is named
    # the merge keeps every shape (the merge claim); its colours may drift (build 6: the orange
    # triangle reads red; OUT12's quick-suite colour is 61% against 83% for either model)
    assert [w.split()[-1] for w in rows["OUT12"].split(", ")] == [w.split()[-1] for w in named.split(", ")]
