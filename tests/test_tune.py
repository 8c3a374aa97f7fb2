"""``baka merge probe`` / ``baka merge search``: scorers, the per-block probe and the optuna search on
tiny models (image-diff and a user scorer), and the block effect the shapes world must show (style in
the decoder blocks, composition not moved by them)."""

import json
import sqlite3

import pytest
from PIL import Image

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS
from baka.tune.probe import probe_blocks
from baka.tune.scorers import SCORERS, RenderSettings, get_scorer
from baka.tune.search import search_weights

FAST = RenderSettings(["a cat", "a dog"], steps=2, width=64, height=64)


def test_image_diff_scorer_by_hand():
    ref = [Image.new("RGB", (4, 4), (100, 100, 100))]
    img = Image.new("RGB", (4, 4), (100, 100, 100))
    img.putpixel((0, 0), (255, 0, 0))
    f = get_scorer("image-diff").fn([img], ["p"], ref)
    # one pixel of 16 moved by (155, 100, 100) / 255 per channel
    assert f["pixel_diff"] == pytest.approx((155 + 100 + 100) / 255 / 48)
    assert f["luma_shift"] == pytest.approx((0.299 * 255 - 100) / 255 / 16)
    assert f["saturation_shift"] == pytest.approx(1 / 16)
    assert f["score"] == pytest.approx(1 - f["pixel_diff"])
    assert get_scorer("image-diff").fn(ref, ["p"], ref)["pixel_diff"] == 0


def test_scorer_registry_and_user_callables(tmp_path):
    assert {"world", "image-diff"} <= set(SCORERS.names())
    with pytest.raises(BakaError, match="did you mean 'world'"):
        get_scorer("wrld")
    f = tmp_path / "myscore.py"
    f.write_text(
        "def bright(images, prompts):\n    return sum(i.convert('L').getpixel((0, 0)) for i in images)\n"
    )
    s = get_scorer(f"{f}:bright")
    assert s.fn([Image.new("RGB", (2, 2), (9, 9, 9))] * 2, ["p"], None) == {"score": 18.0}
    with pytest.raises(BakaError, match="has no function 'nope'"):
        get_scorer(f"{f}:nope")
    with pytest.raises(BakaError, match="cannot import"):
        get_scorer("no_such_module_xyz:f")
    with pytest.raises(BakaError, match="needs prompts"):
        RenderSettings().for_scorer(get_scorer("image-diff"))
    with pytest.raises(BakaError, match="its own prompt set"):
        RenderSettings(["x"]).for_scorer(get_scorer("world"))
    w = RenderSettings().for_scorer(get_scorer("world"))
    assert (w.width, w.height) == (64, 64) and len(w.prompts) == 18


