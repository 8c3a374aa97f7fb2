"""Outputs: a full disk or a read-only folder is one line naming the path, exit 2, nothing left behind;
temp files of interrupted writes are cleaned up (only stale ones) and reported; non-SD1.x inputs refused."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
import torch

from baka.models.io import describe
from baka.models.safetensors_io import leftover_parts, save_file


def _mount_tmpfs(d, ro=False):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (disk-full / read-only folder)")
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    if ro:
        r = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True)
        if r.returncode:
            subprocess.run(["umount", str(d)])
            pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.decode().strip()}")
    return d


@pytest.fixture
def full_dir(tmp_path):
    d = _mount_tmpfs(tmp_path / "full")
    yield d
    subprocess.run(["umount", "-l", str(d)])


@pytest.fixture
def ro_dir(tmp_path):
    d = _mount_tmpfs(tmp_path / "ro", ro=True)
    yield d
    subprocess.run(["umount", "-l", str(d)])


def _commands(tiny_files, out_dir):
    a, b = tiny_files[:2]
    return {
        "merge": ("merge", a, b, "-o", out_dir / "m.safetensors", "-q"),
        "convert": ("convert", a, "-o", out_dir / "c.safetensors"),
        "convert_ckpt": ("convert", a, "-o", out_dir / "c.ckpt"),
        "convert_diffusers": ("convert", a, "-o", out_dir / "d", "--diffusers"),
    }


def _shown(err: str) -> list[str]:
    """stderr as a terminal shows it: a progress bar redrawn with \r and cleared leaves no line."""
    return [s for ln in err.split("\n") if (s := ln.rsplit("\r", 1)[-1].strip())]


def _check_refused(run_cli, argv, out_dir, cause):
    code, _, err = run_cli(*argv)
    lines = _shown(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("baka: error: "), err
    assert str(argv[argv.index("-o") + 1]) in lines[0] and cause in lines[0], lines[0]
    assert sorted(os.listdir(out_dir)) == [], os.listdir(out_dir)  # no partial file, no temp file


@pytest.mark.parametrize("cmd", ["merge", "convert", "convert_ckpt", "convert_diffusers"])
def test_disk_full(cmd, tiny_files, full_dir, run_cli):
    _check_refused(run_cli, _commands(tiny_files, full_dir)[cmd], full_dir, "No space left on device")


@pytest.mark.parametrize("cmd", ["merge", "convert", "convert_diffusers"])
def test_read_only_folder(cmd, tiny_files, ro_dir, run_cli):
    _check_refused(run_cli, _commands(tiny_files, ro_dir)[cmd], ro_dir, "Read-only file system")


def test_read_only_subfolder_is_named(tiny_files, ro_dir, run_cli):
    out = ro_dir / "new" / "m.safetensors"  # the folder cannot even be created
    code, _, err = run_cli("convert", tiny_files[0], "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(out) in err, err


# --- temp files left by interrupted writes ---------------------------------------------------------------


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temp_files_removed_on_next_write(tmp_path, caplog):
    stale = tmp_path / f".out.safetensors.{_dead_pid()}.abc123.part"  # its writer is gone
    before_boot = tmp_path / ".old.safetensors.1.zz9.part"  # pid 1 is alive but started after this
    live = tmp_path / f".other.safetensors.{os.getpid()}.q1w2e3.part"  # ours: may still be writing
    unrelated = tmp_path / ".notes.part"
    for p in (stale, before_boot, live, unrelated):
        p.write_bytes(b"partial")
    os.utime(before_boot, (0, 0))
    assert {p.name: s for p, s in leftover_parts(tmp_path)} == {
        stale.name: True,
        before_boot.name: True,
        live.name: False,
    }
    with caplog.at_level(logging.WARNING, logger="baka.models"):
        save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    assert not stale.exists() and not before_boot.exists()
    assert live.exists() and unrelated.exists()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum(stale.name in m for m in msgs) == 1 and sum(before_boot.name in m for m in msgs) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, unrelated.name, "x.safetensors"])


def test_temp_name_carries_the_writer_pid(tmp_path):
    seen = []

    def tensors():
        seen.extend(p.name for p in tmp_path.iterdir())
        yield "a", torch.ones(1)

    from baka.models.safetensors_io import TensorSpec, write_stream

    write_stream(tmp_path / "o.safetensors", {"a": TensorSpec(torch.float32, (1,))}, tensors())
    assert len(seen) == 1 and seen[0].endswith(".part")
    assert seen[0].startswith(f".o.safetensors.{os.getpid()}.")


def test_interrupted_write_leaves_nothing(tmp_path):
    from baka.models.safetensors_io import TensorSpec, write_stream

    def tensors():
        yield "a", torch.ones(1)
        raise KeyboardInterrupt

    specs = {"a": TensorSpec(torch.float32, (1,)), "b": TensorSpec(torch.float32, (1,))}
    with pytest.raises(KeyboardInterrupt):
        write_stream(tmp_path / "o.safetensors", specs, tensors())
    assert os.listdir(tmp_path) == []


def test_info_lists_leftover_temp_files(tmp_path, caplog, run_cli):
    model = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 4, 3, 3)}, model)
    left = tmp_path / f".m.safetensors.{_dead_pid()}.x1y2.part"
    left.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="baka.models"):
        info = describe(model, hashes=False)
    assert info["leftover_temp_files"] == [str(left)]
    assert any(str(left) in r.getMessage() for r in caplog.records)
    assert left.exists()  # listing never removes anything


def test_info_on_a_plain_folder_warns_of_leftovers(tmp_path, caplog, run_cli):
    left = tmp_path / f".m.safetensors.{_dead_pid()}.x1y2.part"
    left.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="baka.models"):
        code, _, err = run_cli("info", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1  # not a diffusers folder: one error line
    assert any(str(left) in r.getMessage() for r in caplog.records)


# --- files whose keys are all unknown ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        ["model.diffusion_model.foo"],
        ["model.diffusion_model.input_blocks.0.0.zzz", "cond_stage_model.transformer.bar"],
        ["foo.weight", "bar.bias"],
    ],
)
def test_unknown_keys_refused(keys, tmp_path, tiny_files, run_cli):
    bad = tmp_path / "bad.safetensors"
    save_file({k: torch.ones(2) for k in keys}, bad)
    for argv in (
        ("convert", bad, "-o", tmp_path / "c.safetensors"),
        ("merge", bad, tiny_files[0], "-o", tmp_path / "m.safetensors", "-q"),
        ("merge", tiny_files[0], bad, "-o", tmp_path / "m.safetensors", "-q"),
    ):
        code, _, err = run_cli(*argv)
        assert code == 2 and str(bad) in err and "not a Stable Diffusion checkpoint" in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
