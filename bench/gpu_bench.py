"""One prepared GPU benchmark: baka beside plain diffusers (and sd-mecha), measured in the same run.

    bench/gpu.sh                 (GPU: real-size random SD1.5 weights in fp16, under 8 minutes)
    bench/gpu.sh --smoke         (CPU: tiny SD1.x-topology models, 64 px, a few steps; what CI runs)
    python bench/gpu_bench.py [--smoke] [--out bench/out/gpu.md] [--workdir bench/out] [--budget S]

Nothing is downloaded: the models are random weights written by ``baka.models.tiny``, the LoRA is a
random kohya-format network, the training set is random images with random captions.

Sections (each guarded: a failure is printed in its rows and the others still run; after every
section the table so far is written to ``--out`` and printed, so a partial run still reports):

1. generation: ``Generator`` vs ``StableDiffusionPipeline.__call__`` on the very same pipeline object
   (as bench/generate_bench.py), Euler a, CFG 7; it/s of the denoising loop (CUDA events at step ends)
   and wall time per image (prompt encoding and VAE decode included), with and without FreeU (baka's
   hook patch vs ``unet.enable_freeu``), with and without a LoRA (baka's reversible weight patch from a
   ``<lora:...>`` tag vs ``pipe.load_lora_weights``, unfused as diffusers leaves it, and after
   ``fuse_lora``). Hires fix: baka has none yet, so that row says so.
2. runtime block merge: ``RuntimeBlockMerge.set_weights`` re-lerping one changed block vs all 26, beside
   the plain way (lerp every A/B tensor and ``load_state_dict`` into the live modules).
3. LoRA training: ``baka train`` (the CLI entry, in-process) on a generated dataset vs a minimal plain
   torch + diffusers LoRA loop of the same shape written here (not copied from diffusers' example
   script, which cannot be fetched on an offline machine; like it: frozen weights in fp16, LoRA weights
   fp32, autocast fp16 + GradScaler, AdamW; LoRA on the same modules baka targets, hand-written,
   peft-free). Latents are cached on both sides (baka caches them in its first epoch, inside warm-up).
4. merge: baka's streaming merge (bench/merge_bench.py's child, a fresh process per run) vs sd-mecha
   when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
PROMPT = "a photo of a cat, masterpiece, best quality"
NEGATIVE = "lowres, blurry"
LORA_NAME = "benchlora"
LORA_DIM = 16  # generation LoRA
TRAIN_DIM = 8  # training LoRA rank (= alpha)


class Timeout(BaseException):
    """SIGTERM (from ``timeout``) or the time budget: stop, but still write the table."""


# ----------------------------------------------------------------------------------------------------
# rows and the table


@dataclass
class Row:
    key: str
    what: str
    unit: str
    ref_name: str = "diffusers"
    baka: float | None = None
    ref: float | None = None
    baka_text: str | None = None  # replaces the number (n/a, errors)
    ref_text: str | None = None
    note: str = ""


def planned_rows(gen_desc: str, train_desc: str) -> list[Row]:
    rows = []
    for key, label in (
        ("plain", "no FreeU, no LoRA"),
        ("freeu", "FreeU v1 (b1 1.3, b2 1.4, s1 0.9, s2 0.2)"),
        ("lora", f"LoRA dim {LORA_DIM} (diffusers: load_lora_weights, unfused)"),
        ("lora_fused", f"LoRA dim {LORA_DIM} (diffusers: after fuse_lora)"),
    ):
        rows.append(Row(f"gen.{key}.its", f"generate {gen_desc}, {label}", "it/s"))
        rows.append(Row(f"gen.{key}.s", f"generate {gen_desc}, {label}", "s/image"))
    rows.append(
        Row(
            "gen.hires",
            f"generate {gen_desc}, hires fix",
            "s/image",
            baka_text="n/a (not implemented)",
            ref_text="n/a",
        )
    )
    rows.append(
        Row(
            "runtime.one",
            "runtime block merge: set_weights, one block (IN05) changed",
            "s",
            ref_name="plain: lerp all + load_state_dict",
        )
    )
    rows.append(
        Row(
            "runtime.all",
            "runtime block merge: set_weights, all 26 blocks changed",
            "s",
            ref_name="plain: lerp all + load_state_dict",
        )
    )
    rows.append(
        Row("train.its", f"LoRA training {train_desc}", "it/s", ref_name="plain torch+diffusers loop")
    )
    rows.append(
        Row(
            "merge.s",
            "block merge to file (weight_sum, SMOOTHSTEP, fp32 math, fp16 out)",
            "s",
            ref_name="sd-mecha",
        )
    )
    return rows


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if abs(v) >= 0.01 else f"{v:.3g}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def ratio(r: Row) -> str:
    if r.baka is None or r.ref is None or r.baka_text or r.ref_text or not r.ref:
        return "-"
    x = r.baka / r.ref
    digits = 3 if x >= 0.1 else min(8, 2 - math.floor(math.log10(x))) if x > 0 else 3
    return f"{x:.{digits}f}x"


def table(rows: list[Row]) -> str:
    lines = [
        "| measurement | unit | baka | reference | reference is | baka / reference | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r.baka_text if r.baka_text is not None else fmt(r.baka)
        ref = r.ref_text if r.ref_text is not None else fmt(r.ref)
        lines.append(
            "| " + " | ".join(cell(x) for x in (r.what, r.unit, b, ref, r.ref_name, ratio(r), r.note)) + " |"
        )
    return "\n".join(lines)


def error_text(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {line}"[:160]


# ----------------------------------------------------------------------------------------------------
# timing helpers


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Marks at the end of each denoising step: CUDA events (no sync inside the loop) or wall time."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def its(self) -> float:
        """Steps per second between the first and the last step end (call after sync)."""
        n = len(self.marks) - 1
        if n < 1:
            return float("nan")
        if self.cuda:
            dt = self.marks[0].elapsed_time(self.marks[-1]) / 1000
        else:
            dt = self.marks[-1] - self.marks[0]
        return n / dt


def measure(call, clock: StepClock, repeat: int, warmup: bool = True) -> tuple[float, float]:
    """(median seconds per call, median it/s) after one warm-up call."""
    if warmup:
        call()
    secs, its = [], []
    for _ in range(repeat):
        clock.marks = []
        sync()
        t = time.perf_counter()
        call()
        sync()
        secs.append(time.perf_counter() - t)
        its.append(clock.its())
    return statistics.median(secs), statistics.median(its)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.smoke = a.smoke
        self.cuda = a.device == "cuda"
        self.device = a.device
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.work = Path(a.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(a.out)
        self.deadline = time.monotonic() + a.budget if a.budget else None
        if self.smoke:
            self.size, self.steps, self.repeat = 64, 3, 1
            self.train_res, self.train_batch, self.train_warm, self.train_steps = 64, 4, 2, 3
            self.merge_rounds = 1
        else:
            self.size, self.steps, self.repeat = 512, 20, 3
            self.train_res, self.train_batch, self.train_warm, self.train_steps = 512, 4, 5, 30
            self.merge_rounds = 2
        self.gen_desc = f"{self.size}x{self.size} {self.steps} steps Euler a CFG 7"
        self.train_desc = (
            f"{self.train_res}px batch {self.train_batch}, rank {TRAIN_DIM}, "
            f"{self.train_steps} steps after {self.train_warm} warm-up"
        )
        self.rows = planned_rows(self.gen_desc, self.train_desc)
        self.by_key = {r.key: r for r in self.rows}
        self.started = time.time()
        self.log: list[str] = []

    # --- bookkeeping ---------------------------------------------------------------------------------

    def left(self) -> float:
        """Seconds left of ``--budget`` (infinite without one)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def row(self, key: str) -> Row:
        return self.by_key[key]

    def set(self, key: str, baka: float | None = None, ref: float | None = None, note: str | None = None):
        r = self.row(key)
        if baka is not None:
            r.baka, r.baka_text = baka, None
        if ref is not None:
            r.ref, r.ref_text = ref, None
        if note:
            r.note = f"{r.note}; {note}" if r.note else note

    def fail(self, keys: list[str], side: str, e: BaseException) -> None:
        """Mark ``side`` (baka / ref / both) of rows that have no value there yet."""
        msg = error_text(e)
        for k in keys:
            r = self.row(k)
            if side in ("baka", "both") and r.baka is None and r.baka_text is None:
                r.baka_text = msg
            if side in ("ref", "both") and r.ref is None and r.ref_text is None:
                r.ref_text = msg

    @contextlib.contextmanager
    def guard(self, keys: list[str], side: str = "both"):
        try:
            yield
        except Exception as e:
            print(f"  ! {error_text(e)}", flush=True)
            traceback.print_exc()
            self.fail(keys, side, e)

    def section(self, name: str, keys: list[str], fn) -> None:
        if self.a.only and name.split()[0] not in self.a.only:
            for k in keys:
                r = self.row(k)
                r.baka_text = r.baka_text or "not run (--only)"
                r.ref_text = r.ref_text or "not run (--only)"
            return
        if self.left() < 30:
            for k in keys:
                r = self.row(k)
                r.baka_text = r.baka_text or "skipped (time budget)"
                r.ref_text = r.ref_text or "skipped (time budget)"
            print(f"== {name}: skipped (time budget)", flush=True)
            return
        print(f"== {name} ...", flush=True)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            with self.guard(keys):
                fn()
        finally:
            free_memory()
            dt = time.perf_counter() - t
            self.log.append(f"{name}: {dt:.1f} s")
            if self.smoke:
                self.log[-1] += f" (CPU {time.process_time() - cpu:.1f} s in this process)"
            print(f"== {name}: done in {dt:.1f} s", flush=True)
            print(table([self.row(k) for k in keys]), flush=True)
            self.write()

    def header(self) -> str:
        import diffusers
        import transformers

        import baka

        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            dev = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        else:
            dev = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU)"
        peft = importlib.util.find_spec("peft") and __import__("peft").__version__
        mecha = "not installed"
        if importlib.util.find_spec("sd_mecha"):
            from importlib.metadata import version

            mecha = version("sd-mecha")
        model = (
            "tiny SD1.x topology (smoke)"
            if self.smoke
            else "random real-size SD1.5 weights (UNet 860M), fp16"
        )
        return "\n".join(
            [
                f"### {'Smoke run (tiny models)' if self.smoke else 'Real-size run'}: {dev}",
                "",
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))}; baka {baka.__version__}, "
                f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
                f"{transformers.__version__}, peft {peft or 'not installed'}, sd-mecha {mecha}; "
                f"python {platform.python_version()}.",
                f"Command: `bench/gpu.sh{' --smoke' if self.smoke else ''}`. Models: {model}; "
                f"{'fp16' if self.cuda else 'fp32'} on {self.device}. Generation: median of {self.repeat} "
                f"{'(no warm-up)' if self.smoke else 'after one warm-up'}, same pipeline object for both "
                "sides, it/s of the denoising loop, "
                "s/image wall time including prompt encoding and VAE decode. Ratios are baka / reference "
                "(it/s: higher is better; seconds: lower is better).",
            ]
        )

    def write(self) -> None:
        text = self.header() + "\n\n" + table(self.rows) + "\n\nSection times: " + ", ".join(self.log) + "\n"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)
        self.out.with_suffix(".json").write_text(
            json.dumps({"smoke": self.smoke, "rows": [asdict(r) for r in self.rows]}, indent=1)
        )
        return text

    # --- inputs ----------------------------------------------------------------------------------------

    def checkpoint(self, which: str) -> Path:
        """Model A (seed 1) or B (seed 2); real-size files are kept in the work folder for reruns."""
        from baka.models.tiny import write_random_checkpoint  # [baka API]

        seed = {"a": 1, "b": 2}[which]
        if self.smoke:
            p = self.work / f"tiny-{which}.safetensors"
            if not p.exists():
                write_random_checkpoint(p, seed, real_size=False, dtype=torch.float32)
            return p
        p = self.work / f"real-{which}.safetensors"  # the same files bench/merge_bench.py writes
        if not p.exists():
            t = time.perf_counter()
            print(f"  writing {p} (real-size random SD1.5, fp16) ...", flush=True)
            write_random_checkpoint(p, seed, real_size=True)
            print(f"  ... {time.perf_counter() - t:.1f} s", flush=True)
        return p

    def lora_file(self, unet, text_encoder) -> Path:
        """A random kohya-format LoRA over the targets of baka's training network (UNet + TE)."""
        from baka.models.safetensors_io import save_file  # [baka API]
        from baka.train.config import NetworkConfig  # [baka API]
        from baka.train.network import LoRANetwork  # [baka API]

        d = self.work / "lora"
        p = d / f"{LORA_NAME}.safetensors"
        net = LoRANetwork(unet, text_encoder, NetworkConfig(dim=LORA_DIM, alpha=LORA_DIM))
        net.remove()  # only its module list is wanted; the live pipeline stays untouched
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in net.lora.values():
                m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=gen) * 0.01)
        d.mkdir(parents=True, exist_ok=True)
        save_file(net.kohya_state_dict(torch.float16), p, {"ss_network_dim": str(LORA_DIM)})
        self.lora_modules = len(net.lora)
        return p

    def dataset(self) -> Path:
        """Random RGB images with random tag captions."""
        import numpy as np
        from PIL import Image

        d = self.work / f"dataset-{self.train_res}"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        tags = ["1girl", "cat", "red", "blue", "forest", "city", "night", "smile", "solo", "sky", "hat"]
        for i in range(8):
            img = d / f"img{i}.png"
            if not img.exists():
                arr = rng.integers(0, 256, (self.train_res, self.train_res, 3), dtype=np.uint8)
                Image.fromarray(arr).save(img)
                (d / f"img{i}.txt").write_text(", ".join(rng.choice(tags, 5, replace=False)))
        return d

    # --- 1. generation ----------------------------------------------------------------------------------

    def generation(self) -> None:
        from diffusers import EulerAncestralDiscreteScheduler

        from baka.generate.engine import Generator, GenParams  # [baka API]
        from baka.generate.freeu import FreeU  # [baka API]

        path = self.checkpoint("a")
        lora_dir = self.work / "lora"
        gen = Generator(path, dtype=self.dtype, device=self.device, progress=False, lora_dirs=[lora_dir])
        pipe = gen.pipe
        self.lora_file(pipe.unet, pipe.text_encoder)
        with torch.no_grad():  # random weights: does the fp16 VAE give NaNs (baka then retries in fp32)?
            z = torch.randn(
                1,
                pipe.vae.config.latent_channels,
                self.size // 8,
                self.size // 8,
                generator=torch.Generator().manual_seed(1),
            )
            img = pipe.vae.decode(z.to(self.device, self.dtype) / pipe.vae.config.scaling_factor).sample
            if torch.isnan(img).any():
                self.set("gen.plain.s", note="VAE gives NaNs in fp16 on these weights: baka decodes twice")
        clock = StepClock(self.cuda)
        gen.on_step = lambda i, total: clock.mark()
        params = GenParams(
            PROMPT,
            NEGATIVE,
            steps=self.steps,
            sampler="Euler a",
            cfg=7,
            seed=1,
            width=self.size,
            height=self.size,
        )

        def on_step(_pipe, i, t, kw):
            clock.mark()
            return kw

        def plain(**extra):
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(gen.base_scheduler)
            pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                num_inference_steps=self.steps,
                guidance_scale=7,
                width=self.size,
                height=self.size,
                generator=torch.Generator().manual_seed(1),
                output_type="pil",
                callback_on_step_end=on_step,
                **extra,
            )

        def record(key: str, side: str, call) -> None:
            s, its = measure(call, clock, self.repeat, warmup=not self.smoke)  # smoke: CI time
            kw = {side: its}
            self.set(f"gen.{key}.its", **kw)
            self.set(f"gen.{key}.s", **{side: s})
            print(f"  {key:<10} {side:<4} {its:8.2f} it/s  {s:8.3f} s/image", flush=True)

        keys = lambda k: [f"gen.{k}.its", f"gen.{k}.s"]  # noqa: E731
        with self.guard(keys("plain"), "ref"):
            record("plain", "ref", plain)
        with self.guard(keys("plain"), "baka"):
            record("plain", "baka", lambda: gen(params))

        freeu = FreeU(1.3, 1.4, 0.9, 0.2, version=1)

        def plain_freeu():
            pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
            try:
                plain()
            finally:
                pipe.unet.disable_freeu()

        with self.guard(keys("freeu"), "ref"):
            record("freeu", "ref", plain_freeu)
        with self.guard(keys("freeu"), "baka"):
            record("freeu", "baka", lambda: gen(params.replace(freeu=freeu)))

        # baka's LoRA before diffusers' (load_lora_weights wraps the pipeline's modules)
        lora_params = params.replace(prompt=f"{PROMPT} <lora:{LORA_NAME}:1>")
        with self.guard(keys("lora") + keys("lora_fused"), "baka"):
            record("lora", "baka", lambda: gen(lora_params))
            self.set(
                "gen.lora.s",
                note=f"file: {self.lora_modules} modules, baka: {len(gen.lora_unmatched)} of them unmatched",
            )
            for k in keys("lora"):
                r = self.row(k)
                self.set(k.replace("lora", "lora_fused"), baka=r.baka)
            self.set("gen.lora_fused.its", note="baka value: same run as the row above")
        with self.guard(keys("lora") + keys("lora_fused"), "ref"):
            pipe.load_lora_weights(
                str(lora_dir), weight_name=f"{LORA_NAME}.safetensors", adapter_name="bench"
            )
            try:
                wrapped = sum(
                    hasattr(m, "lora_A") for c in (pipe.unet, pipe.text_encoder) for m in c.modules()
                )
                self.set("gen.lora.s", note=f"diffusers: {wrapped} layers with a LoRA adapter")
                record("lora", "ref", plain)
                with self.guard(keys("lora_fused"), "ref"):
                    pipe.fuse_lora()
                    record("lora_fused", "ref", plain)
                    pipe.unfuse_lora()
            finally:
                pipe.unload_lora_weights()

    # --- 2. runtime block merge -------------------------------------------------------------------------

    def runtime(self) -> None:
        from baka.generate.engine import Generator  # [baka API]
        from baka.merge.runtime import RuntimeBlockMerge  # [baka API]
        from baka.models.blocks import BLOCK_IDS  # [baka API]
        from baka.models.io import load_checkpoint  # [baka API]

        path_a, path_b = self.checkpoint("a"), self.checkpoint("b")
        gen = Generator(path_a, dtype=self.dtype, device=self.device, progress=False)
        # [baka API] the runtime merge is a patch applied through the generator's patcher
        rt = gen.patcher.apply(RuntimeBlockMerge.against(gen.ckpt, path_b))
        n = len(BLOCK_IDS)
        one = BLOCK_IDS.index("IN05")

        def timed(fn) -> float:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t

        rt.set_weights((0.3,) * n)  # warm-up: pages A and B in, first copies
        full = [timed(lambda v=v: rt.set_weights((v,) * n)) for v in (0.5, 0.7)]
        w = [0.7] * n
        singles = []
        for v in (0.1, 0.9, 0.3):
            w[one] = v
            changed: list = []
            singles.append(timed(lambda c=changed: c.extend(rt.set_weights(tuple(w)))))
            if changed != ["IN05"]:
                raise RuntimeError(f"set_weights recomputed {changed}, expected ['IN05']")
        self.set("runtime.all", baka=statistics.median(full))
        self.set("runtime.one", baka=statistics.median(singles))
        print(
            f"  baka set_weights: all {statistics.median(full):.4f} s, one {statistics.median(singles):.4f} s"
        )

        # plain: lerp every tensor of the three components and load_state_dict into the live modules
        with self.guard(["runtime.one", "runtime.all"], "ref"):
            a = gen.ckpt.components()  # [baka API] the generator's loaded checkpoint (A)
            b = load_checkpoint(path_b).components()
            mods = {"unet": gen.pipe.unet, "text_encoder": gen.pipe.text_encoder, "vae": gen.pipe.vae}

            def plain_full(v: float) -> int:
                done = 0
                with torch.no_grad():
                    for comp, mod in mods.items():
                        sd = {}
                        for k, t in mod.state_dict().items():
                            src = k if k in a[comp] else "text_model." + k
                            if not t.is_floating_point():
                                continue
                            if src not in a[comp]:
                                raise KeyError(f"{comp}.{k} has no A/B tensor")
                            sd[k] = torch.lerp(a[comp][src].float(), b[comp][src].float(), v).to(t.dtype)
                        mod.load_state_dict(sd, strict=False)
                        done += len(sd)
                return done

            n_tensors = plain_full(0.3)
            self.set("runtime.all", note=f"plain: {n_tensors} tensors of UNet, text encoder and VAE")
            ref = statistics.median([timed(lambda v=v: plain_full(v)) for v in (0.5, 0.7)])
            self.set("runtime.one", ref=ref)
            self.set("runtime.all", ref=ref)
            print(f"  plain full re-merge + load_state_dict: {ref:.4f} s")

    # --- 3. LoRA training ---------------------------------------------------------------------------------

    def training(self) -> None:
        path = self.checkpoint("a")
        data = self.dataset()
        for side, fn in (("baka", self.train_baka), ("ref", self.train_plain)):
            free_memory()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            with self.guard(["train.its"], side):
                its, note = fn(path, data)
                if self.cuda:
                    note += f", peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                self.set("train.its", **{side: its}, note=note)
                print(f"  {side}: {its:.3f} it/s ({note})", flush=True)

    def train_baka(self, path: Path, data: Path) -> tuple[float, str]:
        from baka.cli import main as baka_main  # [baka API] the `baka train` entry point
        from baka.train.optim import OPTIMIZERS  # [baka API] optimizer registry

        marks: list[float] = []

        class ClockedAdamW(torch.optim.AdamW):
            """AdamW that timestamps the end of every step (zero_grad runs once per step, also when
            the fp16 GradScaler skips an update)."""

            def zero_grad(self, set_to_none: bool = True) -> None:
                super().zero_grad(set_to_none=set_to_none)
                sync()
                marks.append(time.perf_counter())

        name = f"BenchClockedAdamW{id(ClockedAdamW)}"
        OPTIMIZERS.add(name, ClockedAdamW)
        out = self.work / "train-baka"
        total = self.train_warm + self.train_steps
        toml = self.work / "train-baka.toml"
        toml.write_text(
            "\n".join(
                [
                    f"model = {json.dumps(str(path))}",
                    f"output_dir = {json.dumps(str(out))}",
                    'output_name = "bench"',
                    'mode = "lora"',
                    f"max_steps = {total}",
                    "learning_rate = 1e-4",
                    f'optimizer = "{name}"',
                    f'mixed_precision = "{"fp16" if self.cuda else "no"}"',
                    "[network]",
                    f"dim = {TRAIN_DIM}",
                    f"alpha = {TRAIN_DIM}",
                    "[[datasets]]",
                    f"resolution = {self.train_res}",
                    f"batch_size = {self.train_batch}",
                    "enable_bucket = false",
                    "  [[datasets.subsets]]",
                    f"  image_dir = {json.dumps(str(data))}",
                    "",
                ]
            )
        )
        rc = baka_main(["train", str(toml)])
        if rc != 0:
            raise RuntimeError(f"baka train exited {rc}")
        if len(marks) < total:
            raise RuntimeError(f"only {len(marks)} step marks for {total} steps (optimizer not used?)")
        its = self.train_steps / (marks[total - 1] - marks[self.train_warm - 1])
        from baka.models.safetensors_io import SafetensorsFile  # [baka API]

        with SafetensorsFile(out / "bench.safetensors") as f:
            n_mod = sum(k.endswith(".lora_down.weight") for k in f.keys())
        losses = json.loads((out / "losses.json").read_text())["train"]
        finite = all(math.isfinite(v) for v in losses)
        return its, f"baka: {n_mod} LoRA modules, loss {'finite' if finite else 'NOT finite'}"

    def train_plain(self, path: Path, data: Path) -> tuple[float, str]:
        """A minimal LoRA loop on diffusers modules (written for this bench, peft-free)."""
        import numpy as np
        from diffusers import DDPMScheduler
        from PIL import Image

        # [baka API] loading only: the LDM single file -> diffusers modules, and the offline CLIP tokenizer
        from baka.models.io import load_checkpoint
        from baka.models.pipeline import build_module
        from baka.models.tokenizer import load_tokenizer

        dev, wdt = self.device, self.dtype  # frozen weights in fp16 on GPU (as diffusers' example)
        ckpt = load_checkpoint(path)
        comps = ckpt.components()
        unet = build_module("unet", ckpt.config, comps["unet"], dtype=wdt).to(dev).requires_grad_(False)
        te = build_module("text_encoder", ckpt.config, comps["text_encoder"], dtype=wdt).to(dev)
        vae = build_module("vae", ckpt.config, comps["vae"], dtype=wdt).to(dev)
        te.requires_grad_(False)
        vae.requires_grad_(False)
        del comps
        sched = DDPMScheduler.from_config(ckpt.config.scheduler)
        params = add_lora(unet, TRAIN_DIM, TRAIN_DIM)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)

        imgs = sorted(data.glob("*.png"))
        tok = load_tokenizer()
        caps = [p.with_suffix(".txt").read_text() for p in imgs]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids = ids.to(dev)
        with torch.no_grad():
            lat = []
            for p in imgs:
                arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1
                x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(dev, wdt)
                lat.append(vae.encode(x).latent_dist.sample()[0] * vae.config.scaling_factor)
            latents = torch.stack(lat).float()
        del vae
        unet.train()
        n, bs = len(imgs), self.train_batch
        losses = []
        t0 = 0.0
        for step in range(self.train_warm + self.train_steps):
            if step == self.train_warm:
                sync()
                t0 = time.perf_counter()
            idx = [(step * bs + j) % n for j in range(bs)]
            x0, cid = latents[idx], ids[idx]
            noise = torch.randn_like(x0)
            t = torch.randint(0, sched.config.num_train_timesteps, (bs,), device=dev)
            noisy = sched.add_noise(x0, noise, t)
            with torch.autocast(dev, dtype=torch.float16, enabled=self.cuda):
                with torch.no_grad():
                    enc = te(input_ids=cid).last_hidden_state
                pred = unet(noisy.to(wdt), t, enc).sample
            loss = nn.functional.mse_loss(pred.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        sync()
        its = self.train_steps / (time.perf_counter() - t0)
        n_mod = len(params) // 2
        finite = all(math.isfinite(v) for v in losses)
        return its, f"plain: {n_mod} LoRA modules, loss {'finite' if finite else 'NOT finite'}"

    # --- 4. merge ------------------------------------------------------------------------------------------

    def merge(self) -> None:
        a, b = self.checkpoint("a"), self.checkpoint("b")
        if not self.smoke:  # both tools see the inputs in the page cache
            for p in (a, b):
                with open(p, "rb") as f:
                    while f.read(1 << 24):
                        pass
        tools = ["baka"]
        if self.smoke:
            self.row("merge.s").ref_text = "n/a (smoke: tiny model)"
        elif importlib.util.find_spec("sd_mecha") is None:
            self.row("merge.s").ref_text = "n/a (sd-mecha not installed)"
        else:
            tools.append("sd-mecha")
        best: dict[str, float] = {}
        peak: dict[str, float] = {}
        for r in range(self.merge_rounds):
            if r and self.left() < 90:
                print("  (no time left for another round)", flush=True)
                break
            for tool in tools:
                with self.guard(["merge.s"], "baka" if tool == "baka" else "ref"):
                    out = self.work / f"merge-out-{tool}.safetensors"
                    cmd = [sys.executable, str(BENCH / "merge_bench.py"), "--child", tool, str(a), str(b)]
                    proc = subprocess.run(cmd + [str(out)], capture_output=True, text=True, timeout=300)
                    if proc.returncode != 0:
                        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    best[tool] = min(best.get(tool, math.inf), res["seconds"])
                    peak[tool] = max(peak.get(tool, 0.0), res["peak_anon_mb"])
                    print(f"  round {r + 1} {tool:<8} {res['seconds']:7.2f} s", flush=True)
                    out.unlink(missing_ok=True)
                    # set after every run, so a timeout later keeps what was measured
                    self.set("merge.s", **{"baka" if tool == "baka" else "ref": best[tool]})
                    self.row("merge.s").note = "; ".join(
                        [f"best of {r + 1} round(s), a fresh process each"]
                        + [f"{t} peak anon RSS +{m:.0f} MB" for t, m in peak.items()]
                    )

    # --- run ------------------------------------------------------------------------------------------------

    def run(self) -> str:
        try:
            self.section(
                "generation", [r.key for r in self.rows if r.key.startswith("gen.")], self.generation
            )
            self.section("runtime block merge", ["runtime.one", "runtime.all"], self.runtime)
            self.section("training (LoRA)", ["train.its"], self.training)
            self.section("merge", ["merge.s"], self.merge)
        except Timeout as e:
            print(f"!! stopped: {e}", flush=True)
            for r in self.rows:
                if r.baka is None and r.baka_text is None:
                    r.baka_text = "not reached (timeout)"
                if r.ref is None and r.ref_text is None:
                    r.ref_text = "not reached (timeout)"
        return self.write()


def add_lora(unet: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every Linear and 1x1 Conv2d inside the UNet's Transformer2DModels (attention q/k/v/out,
    feed-forward, proj_in/out: kohya's and baka's default targets) with a LoRA branch."""
    wrap: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in unet.modules():
        if type(parent).__name__ != "Transformer2DModel":
            continue
        for pname, mod in parent.named_modules():
            is_1x1 = isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1)
            if pname and (isinstance(mod, nn.Linear) or is_1x1):
                owner_name, _, attr = pname.rpartition(".")
                wrap.append((parent.get_submodule(owner_name) if owner_name else parent, attr, mod))
    params: list[nn.Parameter] = []
    for owner, attr, mod in wrap:
        lora = LoRAWrapped(mod, rank, alpha)
        lora.down.to(mod.weight.device)  # LoRA weights stay fp32 (autocast runs them in fp16)
        lora.up.to(mod.weight.device)
        setattr(owner, attr, lora)
        params += [lora.down.weight, lora.up.weight]
    return params


class LoRAWrapped(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        return out + (self.up(self.down(x.to(self.down.weight.dtype))) * self.scale).to(out.dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, 64 px, a few steps (CPU check)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default=str(BENCH / "out" / "gpu.md"))
    ap.add_argument("--workdir", default=str(BENCH / "out"), help="generated models, dataset, outputs")
    ap.add_argument("--budget", type=float, default=0, help="seconds; later sections are skipped past it")
    ap.add_argument(
        "--only", nargs="*", choices=["generation", "runtime", "training", "merge"], help="run these sections"
    )
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
        if a.device == "cpu" and not a.smoke:
            print(
                "gpu_bench: torch sees no CUDA device; the full run is meant for one "
                "(--smoke for the CPU check, --device cpu to run real size on CPU anyway)",
                file=sys.stderr,
            )
            return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if a.smoke:
        # one thread: on a small shared CI machine OpenMP threads that wait on each other at every op
        # make a tiny model 20-50x slower than one thread does
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the merge subprocesses
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    def on_term(signum, _frame):
        raise Timeout(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(a)
    print(bench.header(), flush=True)
    t = time.perf_counter()
    text = bench.run()
    print(
        "\n" + "=" * 100 + f"\n(written to {bench.out}; total {time.perf_counter() - t:.1f} s)\n", flush=True
    )
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
