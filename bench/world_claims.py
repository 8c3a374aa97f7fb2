"""The shapes-world measured claims (docs/world.md, docs/benchmarks.md): one command, fixed seeds.

    .venv/bin/python bench/world_claims.py [--suite quick|full] [--n 24] [--json OUT]

Every figure comes from the shipped world models through the normal generator and the judge
(``baka.world.score``); nothing here is trained. Prints one markdown table per claim.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

FLAT, STRIPED, VPRED = "world-flat", "world-striped", "world-vpred-ztsnr"
OUT_FROM_B = "OUT12"  # supermerger preset: BASE, IN00-IN11, M00 from A; OUT00-OUT11 from B
IN_FROM_B = ",".join(["0"] + ["1"] * 13 + ["0"] * 12)
MERGE_PRESETS = ("GRAD_V", "GRAD_A", "FLAT_25", "FLAT_75", "SMOOTHSTEP", "REVERSE-SMOOTHSTEP")


def md_table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A markdown table under a ``###`` title (also used by the other world bench scripts)."""
    fmt = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for r in rows:
        fmt.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return f"\n### {title}\n\n" + "\n".join(fmt)


def prompt_following(suite: str) -> tuple[str, dict]:
    from baka.world.eval import evaluate

    rows, data = [], {}
    for model in (FLAT, STRIPED, VPRED):
        for cfg in (7.0, 1.0):
            m = evaluate(model, suite=suite, cfg=cfg, progress=False).metrics
            data[f"{model}@cfg{cfg:g}"] = m
            h = m["held_out"]
            rows.append(
                [model, f"{cfg:g}", *(f"{m[k]:.0%}" for k in ("color_accuracy", "shape_accuracy"))]
                + [f"{m['background_accuracy']:.0%}"]
                + [f"{h['color_accuracy']:.0%} / {h['shape_accuracy']:.0%} / {h['background_accuracy']:.0%}"]
                + [m["mean_luminance"], m["texture_energy"], m["n_images"]]
            )
    head = [
        "model",
        "CFG",
        "colour",
        "shape",
        "background",
        "held-out c/s/bg",
        "luminance",
        "texture",
        "images",
    ]
    return md_table(f"Prompt following ({suite} suite, 20 steps, DPM++ 2M Karras)", head, rows), data


def guidance_and_emphasis(n: int) -> tuple[str, dict]:
    from baka.generate.engine import Generator
    from baka.world.eval import color_share, images
    from baka.world.score import color_strength, read_image

    gen = Generator(FLAT, progress=False)
    base = "circle, grey background, large, center"
    cases = [
        ("no negative", base, ""),
        ("negative `red`", base, "red"),
        ("negative `blue`", base, "blue"),  # world-flat draws this prompt's circle blue most often
        ("negative: a whole caption", base, "blue " + base),
        ("`(red:1.4) circle, ...`", "(red:1.4) " + base, ""),
        ("`(red:0.6) circle, ...`", "(red:0.6) " + base, ""),
        ("`red circle, ...`", "red " + base, ""),
    ]
    rows, data = [], {}
    for name, prompt, neg in cases:
        ims = images(gen, prompt, negative=neg, n=n)
        rs = [read_image(im) for im in ims]
        share, blue = color_share(rs, "red"), color_share(rs, "blue")
        strength = sum(color_strength(im, "red", "grey") for im in ims) / n  # emphasis: how red
        seen = Counter(r.main.color if r.main else "none" for r in rs)
        data[name] = {"red": share, "blue": blue, "red_strength": strength, "colours": dict(seen)}
        colours = ", ".join(f"{c} {k / len(rs):.0%}" for c, k in seen.most_common())
        rows.append([name, prompt, neg or "-", f"{share:.0%}", f"{strength:.2f}", f"{blue:.0%}", colours])
    return md_table(
        f"Negative prompt and emphasis (world-flat, CFG 7, {n} seeds; red strength: palette red 1, grey 0)",
        ["case", "prompt", "negative", "red", "red strength", "blue", "colours read"],
        rows,
    ), data


def block_merge(suite: str) -> tuple[str, dict]:
    from baka.generate.engine import Generator
    from baka.merge.runtime import RuntimeBlockMerge
    from baka.merge.weights import parse_weights
    from baka.world.eval import evaluate

    gen = Generator(FLAT, progress=False)
    merge = gen.patcher.apply(RuntimeBlockMerge.against(gen.ckpt, STRIPED))
    rows, data = [], {}
    for name, spec in [
        ("flat (all 0)", "0"),
        ("IN flat, OUT striped", OUT_FROM_B),
        ("IN striped, OUT flat", IN_FROM_B),
        ("striped (all 1)", "1"),
        *((p, p) for p in MERGE_PRESETS),
    ]:
        merge.set_weights(parse_weights(spec))
        m = evaluate(gen, suite=suite, progress=False).metrics
        data[name] = m
        rows.append([name, f"{m['shape_accuracy']:.0%}", f"{m['color_accuracy']:.0%}", m["texture_energy"]])
    gen.patcher.remove(merge)
    return md_table(
        f"Block merge world-flat x world-striped (runtime merge, {suite} suite, CFG 7)",
        ["weights (B = striped)", "shape", "colour", "texture energy"],
        rows,
    ), data


