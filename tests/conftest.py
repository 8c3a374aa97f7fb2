import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from baka.models.io import save_checkpoint  # noqa: E402
from baka.models.tiny import tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sds():
    """Three different tiny SD1.x-topology models (LDM layout, fp32)."""
    return [tiny_checkpoint(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="session")
def tiny_files(tiny_sds, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    paths = []
    for i, sd in enumerate(tiny_sds):
        p = d / f"model{'ABC'[i]}.safetensors"
        save_checkpoint(sd, p)
        paths.append(p)
    return paths


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from baka.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def assert_same_tensors(x: dict, y: dict):
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:5]
    for k in x:
        assert x[k].dtype == y[k].dtype, k
        assert torch.equal(x[k], y[k]), k
