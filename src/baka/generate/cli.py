"""``baka generate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from baka._cli import args, command, print_config


def _gen_args(p: argparse.ArgumentParser) -> None:
    from baka.generate.params import add_cli_args

    p.add_argument("model", help="SD1.x checkpoint (.safetensors/.ckpt) or diffusers folder")
    add_cli_args(p)  # the generation parameters, from the one parameter table
    p.add_argument("-o", "--out", default="outputs", help="output folder")
    p.add_argument("--vae", help="separate VAE file to use")
    p.add_argument("--embeddings", action="append", default=[], help="textual-inversion folder (repeatable)")
    p.add_argument("--lora-dir", action="append", default=[], help="LoRA folder (repeatable)")
    p.add_argument(
        "--upscaler-dir", action="append", default=[], help="ESRGAN-family upscaler folder (repeatable)"
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--from-png", help="take every parameter from this PNG's infotext")
    p.add_argument("--n-iter", type=int, default=1, help="batch count: batches one after another")
    p.add_argument("--init-image", help="img2img: start from this picture (see --denoise, --resize-mode)")
    p.add_argument(
        "--mask",
        help="inpainting: white (or transparent in an RGBA picture) is repainted; needs --init-image"
        " (see --mask-blur, --inpaint-area, --masked-content)",
    )
    p.add_argument("--xy", help="grid X axis, e.g. cfg=5,7,9 or blocks=ALL_A,GRAD_V,ALL_B")
    p.add_argument("--xy-y", help="grid Y axis")
    p.add_argument(
        "--xy-z", help="grid Z axis: one grid per value, stacked (e.g. model_b=B1.safetensors,B2...)"
    )
    p.add_argument("--merge-with", help="model B for the blocks axis (runtime block merge)")
    p.add_argument(
        "--merge-method", default="weight_sum", help="the runtime merge's method (method axis too)"
    )
    p.add_argument("--merge-c", help="model C for merge methods that take one (model_c axis too)")
    p.add_argument("--merge-elemental", default="", help="supermerger elemental rules for it, ';'-separated")
    p.add_argument("--merge-beta", help="the method's beta: a number, 26 values or a preset (beta axis too)")


def open_image(path: str, *, keep_alpha: bool = False):
    """An input picture as RGB (RGBA when ``keep_alpha`` and it has an alpha channel: masks), or one
    clear error naming the file."""
    from PIL import Image, UnidentifiedImageError

    from baka.errors import BakaError

    try:
        with Image.open(path) as im:
            alpha = keep_alpha and ("A" in im.getbands() or "transparency" in im.info)
            return im.convert("RGBA" if alpha else "RGB")
    except FileNotFoundError:
        raise BakaError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise BakaError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def grid_processes(device: str):
    """(rank, processes), the gather, whether this process writes, and its device: under ``accelerate
    launch`` / ``torchrun`` (WORLD_SIZE > 1) a grid's cells are shared between the processes, each
    with its own model copy on its own GPU (gloo between CPU processes); alone, (0, 1)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return (0, 1), None, True, device
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())

    def gather(done: dict) -> dict:
        parts: list = [None] * state.num_processes
        dist.all_gather_object(parts, done)
        return {k: v for part in parts for k, v in part.items()}

    dev = str(state.device) if device == "cpu" and torch.cuda.is_available() else device
    return (state.process_index, state.num_processes), gather, state.is_main_process, dev


