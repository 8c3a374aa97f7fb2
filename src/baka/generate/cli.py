"""``baka generate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from baka._cli import args, command, print_config


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="SD1.x checkpoint (.safetensors/.ckpt) or diffusers folder")
    p.add_argument(
        "-p", "--prompt", default="", help="A1111 prompt syntax, <lora:name:w> tags, embeddings by name"
    )
    p.add_argument("-n", "--negative", default="", help="negative prompt")
    p.add_argument("-o", "--out", default="outputs", help="output folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="Euler a", help="A1111 sampler name (see `baka samplers`)")
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    p.add_argument("--cfg-rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2023)")
    p.add_argument("--seed", type=int, default=-1, help="-1 for random; image i of a batch uses seed + i")
    p.add_argument("-W", "--width", type=int, default=512)
    p.add_argument("-H", "--height", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument(
        "--zero-snr", action="store_true", help="zero terminal SNR: rescaled betas, trailing spacing"
    )
    p.add_argument("--v-pred", action="store_true", help="the model predicts v")
    p.add_argument(
        "--freeu", help="off, a preset (sd1, sd1-v2) or b1,b2,s1,s2[,version[,start,stop[,smooth]]]"
    )
    p.add_argument("--emphasis", default="Original", help="Original | No norm | None")
    p.add_argument("--vae", help="separate VAE file to use")
    p.add_argument("--embeddings", action="append", default=[], help="textual-inversion folder (repeatable)")
    p.add_argument("--lora-dir", action="append", default=[], help="LoRA folder (repeatable)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--from-png", help="take every parameter from this PNG's infotext")
    p.add_argument("--xy", help="grid X axis, e.g. cfg=5,7,9 or blocks=ALL_A,GRAD_V,ALL_B")
    p.add_argument("--xy-y", help="grid Y axis")
    p.add_argument("--merge-with", help="model B for the blocks axis (runtime block merge)")


@command("generate", "txt2img with A1111 conventions; PNGs carry A1111 infotext")
@args(_gen_args)
def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from baka.generate import infotext
    from baka.generate.engine import Generator, GenParams
    from baka.generate.freeu import parse_freeu

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    if a.from_png:
        params = GenParams.from_infotext(infotext.read_png(a.from_png))
    else:
        params = GenParams(
            a.prompt,
            a.negative,
            a.steps,
            a.sampler,
            a.cfg,
            a.seed,
            a.width,
            a.height,
            a.batch,
            a.clip_skip,
            a.cfg_rescale,
            a.zero_snr,
            a.v_pred,
            parse_freeu(a.freeu),
            a.emphasis,
        )
    cfg = {k: v for k, v in vars(params).items() if k != "freeu"}
    cfg["freeu"] = params.freeu.describe() if params.freeu else "off"
    print_config("generate", {"model": a.model, "vae": a.vae, "out": a.out, "dtype": a.dtype, **cfg})
    gen = Generator(
        a.model, vae=a.vae, embedding_dirs=a.embeddings, lora_dirs=a.lora_dir, dtype=dtype, device=a.device
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = len(list(out.glob("*.png")))
    if a.xy:
        from baka.generate.grid import GridContext, run_grid

        ctx = GridContext.with_merge(gen, a.merge_with)
        grid, rows = run_grid(ctx, params, a.xy, a.xy_y)
        path = out / f"{start:05d}-grid.png"
        from baka.models.safetensors_io import atomic_output

        with atomic_output(path) as tmp:
            grid.save(tmp, format="PNG")
        for row in rows:
            for r in row:
                start += 1
                r.save(out / f"{start:05d}-{r.seed}.png")
        print(f"wrote {path}")
        return 0
    results = gen(params)
    for i, r in enumerate(results):
        path = r.save(out / f"{start + i:05d}-{r.seed}.png")
        print(f"wrote {path}")
    if gen.lora_unmatched:
        print(
            f"warning: {len(gen.lora_unmatched)} LoRA modules matched no layer, e.g. {gen.lora_unmatched[0]}"
        )
    return 0


@command("samplers", "list A1111 sampler names")
def cmd_samplers(a: argparse.Namespace) -> int:
    from baka.generate.samplers import SAMPLERS

    for name in SAMPLERS.names():
        s = SAMPLERS.get(name)
        print(f"{name:<22} {s.scheduler} {s.options or ''}")
    return 0