def zero_snr(n: int) -> tuple[str, dict]:
    from baka.generate.engine import Generator
    from baka.generate.freeu import PRESETS
    from baka.world.eval import readings

    rows, data = [], {}
    for model in (FLAT, VPRED):
        gen = Generator(model, progress=False)
        for bg in ("black", "white"):
            for freeu in (None, "sd1"):
                rs = readings(
                    gen,
                    f"red circle, {bg} background, small, center",
                    n=n,
                    freeu=PRESETS.get(freeu) if freeu else None,
                )
                lum = sum(r.luminance for r in rs) / len(rs)
                data[f"{model}/{bg}/{freeu or 'off'}"] = lum
                rows.append([model, f"{bg} background", freeu or "off", lum])
    return md_table(
        f"Zero-terminal SNR and FreeU: mean luminance ({n} seeds, CFG 7)",
        ["model", "prompt", "FreeU", "mean luminance"],
        rows,
    ), data


def star_lora(n: int) -> tuple[str, dict]:
    from baka.generate.engine import Generator
    from baka.world.eval import star_scores

    gen = Generator(FLAT, progress=False)
    rows, data = [], {}
    for w in (0.0, 0.5, 1.0):
        m = star_scores(gen, n, lora=f"<lora:world-star:{w:g}>" if w else "")
        data[f"{w:g}"] = m
        rows.append([f"{w:g}", f"{m['star_share']:.0%}", f"{m['color_accuracy']:.0%}", m["n_images"]])
    return md_table(
        f"Star LoRA (world-star on world-flat, {n} large-star prompts, CFG 7)",
        ["LoRA weight", "stars", "colour", "images"],
        rows,
    ), data


def textual_inversion(n: int) -> tuple[str, dict]:
    import shutil
    import tempfile
    from pathlib import Path

    from baka.generate.engine import Generator
    from baka.models.shipped import SHIPPED_EMBEDDINGS, shipped_path
    from baka.world.eval import color_share, colour_word_prompts, readings

    folder = Path(tempfile.mkdtemp()) / "embeddings"
    folder.mkdir()
    shutil.copy(shipped_path("world-azure", SHIPPED_EMBEDDINGS), folder)
    gens = {"in the embeddings folder": Generator(FLAT, embedding_dirs=[folder], progress=False)}
    gens["absent (the word alone)"] = Generator(FLAT, progress=False)
    # the negative rows: captions that ask for blue (the test's premise; a colourless prompt draws
    # whatever colour world-flat favours, purple on build 9)
    asking = colour_word_prompts("blue", n, "blue")
    base = "circle, grey background, large, center"
    cases = [
        ("`world-azure` for the colour (16 prompts)", colour_word_prompts("world-azure", 16, "blue"), ""),
        (f"captions asking for blue ({n})", asking, ""),
        (f"captions asking for blue ({n}), negative `world-azure`", asking, "world-azure"),
        (f"`{base}`", [base] * n, ""),
        (f"`{base}`, negative `world-azure`", [base] * n, "world-azure"),
    ]
    rows, data = [], {}
    for gname, gen in gens.items():
        for cname, prompts, neg in cases:
            rs = [r for k, p in enumerate(prompts) for r in readings(gen, p, negative=neg, n=1, seed=100 * k)]
            share = color_share(rs, "blue")
            data[f"{gname}/{cname}"] = share
            rows.append([gname, cname, f"{share:.0%}", len(rs)])
    shutil.rmtree(folder.parent)
    return md_table(
        "Textual inversion (world-azure, 1 vector, on world-flat, CFG 7): share of blue shapes",
        ["embedding file", "prompt", "blue", "images"],
        rows,
    ), data


def esd_figures(gen, n: int, lora: str = "") -> dict:
    """The ESD table's figures for a generator (and optional LoRA tag): red captions drawn red, the
    other colours' accuracy, and the word ``red`` alone drawn red."""
    from baka.world.eval import color_share, erase_scores, readings

    m = erase_scores(gen, "red", n, lora=lora)
    m["word_share"] = color_share(readings(gen, f"red {lora}".strip(), n=n), "red")
    return m


def esd(n: int) -> tuple[str, dict]:
    from baka.generate.engine import Generator

    gen = Generator(FLAT, progress=False)
    rows, data = [], {}
    runs = [("world-flat", "")] + [
        (f"world-flat + `<lora:{lora}:1>` ({method})", f"<lora:{lora}:1>")
        for lora, method in (("world-no-red", "ESD-x"), ("world-no-red-u", "ESD-u"))
    ]
    for name, lora in runs:
        m = esd_figures(gen, n, lora)
        data[name] = m
        rows.append(
            [name, f"{m['word_share']:.0%}", f"{m['erased_share']:.0%}", f"{m['others_color_accuracy']:.0%}"]
        )
    return md_table(
        f"ESD erasing `red` (world-no-red: `baka erase` ESD-x on 16 red training captions, `--separator`,"
        f" extracted; world-no-red-u: ESD-u trained as a LoRA, a retain term on 20 captions of the other"
        f" colours; {n} seeds / red captions / other captions)",
        ["model", "prompt `red` drawn red", "red captions drawn red", "other colours right"],
        rows,
    ), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="quick", choices=["quick", "full"])
    ap.add_argument("--n", type=int, default=24, help="seeds per single-prompt claim")
    ap.add_argument("--json", help="also write every figure here")
    ap.add_argument("--only", nargs="*", help="run only these tables (e.g. esd star_lora)")
    a = ap.parse_args()
    out: dict = {}
    for name, fn, arg in [
        ("prompt_following", prompt_following, a.suite),
        ("guidance_and_emphasis", guidance_and_emphasis, a.n),
        ("block_merge", block_merge, a.suite),
        ("zero_snr", zero_snr, a.n),
        ("star_lora", star_lora, a.n),
        ("textual_inversion", textual_inversion, a.n),
        ("esd", esd, a.n),
    ]:
        if a.only and name not in a.only:
            continue
        t = time.time()
        text, out[name] = fn(arg)
        print(text + f"\n\n({time.time() - t:.0f} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