@command("generate", "txt2img / img2img with A1111 conventions; PNGs carry A1111 infotext")
@args(_gen_args)
def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from baka.generate import infotext
    from baka.generate.engine import Generator, GenParams

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    from baka.errors import BakaError

    if a.mask and not a.init_image:
        raise BakaError("--mask needs --init-image: inpainting is img2img with a mask")
    init = open_image(a.init_image) if a.init_image else None
    mask = open_image(a.mask, keep_alpha=True) if a.mask else None
    if init is not None and a.xy:
        raise BakaError("--init-image and --xy: grids are txt2img only")
    if a.from_png:
        params = GenParams.from_infotext(infotext.read_png(a.from_png))
    else:
        params = GenParams.from_cli(a)
    cfg = {k: v for k, v in vars(params).items() if k != "freeu"}
    cfg["freeu"] = params.freeu.describe() if params.freeu else "off"
    cfg["dynthresh"] = params.dynthresh or "off"
    run = {"model": a.model, "vae": a.vae, "init_image": a.init_image, "mask": a.mask}
    run.update(out=a.out, dtype=a.dtype)
    print_config("generate", {**run, **cfg})
    share, gather, main, device = grid_processes(a.device) if a.xy else ((0, 1), None, True, a.device)
    gen = Generator(
        a.model,
        vae=a.vae,
        embedding_dirs=a.embeddings,
        lora_dirs=a.lora_dir,
        upscaler_dirs=a.upscaler_dir,
        dtype=dtype,
        device=device,
    )
    out = Path(a.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    start = len(list(out.glob("*.png"))) if main else 0
    if a.xy:
        from baka.generate.grid import GridContext, run_grid

        ctx = GridContext.with_merge(
            gen,
            a.merge_with,
            method=a.merge_method,
            model_c=a.merge_c,
            beta=a.merge_beta,
            elemental=a.merge_elemental,
        )
        grid, rows = run_grid(ctx, params, a.xy, a.xy_y, z=a.xy_z, share=share, gather=gather)
        if not main:  # under accelerate launch / torchrun only the first process writes
            return 0
        if share[1] > 1:
            print(f"grid: {sum(len(r) for r in rows)} cells made by {share[1]} processes")
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
    if a.n_iter < 1:
        raise BakaError(f"--n-iter {a.n_iter}: must be at least 1")
    results, p = [], params
    for _ in range(a.n_iter):  # A1111's batch count: each batch goes on from the last seed
        batch = gen(p, init_image=init, mask=mask)
        results += batch
        p = p.replace(seed=batch[-1].seed + 1)
    for i, r in enumerate(results):
        path = r.save(out / f"{start + i:05d}-{r.seed}.png")
        print(f"wrote {path}")
    for note in gen.notes:
        print(f"note: {note}")
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
        auto = f"(Automatic schedule: {s.auto})" if s.auto else ""
        print(f"{name:<22} {s.scheduler} {s.options or ''} {auto}".rstrip())
    return 0


def _upscale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="pictures (or folders of them) to upscale")
    p.add_argument(
        "--upscaler",
        default="Lanczos",
        help="Lanczos, Nearest, None or an ESRGAN-family file's name in an --upscaler-dir (default: Lanczos)",
    )
    p.add_argument(
        "--upscaler-dir", action="append", default=[], help="ESRGAN-family upscaler folder (repeatable)"
    )
    p.add_argument("--scale", type=float, default=2.0, help="scale by this factor (default: 2)")
    p.add_argument("--to", help="scale to WxH instead (the larger ratio, then the centre cropped)")
    p.add_argument("--no-crop", action="store_true", help="with --to: keep the scaled picture uncropped")
    p.add_argument("--upscaler-2", default="None", help="a second upscaler blended over the first")
    p.add_argument("--visibility-2", type=float, default=0.0, help="the second upscaler's weight, 0-1")
    p.add_argument("-o", "--out", default="outputs/extras-images", help="output folder")


@command("upscale", "A1111's Extras upscale (scale by / scale to, two upscalers blended)")
@args(_upscale_args)
def cmd_upscale(a: argparse.Namespace) -> int:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from baka.errors import BakaError
    from baka.generate.extras import Upscale, upscale
    from baka.generate.params import parse_resize
    from baka.models.safetensors_io import atomic_output

    to = parse_resize(a.to) if a.to else None
    if to is not None and min(to) <= 0:
        raise BakaError(f"--to {a.to}: both sides must be positive")
    dirs = tuple(a.upscaler_dir)
    u = Upscale(a.upscaler, a.scale, to, not a.no_crop, a.upscaler_2, a.visibility_2, dirs)
    files = [f for p in map(Path, a.images) for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    print_config("upscale", {**vars(u), "inputs": len(files), "out": a.out})
    done = 0
    for f in files:
        try:
            img = open_image(str(f))
        except BakaError as e:
            if len(files) == 1:
                raise
            print(f"warning: skipped {e}")  # one bad file never takes the rest down
            continue
        out = Path(a.out) / f"{f.stem}.png"
        info = PngInfo()
        with Image.open(f) as src:
            if "parameters" in src.info:  # the generation parameters travel with the picture
                info.add_text("parameters", src.info["parameters"])
        with atomic_output(out, protect=files) as tmp:
            upscale(img, u).save(tmp, format="PNG", pnginfo=info)
        print(f"{f} -> {out}")
        done += 1
    return 0 if done else 1
