from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

from baka.errors import BakaError
from baka.generate import infotext
from baka.generate.engine import Generator, GenParams
from baka.generate.grid import GridContext, run_grid


def test_cli_generate_and_from_png(tiny_files, tmp_path, run_cli):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        "generate",
        tiny_files[0],
        "-p",
        "a cat, (masterpiece:1.2)",
        "-n",
        "lowres",
        "-W",
        64,
        "-H",
        64,
        "--steps",
        3,
        "--seed",
        7,
        "--batch",
        2,
        "--sampler",
        "DPM++ 2M Karras",
        "--freeu",
        "sd1",
        "-o",
        out,
    )
    assert code == 0 and "[generate]" in stdout
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png"]
    text = infotext.read_png(files[1])
    assert "Seed: 8" in text and "Sampler: DPM++ 2M, Schedule type: Karras" in text and "FreeU: " in text
    again = tmp_path / "again"
    assert run_cli("generate", tiny_files[0], "--from-png", files[0], "-o", again)[0] == 0
    a = np.asarray(Image.open(files[0])).astype(int)
    b = np.asarray(Image.open(again / "00000-7.png")).astype(int)
    # image 0 of a batch of 2, regenerated alone: batched math may differ by one level at most
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99


def test_cli_errors(tiny_files, tmp_path, run_cli):
    code, _, err = run_cli("generate", tiny_files[0], "-p", "x", "--sampler", "Eulr a", "-o", tmp_path)
    assert code == 2 and "did you mean 'Euler a'" in err
    png = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(png)
    code, _, err = run_cli("generate", tiny_files[0], "--from-png", png, "-o", tmp_path)
    assert code == 2 and "has no 'parameters' infotext" in err
    code, out, _ = run_cli("samplers")
    assert code == 0 and "DPM++ 2M Karras" in out


def test_vae_swap_changes_decode(tiny_files, tmp_path):
    from baka.models.io import read_raw
    from baka.models.safetensors_io import save_file

    other, _ = read_raw(tiny_files[1])
    vae = save_file(
        {k[len("first_stage_model.") :]: v for k, v in other.items() if k.startswith("first_stage_model.")},
        tmp_path / "other.vae.safetensors",
    )
    p = GenParams("a cat", steps=2, width=64, height=64, seed=1)
    plain = Generator(tiny_files[0], progress=False)(p)[0]
    swapped = Generator(tiny_files[0], vae=vae, progress=False)(p)[0]
    assert not np.array_equal(np.asarray(plain.image), np.asarray(swapped.image))
    assert "VAE: other.vae.safetensors" in swapped.infotext


def test_xy_grid_with_runtime_block_merge(tiny_files, tmp_path, run_cli):
    out = tmp_path / "grid"
    code, _, _ = run_cli(
        "generate",
        tiny_files[0],
        "-p",
        "a cat",
        "-W",
        64,
        "-H",
        64,
        "--steps",
        2,
        "--seed",
        1,
        "--xy",
        "blocks=ALL_A,ALL_B",
        "--xy-y",
        "cfg=3,9",
        "--merge-with",
        tiny_files[1],
        "-o",
        out,
    )
    assert code == 0
    grid = Image.open(out / "00000-grid.png")
    assert grid.size[0] >= 128 and grid.size[1] >= 128
    cells = sorted(out.glob("0000[1-4]-*.png"))
    assert len(cells) == 4
    # the ALL_B column equals generating with model B directly
    gen_b = Generator(tiny_files[1], progress=False)
    b_img = gen_b(GenParams("a cat", steps=2, width=64, height=64, seed=1, cfg=3))[0].image
    assert np.abs(np.asarray(Image.open(cells[1])).astype(int) - np.asarray(b_img)).max() <= 1
    assert not np.array_equal(np.asarray(Image.open(cells[0])), np.asarray(Image.open(cells[1])))


def test_grid_axes(tiny_files):
    gen = Generator(tiny_files[0], progress=False)
    grid, rows = run_grid(
        GridContext(gen),
        GenParams("a", steps=2, width=64, height=64, seed=1),
        "seed=1,2,3",
        "freeu=off|1.3,1.4,0.9,0.2",
        progress=False,
    )
    assert grid.size[0] >= 3 * 64 and len(rows) == 2 and [r.seed for r in rows[0]] == [1, 2, 3]
    assert "FreeU" not in rows[0][0].infotext and 'FreeU: "1.3,1.4,0.9,0.2,2,0,1,0"' in rows[1][0].infotext


