"""Issue #10's measured claims on the shipped shapes-world models (docs/world.md): fixed seeds, the
normal generator, the judge. They load the packaged files (never retrain).

Unmarked tests hold what build 5 does today, with a margin below its figures, so a change that breaks
prompt following, the merge, v-prediction, zero-terminal SNR, LoRA loading (the shipped star LoRA) or
embeddings (the shipped textual-inversion vector) fails the default run. Tests marked
``world`` assert the issue's own targets that build 5 still misses (figures and causes in
docs/world.md); ``make test-world`` runs them, and they fail until a build reaches them.
"""

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
# colour accuracy, CFG 7 over CFG 1, on the full suite (180 images: a difference's standard error ~0.045)
CFG_GAP = 0.15
NEG_GAP = 0.25  # share of red shapes a negative "red" removes
EMPH_GAP = 0.2  # share of red shapes, (red:1.4) over (red:0.6)
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
    """Build 6, full suite (180 images): colour 90%, shape 77% (build 5: 59%; its late, low-noise
    steps bent the shapes under CFG 7 until world-flat's caption-free fine-tune), background 100%;
    the held-out colour/shape pairs and the last points of shape are the misses
    (test_prompt_following_targets)."""
    m = full7
    assert m["background_accuracy"] >= BG_MIN and m["position_accuracy"] >= 0.9, m
    assert m["seen"]["color_accuracy"] >= COLOR_MIN, m
    assert m["color_accuracy"] >= 0.85 and m["shape_accuracy"] >= 0.72, m


def test_a_random_model_follows_nothing(tiny_files):
    """The judge's accuracies above mean something: the same suite on random weights is near chance."""
    m = evaluate(tiny_files[0], suite="quick", steps=4, progress=False).metrics
    assert m["background_accuracy"] <= 0.4 and m["color_accuracy"] <= 0.4, m


def test_a_whole_caption_negative_prompt_moves_away_from_it(flat):
    """A caption-like negative prompt steers: the blue shape the prompt draws on every seed goes
    (build 5: yellow on every seed)."""
    base = "circle, grey background, large, center"
    without = color_share(readings(flat, base, n=N), "blue")
    with_neg = color_share(readings(flat, base, negative="blue " + base, n=N), "blue")
    assert with_neg <= without - NEG_GAP, (without, with_neg)


@pytest.mark.world
def test_prompt_following_targets(full7):
    m, held = full7, full7["held_out"]
    assert m["background_accuracy"] >= BG_MIN and held["background_accuracy"] >= BG_MIN, m
    assert m["color_accuracy"] >= COLOR_MIN and held["color_accuracy"] >= COLOR_MIN, m
    assert m["shape_accuracy"] >= SHAPE_MIN and held["shape_accuracy"] >= SHAPE_MIN, m


def test_guidance_works(flat, full7):
    """CFG 1 (no guidance) follows the prompt clearly worse than CFG 7 (build 6, full suite: colour
    72% vs 90%, held-out colour 37% vs 70%), and guidance costs nothing else (shape 74% vs 77%,
    background 99% vs 100%)."""
    m1 = evaluate(flat, suite="full", cfg=1, progress=False).metrics
    assert m1["color_accuracy"] + CFG_GAP <= full7["color_accuracy"], (m1, full7)
    assert m1["held_out"]["color_accuracy"] + CFG_GAP <= full7["held_out"]["color_accuracy"], (m1, full7)
    for k in ("shape_accuracy", "background_accuracy"):
        assert full7[k] >= m1[k] - 0.05, (k, m1, full7)


def test_negative_prompt_removes_what_it_names(flat):
    """A prompt that names no colour gets world-flat's favourite colour on most seeds; one word in the
    negative prompt naming that colour removes part of it (the text encoder was pretrained on single
    tags too, the UNet trained with kohya's tag dropout; build 5: blue 24/24 -> 16/24)."""
    from collections import Counter

    base = "circle, grey background, large, center"
    rs = readings(flat, base, n=N)
    colour, _ = Counter(r.main.color for r in rs if r.main is not None).most_common(1)[0]
    without = color_share(rs, colour)
    with_neg = color_share(readings(flat, base, negative=colour, n=N), colour)
    assert without >= 0.5 and with_neg <= without - NEG_GAP, (colour, without, with_neg)


@pytest.mark.world
def test_emphasis_moves_colour(flat):
    base = "circle, grey background, large, center"
    strong = color_share(readings(flat, "(red:1.4) " + base, n=N), "red")
    weak = color_share(readings(flat, "(red:0.6) " + base, n=N), "red")
    assert strong >= weak + EMPH_GAP, (strong, weak)


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
    """Build 6 (quick suite): texture flat 0.0075, striped 0.0272, OUT12 0.0225 (76% of the way) with
    shape 83% (the issue's 80%), the reverse split 0.0081."""
    t_flat, t_striped = quick7["texture_energy"], merge_scores["ALL_B"]["texture_energy"]
    assert t_striped > 2 * t_flat, (t_flat, t_striped)
    out12, rev = merge_scores["OUT12"], merge_scores[REVERSE_OUT12]
    # the OUT blocks carry the style: most of the way to striped's texture, the prompt still followed
    assert out12["texture_energy"] >= t_flat + 0.6 * (t_striped - t_flat), merge_scores
    assert out12["shape_accuracy"] >= SHAPE_MIN, merge_scores
    assert out12["background_accuracy"] >= BG_MIN, merge_scores
    # the reverse split (IN blocks from striped) leaves the texture near flat's
    assert rev["texture_energy"] <= t_flat + 0.4 * (t_striped - t_flat), merge_scores


