"""The shapes world: renderer determinism, held-out combinations, the judge on ground truth, the CLI."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from baka.world import render as R
from baka.world.score import SCORERS, radial_harmonics, read_image, score

ATTRS = ("color", "shape", "background", "size", "position")


def _sha(img: np.ndarray) -> str:
    return hashlib.sha256(R.png_bytes(img)).hexdigest()


def test_same_seed_same_bytes_and_seeds_differ():
    a = [_sha(R.render_scene(R.sample_scene(7, i))) for i in range(20)]
    b = [_sha(R.render_scene(R.sample_scene(7, i))) for i in range(20)]
    c = [_sha(R.render_scene(R.sample_scene(8, i))) for i in range(20)]
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) >= 18


def test_render_folder_is_deterministic_and_kohya_layout(tmp_path):
    r1 = R.render_folder(tmp_path / "a", 12, seed=3, style="striped")
    R.render_folder(tmp_path / "b", 12, seed=3, style="striped")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files[:2] == ["00000.png", "00000.txt"] and len(files) == 24
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "00003.txt").read_text().strip() == r1.captions[3]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_held_out_never_in_training_and_heldout_split_only_held_out():
    train = [R.sample_scene(0, i) for i in range(3000)]
    assert not any(s.is_held_out() for s in train)
    for s in train:
        for sh in s.shapes:
            assert (sh.color, sh.shape) not in R.HELD_OUT_PAIRS
            assert (sh.color, s.background) not in R.HELD_OUT_BACKGROUNDS
            assert sh.shape not in R.RESERVED_SHAPES
            assert R.allowed_on(sh.color, s.background)
    held = [R.sample_scene(0, i, split="heldout") for i in range(200)]
    assert all(s.is_held_out() for s in held)
    # every vocabulary word is used in training
    tags = {t.strip() for s in train for t in s.caption.replace(",", " ").split()}
    for word in [*R.COLORS, *R.SHAPES, *R.SIZES, *R.POSITIONS, *R.BACKGROUNDS]:
        assert word in tags, word
    assert "star" not in tags
    assert 0.1 < np.mean([len(s.shapes) == 2 for s in train]) < 0.2


def test_caption_format():
    s = R.Scene((R.make_shape("red", "circle", "large", "left"),), "blue")
    assert s.caption == "red circle, blue background, large, left"


@pytest.mark.parametrize("style", R.STYLES)
@pytest.mark.parametrize("split", ["train", "heldout", "star"])
def test_judge_reads_ground_truth(style, split):
    pairs = [
        (read_image(R.render_scene(s)), s)
        for s in (R.sample_scene(11, i, style=style, split=split) for i in range(300))
    ]
    got = score(pairs, [f"{a}_accuracy" for a in ATTRS])
    for a in ATTRS:
        assert got[f"{a}_accuracy"] >= 0.98, (a, got)


def test_judge_texture_luminance_and_reserved_shape():
    s = R.Scene((R.make_shape("red", "square", "large", "center"),), "white", "flat")
    flat, striped = (
        read_image(R.render_scene(s)),
        read_image(R.render_scene(R.Scene(s.shapes, "white", "striped"))),
    )
    assert striped.texture_energy > 10 * max(flat.texture_energy, 1e-3)
    black = read_image(R.render_scene(R.Scene(s.shapes, "black")))
    assert flat.luminance > black.luminance + 0.3
    star = read_image(R.render_scene(R.Scene((R.make_shape("blue", "star", "large", "center"),), "white")))
    assert star.main.shape == "star"
    # misreadings are scored as misses
    wrong = R.Scene((R.make_shape("green", "circle", "small", "right"),), "grey")
    assert score([(flat, wrong)], ["color", "shape", "background", "size", "position"]) == {
        f"{a}_accuracy": 0.0 for a in ATTRS
    }


def test_color_strength_reads_a_faded_colour():
    """The emphasis measure: a shape faded towards its background by w reads w times the palette
    colour's reading (1, less its antialiased edge), any background and colour; no shape reads 0."""
    from baka.world.score import color_strength

    for color, bg, shape in (
        ("red", "grey", "circle"),
        ("blue", "white", "square"),
        ("yellow", "black", "triangle"),
    ):
        scene = R.Scene(shapes=(R.make_shape(color, shape, "large", "center"),), background=bg)
        img, b = R.render_scene(scene).astype(np.float32), np.array(R.BACKGROUNDS[bg], np.float32)
        full = color_strength(img.astype(np.uint8), color, bg)
        assert 0.9 <= full <= 1.0  # below 1 only by the antialiased edge
        for w in (0.4, 0.7):
            faded = np.clip(b + w * (img - b), 0, 255).round().astype(np.uint8)
            assert color_strength(faded, color, bg) == pytest.approx(w * full, abs=0.05), (color, bg, w)
        blank = np.broadcast_to(b, img.shape).astype(np.uint8)
        assert color_strength(blank, color, bg) == 0.0


def test_star_split_and_star_harmonic():
    stars = list(R.scenes(40, seed=3, split="star"))
    assert {s.shapes[0].shape for s in stars} == {"star"} and len({s.caption for s in stars}) > 20
    with pytest.raises(ValueError, match="unknown split"):
        R.sample_scene(0, 0, split="stars")
    # k-fold shapes put their boundary-radius energy at harmonic k: square 4, triangle 3, star 5, circle none
    for shape, k in (("square", 4), ("triangle", 3), ("star", 5)):
        sc = R.Scene((R.make_shape("yellow", shape, "medium", "center"),), "black")
        m = R.render_scene(sc).astype(float).sum(-1) > 100
        h = radial_harmonics(m)
        assert h.argmax() + 1 == k, (shape, h)
    circle = R.render_scene(R.Scene((R.make_shape("yellow", "circle", "large", "center"),), "black"))
    assert radial_harmonics(circle.astype(float).sum(-1) > 100).max() < 0.02


def test_scorer_registry_names_and_hints():
    assert {
        "color_accuracy",
        "shape_accuracy",
        "background_accuracy",
        "mean_luminance",
        "texture_energy",
    } <= set(SCORERS.names())
    assert SCORERS.get("color") is SCORERS.get("color_accuracy")
    from baka.errors import BakaError

    with pytest.raises(BakaError, match="did you mean 'shape_accuracy'"):
        SCORERS.get("shape_acuracy")
    with pytest.raises(BakaError, match="duplicate"):
        SCORERS.add("texture_energy", lambda pairs: 0.0)


def test_world_render_cli(run_cli, tmp_path):
    code, out, _ = run_cli(
        "world", "render", "--n", "5", "-o", tmp_path / "w", "--style", "striped", "--seed", "2"
    )
    assert code == 0 and "[world render]" in out and "style" in out
    assert len(list((tmp_path / "w").glob("*.png"))) == 5
    assert (tmp_path / "w" / "00004.txt").read_text().strip() == R.sample_scene(2, 4, style="striped").caption
    code, _, err = run_cli("world", "render", "--n", "0", "-o", tmp_path / "x")
    assert code == 2 and err.startswith("baka: error:") and "Traceback" not in err
