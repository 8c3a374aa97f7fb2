"""Real-size SD1.5 block-merge benchmark: baka vs sd-mecha on the same inputs, in the same run.

    make bench            (or: .venv/bin/python bench/merge_bench.py [--rounds N] [--workdir DIR])

Two random real-size SD1.x checkpoints (fp16, 1.07 G parameters, 2.1 GB each) are written once to
the work folder. Each merge runs in a fresh subprocess that reports wall time and peak anonymous
RSS (sampled every 5 ms); tools alternate so both see the same page-cache state. Both tools do the
same block-weighted sum in fp32 with fp16 output; the outputs are compared tensor by tensor.
Then the runtime block merge: re-lerping one changed block into a live real-size UNet vs all 26.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# SMOOTHSTEP has IN00 == BASE, so sd-mecha's choice of BASE for time_embed and ours (IN00) agree.
PRESET = "SMOOTHSTEP"


def _anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1])
    return 0


class PeakAnon:
    def __enter__(self):
        self.base = _anon_kb()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _anon_kb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def child(tool: str, a: str, b: str, out: str) -> None:
    import torch

    from baka.merge.weights import parse_weights

    weights = parse_weights(PRESET)
    if tool == "baka":
        from baka.merge.engine import merge_models
        from baka.merge.recipe import Recipe

        recipe = Recipe("weight_sum", [a, b], weights, parse_weights(0.0), dtype="fp16")
        with PeakAnon() as pk:
            t = time.perf_counter()
            merge_models(recipe, out, progress=False, hash_inputs=False)
            dt = time.perf_counter() - t
    else:
        import sd_mecha

        from baka.models.blocks import BLOCK_IDS

        with PeakAnon() as pk:
            t = time.perf_counter()
            ma, mb = sd_mecha.model(a, "sd1-ldm"), sd_mecha.model(b, "sd1-ldm")
            blocks = sd_mecha.literal(dict(zip(BLOCK_IDS, weights, strict=True)), "sd1-supermerger_blocks")
            alpha = sd_mecha.convert(blocks, ma)
            sd_mecha.merge(
                sd_mecha.weighted_sum(ma, mb, alpha=alpha),
                output=out,
                merge_dtype=torch.float32,
                output_dtype=torch.float16,
                tqdm=_quiet_tqdm(),
            )
            dt = time.perf_counter() - t
    print(
        json.dumps(
            {
                "tool": tool,
                "seconds": dt,
                "peak_anon_mb": (pk.peak - pk.base) / 1024,
                "base_anon_mb": pk.base / 1024,
            }
        )
    )


def _quiet_tqdm():
    from tqdm import tqdm

    class Quiet(tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "disable": True})

    return Quiet


def compare(out_baka: Path, out_mecha: Path) -> dict:
    from baka.models.safetensors_io import SafetensorsFile

    worst, n, common = 0.0, 0, 0
    with SafetensorsFile(out_baka) as x, SafetensorsFile(out_mecha) as y:
        keys = set(x.keys()) & set(y.keys())
        for k in keys:
            common += 1
            ta, tb = x.get(k), y.get(k)
            if ta.is_floating_point():
                d = (ta.float() - tb.float()).abs().max().item()
                worst = max(worst, d)
                n += int(d > 0)
        only = sorted(set(x.keys()) ^ set(y.keys()))
    return {"common_keys": common, "keys_differing": n, "max_abs_diff": worst, "keys_in_one_only": only[:5]}


def runtime_bench(a: str, b: str) -> dict:
    import torch

    from baka.merge.runtime import RuntimeBlockMerge
    from baka.merge.weights import parse_weights
    from baka.models.convert import ldm_to_diffusers
    from baka.models.io import open_source
    from baka.models.pipeline import build_module

    comps = []
    for p in (a, b):
        src = open_source(p)  # memory-mapped: A and B live in the page cache
        comps.append(ldm_to_diffusers({k: src.get(k) for k in src.keys()})[0])
    from baka.models.config import sd15_config

    unet = build_module("unet", sd15_config(), comps[0]["unet"], dtype=torch.float16)
    rt = RuntimeBlockMerge({"unet": unet}, {"unet": comps[0]["unet"]}, {"unet": comps[1]["unet"]})
    w = list(parse_weights(0.5))
    t = time.perf_counter()
    rt.set_weights(tuple(w))
    full = time.perf_counter() - t
    times = []
    for v in (0.1, 0.9, 0.3):
        w[6] = v  # IN05
        t = time.perf_counter()
        assert rt.set_weights(tuple(w)) == ["IN05"]
        times.append(time.perf_counter() - t)
    return {
        "full_remerge_s": full,
        "one_block_s": statistics.median(times),
        "speedup": full / statistics.median(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "A", "B", "OUT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from baka.models.tiny import write_random_checkpoint

    wd = Path(args.workdir).resolve()  # sd-mecha resolves relative paths against its own model dirs
    wd.mkdir(parents=True, exist_ok=True)
    inputs = [wd / "real-a.safetensors", wd / "real-b.safetensors"]
    for seed, p in enumerate(inputs, 1):
        if not p.exists():
            print(f"writing {p} (real-size random SD1.x, fp16)...", flush=True)
            write_random_checkpoint(p, seed)
    for p in inputs:  # warm the page cache for both tools alike
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict[str, list[dict]] = {"baka": [], "sd-mecha": []}
    outs = {"baka": wd / "out-baka.safetensors", "sd-mecha": wd / "out-mecha.safetensors"}
    for r in range(args.rounds):
        for tool in ("baka", "sd-mecha"):
            cmd = [sys.executable, __file__, "--child", tool, str(inputs[0]), str(inputs[1]), str(outs[tool])]
            line = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            res = json.loads(line)
            results[tool].append(res)
            print(
                f"round {r + 1} {tool:<8} {res['seconds']:6.2f} s  peak anon +{res['peak_anon_mb']:7.0f} MB",
                flush=True,
            )
    best = {t: min(x["seconds"] for x in v) for t, v in results.items()}
    mem = {t: max(x["peak_anon_mb"] for x in v) for t, v in results.items()}
    print(
        f"\nmerge time  baka {best['baka']:.2f} s, sd-mecha {best['sd-mecha']:.2f} s: "
        f"baka/sd-mecha = {best['baka'] / best['sd-mecha']:.2f}x time"
    )
    print(
        f"peak anon   baka {mem['baka']:.0f} MB, sd-mecha {mem['sd-mecha']:.0f} MB: "
        f"baka/sd-mecha = {mem['baka'] / max(mem['sd-mecha'], 1):.2f}x memory"
    )
    print("outputs agree:", json.dumps(compare(outs["baka"], outs["sd-mecha"])))
    rt = runtime_bench(str(inputs[0]), str(inputs[1]))
    print(
        f"runtime merge (real-size UNet, fp16): all 26 blocks {rt['full_remerge_s']:.2f} s, "
        f"one block (IN05) {rt['one_block_s']:.3f} s: {rt['speedup']:.0f}x faster"
    )


if __name__ == "__main__":
    main()
