"""bench/gpu.sh --smoke: the prepared GPU benchmark runs end to end on CPU with tiny models, and its
table has every row with numbers on both sides (except what is n/a by design)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^-?\d+(\.\d+)?(e-?\d+)?$")
NA_BY_DESIGN = {("gen.hires", "baka"), ("gen.hires", "ref"), ("merge.s", "ref")}


def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_TIMEOUT": "300"}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--out", str(out), "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=320,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    keys = {r["key"] for r in rows}
    assert {"gen.plain.its", "gen.freeu.s", "gen.lora.its", "gen.lora_fused.s", "gen.hires"} <= keys
    assert {"runtime.one", "runtime.all", "train.its", "merge.s"} <= keys
    for r in rows:
        for side in ("baka", "ref"):
            if (r["key"], side) in NA_BY_DESIGN:
                assert r[f"{side}_text"].startswith("n/a"), r
                continue
            assert r[f"{side}_text"] is None and r[side] is not None and r[side] > 0, (side, r)
    assert json.loads(out.with_suffix(".json").read_text())["smoke"] is True
    text = out.read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| measurement")]
    assert len(table) == len(rows)
    for ln in table:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == 7, ln
        if "hires" in cells[0]:
            assert cells[2] == "n/a (not implemented)"
            continue
        assert NUMBER.match(cells[2]), ln  # baka
        if not cells[3].startswith("n/a"):
            assert NUMBER.match(cells[3]), ln  # reference
            assert re.match(r"^\d+\.\d+x$", cells[5]), ln  # ratio
    assert "error" not in text
    assert "n/a (not implemented)" in text
    # the table is also printed, for a run whose files do not come back
    assert "| measurement | unit | baka |" in proc.stdout
