"""Does ``make world`` reproduce the shipped files? Runs ``python -m baka.world.build --from-shipped``
(every stage after world-flat, from the installed world-flat; ~83 min on 2 idle cores) into ``--out``
and compares each file it ships with the installed one: tensors bit for bit, and the metadata keys
that differ (training times and session ids are expected to). Stages already in ``--out`` are not
run again, so a second call only compares.

    .venv/bin/python bench/world_repro.py [--out build/world-repro]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def compare(installed: Path, rebuilt: Path) -> tuple[int, int, list[str]]:
    """(tensors, tensors that differ, metadata keys that differ) of two safetensors files."""
    import torch

    from baka.models.io import read_raw

    a, ma = read_raw(installed)
    b, mb = read_raw(rebuilt)
    differ = [k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k])]
    keys = sorted(k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k))
    if "baka_world" in keys:  # the build's figures: name the ones that differ
        x, y = json.loads(ma.get("baka_world", "{}")), json.loads(mb.get("baka_world", "{}"))
        keys.remove("baka_world")
        keys += [f"baka_world.{k}" for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)]
    return len(a), len(differ), keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/world-repro", help="work folder (files: OUT/ship)")
    a = ap.parse_args()
    from baka.world.build import WEIGHTS_DIR

    out = Path(a.out)
    ship = out / "ship"
    cmd = [sys.executable, "-m", "baka.world.build", "--from-shipped", "--out", str(out), "--dest", str(ship)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print("\n| file | tensors | differ | metadata that differs |\n|---|---|---|---|")
    failed = False
    for rebuilt in sorted(ship.rglob("*.safetensors")):
        rel = rebuilt.relative_to(ship)
        n, bad, keys = compare(WEIGHTS_DIR / rel, rebuilt)
        failed |= bad > 0
        print(f"| {rel} | {n} | {bad} | {', '.join(keys) or '-'} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
