import json

import torch

from baka.models.io import read_raw


def test_merge_cli_preset_and_overrides(tiny_files, tiny_sds, tmp_path, run_cli):
    out = tmp_path / "m.safetensors"
    code, stdout, _ = run_cli(
        "merge", *tiny_files[:2], "-o", out, "--alpha", "ALL_A", "--block", "OUT11=1", "--dtype", "fp16", "-q"
    )
    assert code == 0 and "[merge]" in stdout and "OUT11=1" in stdout
    m, _ = read_raw(out)
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(m[k], tiny_sds[1][k].half())
    k = "model.diffusion_model.output_blocks.10.0.out_layers.3.weight"  # OUT10 stays A
    assert torch.equal(m[k], tiny_sds[0][k].half())


def test_merge_cli_replay_recipe(tiny_files, tmp_path, run_cli):
    first = tmp_path / "1.safetensors"
    assert run_cli("merge", *tiny_files, "-o", first, "-m", "Add difference", "-a", "GRAD_V", "-q")[0] == 0
    second = tmp_path / "2.safetensors"
    assert run_cli("merge", "--recipe", first, "-o", second, "-q")[0] == 0
    assert first.read_bytes() == second.read_bytes()


def test_merge_cli_errors(tiny_files, tmp_path, run_cli):
    code, _, err = run_cli("merge", *tiny_files[:2], "-o", tmp_path / "x.safetensors", "-m", "wieght_sum")
    assert code == 2 and "did you mean 'weight_sum'" in err
    code, _, err = run_cli(
        "merge", tiny_files[0], tmp_path / "nope.safetensors", "-o", tmp_path / "x.safetensors"
    )
    assert code == 2 and "nope.safetensors: no such file" in err
    code, _, err = run_cli("merge", *tiny_files[:2], "-o", tiny_files[0])
    assert code == 2 and "refusing to overwrite" in err


def test_list_commands(run_cli):
    code, out, _ = run_cli("presets")
    assert code == 0 and len(out.strip().splitlines()) == 38 and out.startswith("GRAD_V")
    code, out, _ = run_cli("methods")
    assert code == 0 and "train_difference" in out and "A,B,C" in out


def test_diff_cli(tiny_files, tmp_path, run_cli):
    code, out, _ = run_cli("diff", *tiny_files[:2], "--png", tmp_path / "h.png", "--json")
    rows = json.loads(out[: out.rindex("]") + 1])
    assert code == 0 and len(rows) == 26 and (tmp_path / "h.png").exists()


def test_three_model_ties_from_the_cli(tiny_files, tmp_path, run_cli):
    from baka.merge.methods import METHODS, Ctx

    out = tmp_path / "ties.safetensors"
    code, _, err = run_cli("merge", *tiny_files, "-o", out, "-m", "ties", "-a", "1", "-b", "0.5", "-q")
    assert code == 0, err
    a, b, c = (read_raw(p)[0] for p in tiny_files)
    m, _ = read_raw(out)
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    ties = METHODS.get("ties").fn
    want = ties(a[k].float(), b[k].float(), c[k].float(), Ctx(k, 1.0, 0.5, 0))
    assert torch.allclose(m[k].float(), want, atol=1e-6)
    two = ties(a[k].float(), b[k].float(), None, Ctx(k, 1.0, 0.5, 0))
    assert not torch.allclose(want, two)  # C took part
