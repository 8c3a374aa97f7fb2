"""EveryDream2's dataset files: .yaml caption sidecars (main prompt, weighted tags), local.yaml /
global.yaml, batch_id.txt, against tables produced by running EveryDream2's own code."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from baka.errors import BakaError
from baka.train.config import DatasetConfig, Subset
from baka.train.data import Dataset, captions_for
from baka.train.everydream import weighted_tags

DATA = Path(__file__).parent / "data"


def _tree(root: Path, files: dict[str, str], images) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for rel in images:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), "white").save(root / rel)


def _dataset(root: Path, batch_size=1, **kw) -> Dataset:
    sub = Subset(str(root), recursive=True, **kw)
    return Dataset(DatasetConfig([sub], resolution=64, enable_bucket=False, batch_size=batch_size))


def test_weighted_shuffle_matches_everydream2():
    """ED2's weighted shuffle (ImageCaption.get_shuffled_caption, run locally with the same seeds):
    the same random.Random(seed) draws give the same captions, max_caption_length included."""
    table = json.loads((DATA / "ed2_weighted_shuffle.json").read_text())["cases"]
    assert len(table) == 28
    for case in table:
        if case["seed"] is None:  # unshuffled: the tags in the (weight-sorted) order given
            continue
        rng = random.Random(case["seed"])
        tags = weighted_tags(case["main"], case["tags"], case["weights"], case["max_caption_length"], rng)
        assert ", ".join([case["main"], *tags]) == case["caption"], case


def test_weighted_shuffle_draws_by_weight():
    """The first tag is drawn with probability weight / total: 3 : 1 : 1 over 5000 draws."""
    rng = random.Random(0)
    first = Counter(weighted_tags("m", ["a", "b", "c"], [3.0, 1.0, 1.0], 2048, rng)[0] for _ in range(5000))
    assert first["a"] / 5000 == pytest.approx(0.6, abs=0.03)
    assert first["b"] / 5000 == pytest.approx(0.2, abs=0.03)


def test_yaml_local_global_resolve_as_everydream2(tmp_path):
    """Every image's caption and options equal what ED2's Dataset.from_path gives for the same files
    (global.yaml inherited, local.yaml and the number files for the folder's own images, .txt + .yaml
    sidecars united, tags ordered by weight)."""
    ref = json.loads((DATA / "ed2_dataset_cases.json").read_text())
    root = tmp_path / "ds"
    _tree(root, ref["files"], ref["images"])
    items = {it.path.relative_to(root).as_posix(): it for it in _dataset(root).train}
    assert sorted(items) == sorted(ref["images"])
    for rel, want in ref["images"].items():
        it, o = items[rel], items[rel].options
        got = {
            "caption": it.caption,
            "multiply": o.multiply,
            "flip_p": o.flip_p,
            "cond_dropout": o.cond_dropout,
            "loss_scale": o.loss_scale,
            "shuffle_tags": o.shuffle_tags,
            "batch_id": o.batch_id or "default_batch",
            "tag_weights": [t.weight for t in o.weighted] if o.weighted else [],
        }
        want = dict(want, batch_id=want["batch_id"].strip())  # ED2 keeps batch_id.txt's newline
        assert got == want, rel
        assert it.repeats == o.multiply


def test_weighted_tags_shuffle_in_training_captions(tmp_path):
    """A yaml image with shuffle_tags and differing weights: the main prompt first, the heavy tag
    first among the tags more often than the light ones; without shuffle_tags the caption is fixed."""
    files = {
        "x.yaml": "main_prompt: red circle\ntags:\n  - tag: large\n    weight: 4\n  - left\n  - simple\n"
        "shuffle_tags: true\n",
        "y.yaml": "main_prompt: blue circle\ntags:\n  - tag: small\n    weight: 4\n  - right\n",
    }
    _tree(tmp_path, files, ["x.png", "y.png"])
    x, y = sorted(_dataset(tmp_path).train, key=lambda it: it.path.name)
    caps = [captions_for([x, y], 0, step, 0) for step in range(400)]
    assert {c[1] for c in caps} == {"blue circle, small, right"}
    assert all(c[0].startswith("red circle, ") for c in caps)
    second = Counter(c[0].split(", ")[1] for c in caps)
    assert second["large"] > 2 * second["left"] and second["left"] > 40  # 4 : 1 : 1 in expectation


def test_batch_id_keeps_named_batches_apart(tmp_path):
    """ED2's batch_id: a named group's batches hold only its images; its leftover (fewer than a batch)
    joins the shared batches. Accumulation keeps whole micro-batches of one group."""
    files = {"a/batch_id.txt": "alpha", "b/x.yaml": "main_prompt: bee\nbatch_id: beta\n"}
    images = [f"a/{i}.png" for i in range(5)] + ["b/x.png"] + [f"c/{i}.png" for i in range(4)]
    _tree(tmp_path, files, images)
    ds = _dataset(tmp_path, batch_size=2)
    assert Counter(it.options.batch_id for it in ds.train) == {"alpha": 5, "beta": 1, "": 4}
    for epoch in range(10):
        batches = ds.epoch_batches(epoch, 0)
        assert sorted(len(b) for b in batches) == [2, 2, 2, 2, 2]
        ids = [{it.options.batch_id for it in b} for b in batches]
        assert ids.count({"alpha"}) == 2  # 5 alpha images: two batches of their own, one left over
        assert {"beta"} not in ids  # a group smaller than a batch is batched with the rest
        micro_batches = []
        for b in ds.epoch_batches(epoch, 0, accumulation=2):
            micro = [{it.options.batch_id for it in b[i : i + 2]} for i in range(0, len(b), 2)]
            own = [m == {"alpha"} for m in micro]
            assert all(own) or not any(own)  # a step never mixes the group's batches with others
            micro_batches += micro
        assert micro_batches.count({"alpha"}) == 2
        assert ds.epoch_batches(epoch, 0) == batches  # deterministic


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("x.yaml", "main_prompt: a\ntagz: [b]\n", r"x.yaml: unknown key 'tagz'; did you mean 'tags'\?"),
        ("x.yaml", "main_prompt: a\nmultiply: lots\n", r"x.yaml: multiply must be a number"),
        ("x.yaml", "flip_p: 2\n", r"x.yaml: flip_p 2 is out of range \(0 to 1.0\)"),
        ("x.yaml", "tags:\n  - tag: a\n    wieght: 2\n", r"a tag has unknown keys \['wieght'\]"),
        ("x.yaml", "main_prompt: [unclosed\n", r"x.yaml: cannot read EveryDream2 YAML"),
        ("local.yaml", "- a\n- b\n", r"local.yaml: an EveryDream2 YAML file holds a mapping"),
        ("global.yaml", "max_caption_length: -3\n", r"global.yaml: max_caption_length must be"),
        ("batch_id.txt", b"\xff\xfe", r"batch_id.txt: cannot read"),
    ],
)
def test_bad_everydream_files_are_one_clear_error(tmp_path, name, text, match):
    _tree(tmp_path, {} if isinstance(text, bytes) else {name: text}, ["x.png"])
    if isinstance(text, bytes):  # not UTF-8
        (tmp_path / name).write_bytes(text)
    with pytest.raises(BakaError, match=match):
        _dataset(tmp_path)


def test_caption_from_file_name_as_everydream2(tmp_path):
    """ED2's last resort (doc/DATA.md "by Filename", Dataset.__ensure_caption): an image whose files give
    no main prompt takes its file name without extension, up to the first "_", split as a caption;
    hand-computed from that rule."""
    root = tmp_path / "ds"
    files = {
        "b.txt": "a dog,big,  big",  # a caption file wins over the name (and is kept as written)
        "sub/global.yaml": "tags:\n  - tag: in the style of xyz\n",
        "c_1.yaml": "tags:\n  - tag: wet\n    weight: 2\n",  # tags but no main prompt: the name gives it
    }
    ted = "a photo of ted bennet, sitting on a green armchair"
    images = [f"{ted}_1.png", "b_3.png", "b.png", "c_1.png", "sub/cloud strife_2.png", "plain.png"]
    _tree(root, files, images)
    want = {
        f"{ted}_1.png": ted,
        "b_3.png": "b",
        "b.png": "a dog,big,  big",
        "c_1.png": "c, wet",
        "sub/cloud strife_2.png": "cloud strife, in the style of xyz",
        "plain.png": "plain",
    }
    got = {
        it.path.relative_to(root).as_posix(): it.caption
        for it in _dataset(root, caption_from_filename=True).train
    }
    assert got == want
    # off (kohya's rule): no caption file, no class_tokens -> no caption; the yaml tags alone
    off = {it.path.relative_to(root).as_posix(): it.caption for it in _dataset(root).train}
    assert off["b_3.png"] == off["plain.png"] == "" and off["c_1.png"] == "wet"
    assert off["sub/cloud strife_2.png"] == "in the style of xyz"