def test_probe_on_tiny_models(tiny_files, run_cli, tmp_path):
    r = probe_blocks(
        tiny_files[0], tiny_files[1], "image-diff", FAST, blocks=["IN04", "out11"], progress=False
    )
    assert list(r.blocks) == ["IN04", "OUT11"]
    assert r.base["pixel_diff"] == 0  # A against itself
    assert r.full["pixel_diff"] > 0.01 and all(f["pixel_diff"] > 0 for f in r.blocks.values())
    assert r.effects()["IN04"]["pixel_diff"] == r.blocks["IN04"]["pixel_diff"]
    png, js = tmp_path / "probe.png", tmp_path / "probe.json"
    code, out, err = run_cli(
        "merge", "probe", tiny_files[0], tiny_files[1], "--score", "image-diff", "--prompt", "a cat",
        "--steps", 2, "--width", 64, "--height", 64, "--blocks", "M00", "--png", png, "--json", js, "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "[merge probe]" in out and "M00" in out and Image.open(png).size[0] > 100
    assert json.loads(js.read_text())["blocks"]["M00"]["pixel_diff"] > 0


def test_search_finds_the_known_best_and_resumes(tiny_files, tmp_path, run_cli):
    """Objective: closeness to A's pictures (image-diff score), so the best weights are A's own (0);
    the study runs A (enqueued) first, so its best is exactly 1.0 with every searched weight 0."""
    db = tmp_path / "s.db"
    r = search_weights(
        tiny_files[0], tiny_files[1], "image-diff", FAST, trials=4, study=db, blocks=["IN04", "OUT11"],
        output=tmp_path / "best.safetensors", progress=False,
    )  # fmt: skip
    assert r.trials == 4 and r.best_value == 1.0 and r.best_weights == [0.0] * 26
    assert len(r.values) == 4 and all(v is not None and v <= 1 for v in r.values)
    recipe = json.loads(r.recipe.read_text())
    assert recipe["method"] == "weight_sum" and recipe["alpha"] == [0.0] * 26
    assert r.plot.is_file() and r.model.is_file()
    # a resumed study runs only the missing trials; the SQLite file holds them all
    r2 = search_weights(tiny_files[0], tiny_files[1], "image-diff", FAST, trials=6, study=db,
                        blocks=["IN04", "OUT11"], progress=False)  # fmt: skip
    assert r2.trials == 6 and r2.values[:4] == r.values
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from trials").fetchone()[0] == 6
    # other settings under the same study name are refused, not mixed in
    with pytest.raises(BakaError, match="other settings"):
        search_weights(tiny_files[0], tiny_files[1], "image-diff", FAST, trials=7, study=db,
                       blocks=["IN05"], progress=False)  # fmt: skip
    # the CLI spelling, minimising the pixel difference: same best
    code, out, err = run_cli(
        "merge", "search", tiny_files[0], tiny_files[1], "--score", "image-diff", "--prompt", "a cat",
        "--steps", 2, "--width", 64, "--height", 64, "--trials", 3, "--study", tmp_path / "t.db",
        "--objective", "pixel_diff", "--minimize", "--blocks", "BASE", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "best 0.0000 after 3 trials" in out


def test_search_is_reproducible(tiny_files, tmp_path):
    kw = dict(trials=4, blocks=["IN04", "M00", "OUT11"], progress=False)
    a = search_weights(tiny_files[0], tiny_files[1], "image-diff", FAST, study=tmp_path / "a.db", **kw)
    b = search_weights(tiny_files[0], tiny_files[1], "image-diff", FAST, study=tmp_path / "b.db", **kw)
    assert a.values == b.values


def test_world_probe_finds_the_style_blocks():
    """world-flat (A) vs world-striped (B), leave-out mode: the stripes (texture energy) live in the
    decoder's OUT09, not in IN05 or M00 (docs/world.md has the full 26-block table)."""
    r = probe_blocks("world-flat", "world-striped", "world", RenderSettings(), mode="leave-out",
                     blocks=["OUT09", "IN05", "M00"], progress=False)  # fmt: skip
    assert r.full["texture_energy"] > 3 * r.base["texture_energy"]  # B draws stripes
    eff = r.effects()
    assert eff["OUT09"]["texture_energy"] < -0.005  # without OUT09 a third of B's stripes are gone
    assert abs(eff["IN05"]["texture_energy"]) < 0.001 and abs(eff["M00"]["texture_energy"]) < 0.001
    assert set(eff) == {"OUT09", "IN05", "M00"} and set(BLOCK_IDS) >= set(eff)


def test_search_with_another_method_and_its_beta(tiny_files, tmp_path, run_cli):
    """add difference with model C, each searched block's beta too (TIES): the recipe holds the method,
    the three models and the betas of the best trial; the written model replays it."""
    r = search_weights(
        tiny_files[0], tiny_files[1], "image-diff", FAST, trials=3, study=tmp_path / "m.db", blocks=["OUT11"],
        method="ties", model_c=tiny_files[2], search_beta=True, output=tmp_path / "best.safetensors",
        progress=False,
    )  # fmt: skip
    recipe = json.loads(r.recipe.read_text())
    assert recipe["method"] == "ties" and len(recipe["models"]) == 3
    assert recipe["beta"][25] == r.best_beta[25] and recipe["beta"][0] == 0.2  # TIES' default elsewhere
    from baka.merge.recipe import Recipe

    assert Recipe.from_file(r.model).beta == tuple(recipe["beta"])  # the model carries the same recipe
    with pytest.raises(BakaError, match="has no beta to search"):
        search_weights(tiny_files[0], tiny_files[1], "image-diff", FAST, trials=1, study=tmp_path / "x.db",
                       search_beta=True, progress=False)  # fmt: skip
    code, out, err = run_cli(
        "merge", "probe", tiny_files[0], tiny_files[1], "--score", "image-diff", "--prompt", "a cat",
        "--steps", 2, "--width", 64, "--height", 64, "--blocks", "IN04", "-m", "add_difference",
        "--model-c", tiny_files[2], "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "add_difference" in out  # the effective config names the method