@pytest.mark.world
def test_block_merge_targets(quick7, merge_scores):
    """A texture gap far outside seed noise (baka's own figure; build 6: 0.0197)."""
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


def test_zero_terminal_snr_reaches_black_and_white(flat):
    """Build 6, mean luminance black / white: world-vpred-ztsnr 0.035 / 0.935 (build 5: 0.043 / 0.892,
    before its fine-tune kept CFG off the low-noise steps), world-flat (epsilon) 0.040 / 0.920; the
    ground-truth render of the prompt reads 0.039 / 0.927."""
    from baka.generate.engine import Generator

    vpred = Generator(VPRED, progress=False)

    def lum(gen, bg):
        rs = readings(gen, f"red circle, {bg} background, small, center", n=N)
        return sum(r.luminance for r in rs) / len(rs)

    black, white = lum(vpred, "black"), lum(vpred, "white")
    assert black <= BLACK_MAX and white >= WHITE_MIN, (black, white)
    eps_black, eps_white = lum(flat, "black"), lum(flat, "white")
    assert eps_white - eps_black < white - black, (eps_black, eps_white, black, white)


def test_a_lora_teaches_the_unseen_star(flat):
    """Issue #10: ``world-star`` (baka train, 40 large stars, UNet + text encoder LoCon) draws stars in
    >= 80% of images at weight 1, and world-flat alone never does (it draws the circles / squares /
    triangles it knows). Build 5 with the LoCon: 83% (linear layers only: 67%)."""
    from baka.models.shipped import SHIPPED_NETWORKS

    assert shipped_path("world-star", SHIPPED_NETWORKS).stat().st_size < 3e6
    with_lora = star_scores(flat, N, lora="<lora:world-star:1>")
    assert with_lora["star_share"] >= STAR_MIN and with_lora["color_accuracy"] >= 0.8, with_lora
    assert flat.lora_unmatched == []  # every module of the shipped LoRA found its layer
    without = star_scores(flat, N)
    assert without["star_share"] <= 0.05 and without["color_accuracy"] >= 0.8, without


def test_a_textual_inversion_embedding_used_by_name(tmp_path):
    """Issue #10: ``world-azure`` (baka train ``mode = "embedding"``: one vector, started from ``*``,
    learnt from 40 blue shapes) placed in an embeddings folder: prompts that name it get blue shapes,
    and a negative prompt that names it (a caption, or the word alone) removes the blue the prompt
    otherwise draws. Without the file the same word does neither (build 5: 100% / 0% / 42% with the
    file, 0% / 88% / 100% without)."""
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
    base = "circle, grey background, large, center"  # world-flat draws it blue on every seed
    bases = [base] * 8
    negative = "world-azure " + base
    assert blue(with_file, bases) >= 0.9
    assert blue(with_file, bases, negative) <= 0.2 and blue(without, bases, negative) >= 0.75
    assert blue(with_file, bases, "world-azure") <= 0.65 and blue(without, bases, "world-azure") >= 0.9


def test_esd_erases_the_word_red_and_keeps_the_other_colours(flat):
    """``world-no-red`` (``baka erase world-flat red`` with ESD-x, extracted as a LoRA by ``baka lora
    extract``): the prompt ``red`` mostly no longer draws red (build 6: 23/24 red without the LoRA, 5/24
    with it; build 5: 1/24; ESD-x at twice the LR also leaves 5/24 and costs the other colours), and
    prompts for the other colours keep them. Red *captions* stay red (test_esd_target)."""
    from baka.world.eval import erase_scores

    assert color_share(readings(flat, "red", n=N), "red") >= 0.9
    assert color_share(readings(flat, "red <lora:world-no-red:1>", n=N), "red") <= 0.3
    assert flat.lora_unmatched == []
    erased = erase_scores(flat, "red", 12, lora="<lora:world-no-red:1>")
    assert erased["others_color_accuracy"] >= ESD_OTHERS_MIN, erased


@pytest.mark.world
def test_esd_target(flat):
    """Issue #10's ESD claim: prompts asking for red give red in <= 20% of images while the other
    colours keep >= 85% (the paper's erased-class vs other-classes table)."""
    from baka.world.eval import erase_scores

    erased = erase_scores(flat, "red", N, lora="<lora:world-no-red:1>")
    assert erased["erased_share"] <= ESD_MAX and erased["others_color_accuracy"] >= ESD_OTHERS_MIN, erased


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