def test_grid_prompt_sr(tiny_files):
    """A1111's Prompt S/R: the first value is searched for; each cell replaces it in prompt and negative."""
    gen = Generator(tiny_files[0], progress=False)
    base = GenParams("a red cat, red sky", "red", steps=2, width=64, height=64, seed=1)
    _, rows = run_grid(GridContext(gen), base, "prompt_sr=red|blue|green dog", progress=False)
    got = [r.infotext.split("\n")[:2] for r in rows[0]]
    assert got == [
        ["a red cat, red sky", "Negative prompt: red"],
        ["a blue cat, blue sky", "Negative prompt: blue"],
        ["a green dog cat, green dog sky", "Negative prompt: green dog"],
    ]
    with pytest.raises(BakaError, match="'purple' is not in the prompt"):
        run_grid(GridContext(gen), base, "prompt_sr=purple|red", progress=False)


def test_cli_batch_count_goes_on_from_the_last_seed(tiny_files, tmp_path, run_cli):
    out = tmp_path / "n"
    argv = ["generate", tiny_files[0], "-p", "a cat", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5"]
    code, _, err = run_cli(*argv, "--batch", "2", "--n-iter", "2", "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == [f"0000{i}-{5 + i}.png" for i in range(4)]
    code, _, err = run_cli(*argv, "--n-iter", "0", "-o", out)
    assert code != 0 and "--n-iter 0" in err


def test_xyz_grid_over_merge_parameters(tiny_files, tmp_path, run_cli):
    """One block's weight (X), CFG (Y), model B (Z): each cell's infotext names its merge, and a cell
    equals generating with the merged file written by baka merge."""
    from baka.merge.engine import merge_models
    from baka.merge.recipe import Recipe

    gen = Generator(tiny_files[0], progress=False)
    ctx = GridContext.with_merge(gen, str(tiny_files[1]))
    base = GenParams("a cat", steps=2, width=64, height=64, seed=1)
    grid, rows = run_grid(ctx, base, "IN04=0,1", "cfg=3,5", progress=False,
                          z=f"model_b={tiny_files[1]}|{tiny_files[2]}")  # fmt: skip
    assert len(rows) == 4 and all(len(r) == 2 for r in rows)
    assert grid.size[1] >= 4 * 64 + 2 * 22
    info = rows[2][1].infotext  # z = C, cfg 3, IN04 = 1
    assert "Model: modelA + modelC (weight_sum)" in info and "CFG scale: 3" in info
    weights = ["0"] * 26
    weights[5] = "1"  # IN04
    assert f'Merge weights: "{",".join(weights)}"' in info
    merged = tmp_path / "ac.safetensors"
    alpha = tuple(float(w) for w in weights)
    merge_models(Recipe("weight_sum", [str(tiny_files[0]), str(tiny_files[2])], alpha, (0.0,) * 26), merged,
                 progress=False)  # fmt: skip
    want = Generator(merged, progress=False)(base.replace(cfg=3))[0].image
    assert np.abs(np.asarray(rows[2][1].image).astype(int) - np.asarray(want)).max() <= 1
    gen.patcher.remove(ctx.merger)
    # every block at 0 is A itself: the first cell equals the unmerged model's picture
    plain = np.asarray(gen(base.replace(cfg=3))[0].image).astype(int)
    assert np.abs(np.asarray(rows[0][0].image).astype(int) - plain).max() <= 1
    with pytest.raises(BakaError, match="the IN04 axis needs a second model"):
        run_grid(GridContext(gen), base, "IN04=0,1", progress=False)
    with pytest.raises(BakaError, match="unknown grid axis 'IN4x'"):
        run_grid(GridContext(gen), base, "IN4x=0,1", progress=False)
    out = tmp_path / "cli"
    argv = ["generate", tiny_files[0], "-p", "a cat", "--steps", 2, "-W", 64, "-H", 64, "-o", out]
    code, _, err = run_cli(*argv, "--merge-with", tiny_files[1], "--xy", "OUT11=0,1", "--xy-z", "cfg=3,5")
    assert code == 0, err
    assert len(list(out.glob("*.png"))) == 1 + 4


def test_grid_axes_method_beta_and_model_c(tiny_files, tmp_path, run_cli):
    """The method, beta and model_c axes rebuild the runtime merge between cells; each cell equals the
    file merge of its recipe and its infotext names method, models and betas."""
    from baka.merge.engine import merge_models
    from baka.merge.recipe import Recipe

    a, b, c = (str(p) for p in tiny_files)
    gen = Generator(a, progress=False)
    ctx = GridContext.with_merge(gen, b, model_c=c, beta=0.0)
    base = GenParams("a cat", steps=2, width=64, height=64, seed=1)
    _, rows = run_grid(ctx, base, "method=sum_twice|triple_sum", "beta=0.25,0.75", progress=False)
    for j, beta in enumerate((0.25, 0.75)):
        for i, method in enumerate(("sum_twice", "triple_sum")):
            cell = rows[j][i]
            assert f"Model: modelA + modelB + modelC ({method})" in cell.infotext
            assert f'Merge beta: "{",".join([f"{beta:g}"] * 26)}"' in cell.infotext
            merged = tmp_path / f"{method}-{j}.safetensors"
            recipe = Recipe(method, [a, b, c], (0.0,) * 26, (beta,) * 26)
            merge_models(recipe, merged, progress=False)
            want = np.asarray(Generator(merged, progress=False)(base)[0].image).astype(int)
            assert np.abs(np.asarray(cell.image).astype(int) - want).max() <= 1, (method, beta)
    assert rows[0][0].image.tobytes() != rows[1][0].image.tobytes()  # beta moved the picture
    gen.patcher.remove(ctx.merger)
    with pytest.raises(BakaError, match="need a second model"):
        GridContext.with_merge(gen, None, model_c=c)
    out = tmp_path / "cli"
    argv = ["generate", a, "-p", "a cat", "--steps", 2, "-W", 64, "-H", 64, "-o", out, "--merge-with", b]
    code, _, err = run_cli(
        *argv, "--merge-c", c, "--merge-method", "add_difference", "--xy", f"model_c={c}|{b}"
    )
    assert code == 0, err
    assert "(add_difference)" in Image.open(next(out.glob("*[0-9].png"))).info["parameters"]


def test_grid_cells_shared_between_two_processes(tiny_files, tmp_path, run_cli):
    """Under accelerate launch (two CPU processes, gloo) each process makes half the cells; the grid
    and every cell equal a one-process run's, and only the first process writes."""
    import subprocess
    import sys

    argv = ["generate", str(tiny_files[0]), "-p", "a cat", "--steps", "2", "-W", "64", "-H", "64",
            "--merge-with", str(tiny_files[1]), "--xy", "OUT11=0,1", "--xy-y", "seed=1,2,3"]  # fmt: skip
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as accelerate runs each CPU process: the same sums, the same pictures
    try:
        code, _, err = run_cli(*argv, "-o", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    ]
    res = subprocess.run(
        [*launch, "-m", "baka", *argv, "-o", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "grid: 6 cells made by 2 processes" in res.stdout and res.stdout.count("wrote ") == 1
    one, two = sorted((tmp_path / "one").glob("*.png")), sorted((tmp_path / "two").glob("*.png"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 7
    for a, b in zip(one, two, strict=True):
        diff = np.abs(np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)).max()
        assert diff == 0, a.name
        assert Image.open(a).info.get("parameters") == Image.open(b).info.get("parameters")


def test_grid_elemental_axis_equals_the_file_merge(tiny_files, tmp_path):
    """The elemental axis: each cell's rules (';'-separated) in the runtime merge equal the file merge
    with those rules; its infotext carries them; 'none' is no rules."""
    from baka.merge.engine import merge_models
    from baka.merge.recipe import Recipe

    a, b = str(tiny_files[0]), str(tiny_files[1])
    gen = Generator(a, progress=False)
    ctx = GridContext.with_merge(gen, b, elemental="OUT11::1")
    base = GenParams("a cat", steps=2, width=64, height=64, seed=1)
    rules = ["IN01-IN05:attn:0.8; NOT IN00-OUT05::0.5", "none"]
    _, rows = run_grid(ctx, base, "elemental=" + "|".join(rules), "IN04=0,1", progress=False)
    for j, in04 in enumerate((0.0, 1.0)):
        for i, text in enumerate(rules):
            cell = rows[j][i]
            alpha = [0.0] * 26
            alpha[5] = in04
            el = "" if text == "none" else text
            merged = tmp_path / f"e{i}{j}.safetensors"
            merge_models(Recipe("weight_sum", [a, b], tuple(alpha), (0.0,) * 26, elemental=el), merged,
                         progress=False)  # fmt: skip
            want = np.asarray(Generator(merged, progress=False)(base)[0].image).astype(int)
            assert np.abs(np.asarray(cell.image).astype(int) - want).max() <= 1, (text, in04)
            assert ('Merge elemental: "IN01-IN05:attn:0.8; NOT IN00-OUT05::0.5"' in cell.infotext) == bool(el)
    gen.patcher.remove(ctx.merger)
