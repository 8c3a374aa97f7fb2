"""Generation overhead vs plain diffusers, and FreeU overhead, on the same pipeline object.

    .venv/bin/python bench/generate_bench.py [--real] [--steps N] [--size PX] [--repeat N]

baka: ``Generator(...)(GenParams)`` (A1111 prompt parsing, chunked encoding, CPU-seeded noise,
infotext). Plain: ``pipe(prompt=..., negative_prompt=...)`` on the very same StableDiffusionPipeline
(its own prompt encoding), same sampler (Euler a), steps, size and CFG. FreeU: baka's scheduled hook
patch vs diffusers' ``enable_freeu`` with the same b/s factors. Default model: tiny SD1.x topology
(overhead-dominated); ``--real`` uses a random real-size SD1.x checkpoint (UNet 860M).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from diffusers import EulerAncestralDiscreteScheduler

    from baka.generate.engine import Generator, GenParams
    from baka.generate.freeu import FreeU
    from baka.models.io import save_checkpoint
    from baka.models.tiny import tiny_checkpoint, write_random_checkpoint

    tmp = Path(tempfile.mkdtemp())
    if a.real:
        path = Path("bench/out/real-a.safetensors")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_random_checkpoint(path, 1)
        size = a.size or 256
    else:
        path = save_checkpoint(tiny_checkpoint(0), tmp / "tiny.safetensors")
        size = a.size or 64
    torch.set_num_threads(torch.get_num_threads())
    gen = Generator(path, progress=False)
    pipe = gen.pipe
    prompt, negative = "a photo of a cat, masterpiece, best quality", "lowres, blurry"
    params = GenParams(
        prompt, negative, steps=a.steps, sampler="Euler a", cfg=7, seed=1, width=size, height=size
    )

    def plain():
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(gen.base_scheduler)
        pipe(
            prompt=prompt,
            negative_prompt=negative,
            num_inference_steps=a.steps,
            guidance_scale=7,
            width=size,
            height=size,
            generator=torch.Generator().manual_seed(1),
            output_type="pil",
        )

    def ours():
        gen(params)

    f = FreeU(1.3, 1.4, 0.9, 0.2, version=1)

    def ours_freeu():
        gen(params.replace(freeu=f))

    def plain_freeu():
        pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
        try:
            plain()
        finally:
            pipe.unet.disable_freeu()

    t_plain, t_ours = timed(plain, a.repeat), timed(ours, a.repeat)
    t_plain_f, t_ours_f = timed(plain_freeu, a.repeat), timed(ours_freeu, a.repeat)
    model = "real-size SD1.x (random weights)" if a.real else "tiny SD1.x topology"
    print(f"model: {model}, {size}x{size}, {a.steps} steps Euler a, CFG 7, median of {a.repeat}")
    print(f"plain diffusers  {t_plain:8.3f} s  ({t_plain / a.steps * 1000:7.1f} ms/step)")
    print(
        f"baka             {t_ours:8.3f} s  ({t_ours / a.steps * 1000:7.1f} ms/step)   "
        f"baka/diffusers = {t_ours / t_plain:.3f}x, overhead {(t_ours - t_plain) * 1000:+.1f} ms per image"
    )
    print(f"FreeU diffusers  {t_plain_f:8.3f} s  (+{(t_plain_f / t_plain - 1) * 100:.1f}% vs off)")
    print(
        f"FreeU baka       {t_ours_f:8.3f} s  (+{(t_ours_f / t_ours - 1) * 100:.1f}% vs off)   "
        f"baka/diffusers = {t_ours_f / t_plain_f:.3f}x"
    )


if __name__ == "__main__":
    main()
