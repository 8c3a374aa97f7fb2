"""One table of generation parameters: each row ties a :class:`GenParams` field to its CLI flag, its
A1111 ``/sdapi/v1`` field and its A1111 infotext key, with how it is parsed and written. The CLI, the
server, the infotext writer and ``--from-png`` all read this table, so a parameter is added once.

Composite infotext fields (``Size: WxH``; ``Sampler`` with ``Schedule type``) are rows too: they read
and write several fields at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from baka.errors import BakaError

if TYPE_CHECKING:  # the CLI builds its parser from this table: importing FreeU would load torch
    from baka.generate.dynthresh import DynThresh
    from baka.generate.freeu import FreeU


def parse_freeu(spec: str | None) -> FreeU | None:
    from baka.generate.freeu import parse_freeu as parse

    return parse(spec)


@dataclass
class GenParams:
    """Everything that decides an image (besides the model). Build it by keyword after the prompts."""

    prompt: str
    negative: str = ""
    _: KW_ONLY
    steps: int = 20
    sampler: str = "Euler a"
    schedule: str = "Automatic"  # A1111's Schedule type; Automatic: the sampler's own
    cfg: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    batch: int = 1
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    dynthresh: DynThresh | None = None  # dynamic thresholding (CFG scale fix); None = off
    zero_snr: bool = False
    v_pred: bool = False
    freeu: FreeU | None = None
    emphasis: str = "Original"
    pad_cond_uncond: bool = False
    hr_scale: float = 1.0  # hires fix: off at 1
    hr_resize: tuple[int, int] = (0, 0)  # hires fix to this size instead of by hr_scale; 0 = by aspect
    hr_upscaler: str = "Latent"
    hr_steps: int = 0  # second-pass steps; 0 = as many as the first pass
    hr_sampler: str = ""  # second-pass sampler; "" = the first pass's
    hr_schedule: str = ""  # second-pass schedule type; "" = the first pass's
    hr_prompt: str = ""  # second-pass prompt; "" = the first pass's
    hr_negative: str = ""  # second-pass negative prompt; "" = the first pass's
    denoise: float = 0.7  # denoising strength: the hires second pass's, or img2img's
    resize_mode: str = "Just resize"  # img2img: how the init image meets the size
    # inpainting (img2img with a mask); the CLI's defaults are A1111's UI ones, the API's its API ones
    mask_blur: int = 4
    mask_invert: bool = False  # A1111's "Inpaint not masked"
    inpaint_area: str = "Whole picture"  # or "Only masked"
    inpaint_padding: int = 32  # "Only masked" padding, pixels
    masked_content: str = "original"  # fill | original | latent noise | latent nothing
    inpaint_weight: float = 1.0  # 9-channel models: A1111's "Conditional mask weight"

    @property
    def hires(self) -> bool:
        return self.hr_scale != 1.0 or self.hr_resize != (0, 0)

    def replace(self, **kw: Any) -> GenParams:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_infotext(cls, text: str) -> GenParams:
        """The parameters of an A1111 infotext (as written by baka or A1111)."""
        from baka.generate import infotext

        prompt, negative, fields = infotext.parse(text)
        kw: dict[str, Any] = {}
        try:
            for row in PARAMS:
                row.read_info(fields, kw)
        except (ValueError, KeyError) as e:
            raise BakaError(f"infotext could not be read: {e}") from None
        return cls(prompt, negative, **kw)

    def infotext_fields(self) -> dict[str, object]:
        """The infotext ``Key: value`` pairs of these parameters (None: not written)."""
        out: dict[str, object] = {}
        for row in PARAMS:
            out.update(row.write_info(self))
        return out

    @classmethod
    def from_cli(cls, a: argparse.Namespace) -> GenParams:
        return cls(**{r.name: r.from_cli(getattr(a, r.dest)) for r in PARAMS if r.cli})

    @classmethod
    def from_api(cls, body: Mapping[str, Any], options: Mapping[str, Any]) -> GenParams:
        """From an A1111 txt2img body and the effective options (``override_settings`` applied)."""
        kw: dict[str, Any] = {}
        for row in PARAMS:
            row.read_api(body, options, kw)
        return cls(**kw)


def parse_dynthresh(spec: str | None) -> DynThresh | None:
    from baka.generate.dynthresh import parse_dynthresh as parse

    return parse(spec)


def _show_num(v: float) -> str:
    return f"{v:g}"


def _show_freeu(f: FreeU | None) -> str | None:
    if f is None:
        return None
    keys = ("b1", "b2", "s1", "s2", "version", "start", "stop", "smoothness")
    return ",".join(f"{getattr(f, k):g}" for k in keys)


def _flag(text: str) -> Callable[[Any], str | None]:
    return lambda v: text if v else None


@dataclass(frozen=True)
class Param:
    """One generation parameter across the CLI, the A1111 API and the A1111 infotext."""

    name: str  # GenParams field
    cli: tuple[str, ...] = ()  # flags; () = not a CLI option
    help: str = ""
    api: str | None = None  # A1111 txt2img body field
    option: str | None = None  # A1111 option (``override_settings`` / ``/options``) it comes from
    info: str | None = None  # infotext key
    parse: Callable[[str], Any] = str  # text (CLI / infotext) -> value
    show: Callable[[Any], object] = str  # value -> infotext text (None: omitted)
    cli_kw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.cli[-1].lstrip("-").replace("-", "_")

    def default(self) -> Any:
        d = GenParams.__dataclass_fields__[self.name].default
        return "" if d is dataclasses.MISSING else d  # the prompt: empty unless given

    def add_cli(self, p: argparse.ArgumentParser) -> None:
        if self.cli_kw.get("action") == "store_true":
            p.add_argument(*self.cli, help=self.help, **self.cli_kw)
        else:
            kind = self.parse if self.parse in (int, float, str) else str
            default = self.cli_kw.get("default", self.default())
            p.add_argument(*self.cli, help=self.help, type=kind, default=default)

    def from_cli(self, v: Any) -> Any:
        # argparse already converted flags and plain int / float / str options
        if self.cli_kw.get("action") == "store_true" or self.parse in (int, float, str):
            return v
        return self.parse(v)

    def read_info(self, fields: Mapping[str, str], kw: dict[str, Any]) -> None:
        if self.info and self.info in fields:
            kw[self.name] = self.parse(fields[self.info])

    def write_info(self, p: GenParams) -> dict[str, object]:
        return {self.info: self.show(getattr(p, self.name))} if self.info else {}

    def read_api(self, body: Mapping[str, Any], options: Mapping[str, Any], kw: dict[str, Any]) -> None:
        if self.api and self.api in body:
            v = body[self.api]
            # a value with its own text form (FreeU) comes as that text
            custom = self.parse not in (str, int, float)
            kw[self.name] = self.parse(v) if custom and isinstance(v, str) else v
        elif self.option and self.option in options:
            try:
                kw[self.name] = type(self.default())(options[self.option])
            except (TypeError, ValueError):
                raise BakaError(f"option {self.option}: bad value {options[self.option]!r}") from None


@dataclass(frozen=True)
class SizeParam(Param):
    """``Size: WxH`` in infotext; width and height everywhere else."""

    def read_info(self, fields: Mapping[str, str], kw: dict[str, Any]) -> None:
        if "Size" in fields:
            kw["width"], kw["height"] = (int(v) for v in fields["Size"].split("x"))

    def write_info(self, p: GenParams) -> dict[str, object]:
        return {"Size": f"{p.width}x{p.height}"} if self.name == "width" else {}


@dataclass(frozen=True)
class SamplerParam(Param):
    """A sampler name; A1111 1.9+ writes the schedule separately (``Schedule type``) and its API takes
    ``scheduler`` beside ``sampler_name``: both are folded into one combined name when it exists."""

    def read_info(self, fields: Mapping[str, str], kw: dict[str, Any]) -> None:
        from baka.generate.samplers import SAMPLERS

        sampler = fields.get("Sampler", self.default())
        sched = fields.get("Schedule type", "Automatic")
        if sched and sched != "Automatic":
            if f"{sampler} {sched}" in SAMPLERS:
                sampler = f"{sampler} {sched}"
            else:  # a pair with no combined name: kept as a pair, never dropped
                kw["schedule"] = sched
        kw[self.name] = sampler

    def write_info(self, p: GenParams) -> dict[str, object]:
        """A1111 1.10's form: the sampler's own name and, apart, the schedule type it ran with
        ("DPM++ 2M Karras" -> ``Sampler: DPM++ 2M, Schedule type: Karras``; plain "DPM++ 2M" too, since
        Automatic means Karras for it)."""
        from baka.generate.samplers import SAMPLERS, SCHEDULES, split_name

        sampler, named = split_name(p.sampler)
        sched = SCHEDULES.canonical(p.schedule)
        if sched == "Automatic":  # zero-terminal SNR keeps diffusers' spacing, not A1111's default
            sched = named or ("Automatic" if p.zero_snr else SAMPLERS.get(sampler).auto or "Automatic")
        return {"Sampler": sampler, "Schedule type": sched if sched != "Automatic" else None}

    def read_api(self, body: Mapping[str, Any], options: Mapping[str, Any], kw: dict[str, Any]) -> None:
        from baka.generate.samplers import SAMPLERS

        # A1111 runs ``sampler_name or sampler_index``
        sampler = body.get("sampler_name") or body.get("sampler_index") or self.default()
        sched = body.get("scheduler")
        if sched and str(sched).lower() not in ("automatic", ""):
            if f"{sampler} {sched}" in SAMPLERS:
                sampler = f"{sampler} {sched}"
            else:
                kw["schedule"] = str(sched)
        kw[self.name] = sampler


@dataclass(frozen=True)
class DenoiseParam(Param):
    """Denoising strength: in txt2img infotext only with hires fix (the engine adds it for img2img)."""

    def write_info(self, p: GenParams) -> dict[str, object]:
        return super().write_info(p) if p.hires else {}


@dataclass(frozen=True)
class HiresParam(DenoiseParam):
    """A hires-fix field: written to infotext only when hires fix is on; from the API only with
    ``enable_hr`` (A1111 ignores the hr_* fields otherwise)."""

    def read_api(self, body: Mapping[str, Any], options: Mapping[str, Any], kw: dict[str, Any]) -> None:
        if body.get("enable_hr"):
            super().read_api(body, options, kw)
            if self.name == "hr_scale":
                kw.setdefault("hr_scale", 2.0)  # A1111's API default

    def write_info(self, p: GenParams) -> dict[str, object]:
        if self.name == "hr_scale" and p.hr_resize != (0, 0):
            return {}  # A1111 writes Hires resize instead
        return super().write_info(p)


def parse_resize(text: str) -> tuple[int, int]:
    """``WxH`` (either side 0: from the other by the first pass's aspect ratio), as A1111's
    ``Hires resize`` infotext."""
    w, x, h = text.strip().lower().partition("x")
    try:
        size = int(w), int(h)
    except ValueError:
        raise BakaError(f"hires resize {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1536") from None
    if not x or min(size) < 0:
        raise BakaError(f"hires resize {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1536")
    return size


@dataclass(frozen=True)
class HiresResizeParam(HiresParam):
    """``Hires resize: WxH`` (A1111 writes it instead of ``Hires upscale``); the API's
    ``hr_resize_x`` / ``hr_resize_y``."""

    def write_info(self, p: GenParams) -> dict[str, object]:
        return {self.info: "{}x{}".format(*p.hr_resize)} if p.hr_resize != (0, 0) else {}

    def read_api(self, body: Mapping[str, Any], options: Mapping[str, Any], kw: dict[str, Any]) -> None:
        if body.get("enable_hr") and (body.get("hr_resize_x") or body.get("hr_resize_y")):
            kw[self.name] = int(body.get("hr_resize_x") or 0), int(body.get("hr_resize_y") or 0)


@dataclass(frozen=True)
class DynThreshParam(Param):
    """Dynamic thresholding: the extension's infotext keys (several); in the API its
    ``alwayson_scripts`` entry, as A1111 clients send it."""

    script = "dynamic thresholding (cfg scale fix)"

    def read_info(self, fields: Mapping[str, str], kw: dict[str, Any]) -> None:
        from baka.generate.dynthresh import DynThresh

        kw[self.name] = DynThresh.from_infotext(dict(fields))

    def write_info(self, p: GenParams) -> dict[str, object]:
        return p.dynthresh.infotext() if p.dynthresh is not None else {}

    def read_api(self, body: Mapping[str, Any], options: Mapping[str, Any], kw: dict[str, Any]) -> None:
        from baka.generate.dynthresh import DynThresh

        scripts = {str(k).lower(): v for k, v in (body.get("alwayson_scripts") or {}).items()}
        entry = scripts.get(self.script)
        if entry is None:
            return
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        try:
            kw[self.name] = DynThresh.from_script_args(list(args))
        except (TypeError, ValueError) as e:
            raise BakaError(f"alwayson_scripts {self.script!r}: bad args ({e})") from None


@dataclass(frozen=True)
class InpaintParam(Param):
    """An inpainting field: written to infotext by the generator when there is a mask (see
    :mod:`baka.generate.inpaint`); API values are converted by ``from_api``. A1111's API defaults
    differ from its UI's (GenParams'): the server's img2img schema carries them."""

    from_api: Callable[[Any], Any] = lambda v: v

    def write_info(self, p: GenParams) -> dict[str, object]:
        return {}

    def read_api(self, body: Mapping[str, Any], options: Mapping[str, Any], kw: dict[str, Any]) -> None:
        if self.api and self.api in body:
            try:
                kw[self.name] = self.from_api(body[self.api])
            except (TypeError, ValueError, BakaError):
                raise BakaError(f"{self.api}: bad value {body[self.api]!r}") from None
        elif self.option and self.option in options:
            super().read_api(body, options, kw)


def _masked_content(v: Any) -> str:
    from baka.generate.inpaint import MASKED_CONTENT

    return MASKED_CONTENT.canonical(str(v))


def _inpaint_area(v: Any) -> str:
    from baka.generate.inpaint import INPAINT_AREAS

    return INPAINT_AREAS.canonical(str(v))


# what A1111's UI and API send for "the first pass's" (its dropdown's first entry)
_SAME = ("", "use same sampler", "use same scheduler")


@dataclass(frozen=True)
class HiresSameParam(HiresParam):
    """A second-pass choice written only when it differs from the first pass's ``same_as`` field
    (A1111 writes "Hires sampler", "Hires prompt", ... only then)."""

    same_as: str = ""

    def write_info(self, p: GenParams) -> dict[str, object]:
        v = getattr(p, self.name)
        if not p.hires or not v or v == getattr(p, self.same_as):
            return {}
        return {self.info: v} if self.info else {}

    def read_api(self, body: Mapping[str, Any], options: Mapping[str, Any], kw: dict[str, Any]) -> None:
        super().read_api(body, options, kw)
        if str(kw.get(self.name) or "").strip().lower() in _SAME:
            kw.pop(self.name, None)


@dataclass(frozen=True)
class ScheduleParam(Param):
    """``Schedule type``: read and written by :class:`SamplerParam` (which folds a pair that has a
    combined sampler name into it)."""

    def read_info(self, fields: Mapping[str, str], kw: dict[str, Any]) -> None:
        pass

    def write_info(self, p: GenParams) -> dict[str, object]:
        return {}


def _switch(name: str, flag: str, help: str, info: str, value: str) -> Param:
    """An on/off parameter: a CLI switch, written in infotext as ``info: value`` when on."""
    return Param(
        name,
        (flag,),
        help,
        info=info,
        parse=lambda s: s == value,
        show=_flag(value),
        cli_kw={"action": "store_true"},
    )


PARAMS: tuple[Param, ...] = (
    Param(
        "prompt",
        ("-p", "--prompt"),
        "A1111 prompt syntax, <lora:name:w> tags, embeddings by name",
        api="prompt",
    ),
    Param("negative", ("-n", "--negative"), "negative prompt", api="negative_prompt"),
    Param("steps", ("--steps",), "sampling steps", api="steps", info="Steps", parse=int),
    SamplerParam("sampler", ("--sampler",), "A1111 sampler name (see `baka samplers`)", api="sampler_name"),
    ScheduleParam(
        "schedule",
        ("--schedule",),
        "A1111 schedule type: Automatic (the sampler's A1111 default) | Uniform | Karras | Exponential |"
        " Polyexponential | SGM Uniform | KL Optimal | Align Your Steps | Simple | Normal | DDIM | Beta",
        info="Schedule type",
        show=lambda v: v if v != "Automatic" else None,
    ),
    Param("cfg", ("--cfg",), "CFG scale", api="cfg_scale", info="CFG scale", parse=float, show=_show_num),
    Param(
        "seed",
        ("--seed",),
        "-1 for random; image i of a batch uses seed + i",
        api="seed",
        info="Seed",
        parse=int,
    ),
    SizeParam("width", ("-W", "--width"), "image width", api="width", parse=int),
    SizeParam("height", ("-H", "--height"), "image height", api="height", parse=int),
    Param("batch", ("--batch",), "images per batch", api="batch_size", parse=int),
    Param(
        "clip_skip",
        ("--clip-skip",),
        "CLIP layers to skip from the end (A1111 'Clip skip')",
        option="CLIP_stop_at_last_layers",
        info="Clip skip",
        parse=int,
        show=lambda v: v if v > 1 else None,
    ),
    Param(
        "guidance_rescale",
        ("--cfg-rescale",),
        "guidance rescale phi (Lin et al. 2023)",
        info="CFG Rescale phi",
        parse=float,
        show=lambda v: f"{v:g}" if v else None,
    ),
    DynThreshParam(
        "dynthresh",
        ("--dynthresh",),
        "dynamic thresholding (CFG scale fix): off, a mimic scale (7), or 7,percentile=99.5,"
        "cfg_mode=Cosine Down,mimic_mode=...,startpoint=MEAN|ZERO,variability=AD|STD,phi=1,...",
        parse=parse_dynthresh,
        cli_kw={"default": None},
    ),
    _switch(
        "zero_snr",
        "--zero-snr",
        "zero terminal SNR: rescaled betas, trailing spacing",
        "Noise Schedule",
        "Zero Terminal SNR",
    ),
    _switch("v_pred", "--v-pred", "the model predicts v", "Prediction", "v_prediction"),
    Param(
        "freeu",
        ("--freeu",),
        "off, a preset (sd1, sd1-v2) or b1,b2,s1,s2[,version[,start,stop[,smooth]]]",
        api="freeu",  # baka's own API field (A1111 has FreeU only as an extension)
        info="FreeU",
        parse=parse_freeu,
        show=_show_freeu,
        cli_kw={"default": None},
    ),
    Param(
        "emphasis",
        ("--emphasis",),
        "Original | No norm | Ignore (weights 1) | None (brackets reach CLIP as text)",
        option="emphasis",
        info="Emphasis",
        show=lambda v: v if v != "Original" else None,
    ),
    Param(
        "pad_cond_uncond",
        ("--pad-cond-uncond",),
        "pad prompt and negative to the same chunk count (A1111's option, off by default: a long prompt"
        " and a short negative then run as separate UNet passes)",
        option="pad_cond_uncond",
        info="Pad conds",
        parse=lambda s: s == "True",
        show=_flag("True"),
        cli_kw={"action": "store_true"},
    ),
    HiresParam(
        "hr_scale",
        ("--hr-scale",),
        "hires fix: upscale by this factor and run a second pass (1 = off)",
        api="hr_scale",
        info="Hires upscale",
        parse=float,
        show=_show_num,
    ),
    HiresResizeParam(
        "hr_resize",
        ("--hr-resize",),
        "hires fix to WIDTHxHEIGHT instead of by --hr-scale (one side 0: kept to the aspect ratio;"
        " both: cropped to fit, as A1111)",
        info="Hires resize",
        parse=parse_resize,
        cli_kw={"default": "0x0"},
    ),
    HiresParam(
        "hr_upscaler",
        ("--hr-upscaler",),
        "hires upscaler: Latent, Latent (antialiased|bicubic|bicubic antialiased|nearest|nearest-exact),"
        " Lanczos, Nearest, None (Lanczos alone, as A1111), or an ESRGAN-family file's name in an"
        " --upscaler-dir",
        api="hr_upscaler",
        info="Hires upscaler",
    ),
    HiresParam(
        "hr_steps",
        ("--hr-steps",),
        "hires second-pass steps (0 = the first pass's)",
        api="hr_second_pass_steps",
        info="Hires steps",
        parse=int,
        show=lambda v: v or None,
    ),
    HiresSameParam(
        "hr_sampler",
        ("--hr-sampler",),
        "hires second-pass sampler (default: the first pass's)",
        api="hr_sampler_name",
        info="Hires sampler",
        same_as="sampler",
    ),
    HiresSameParam(
        "hr_schedule",
        ("--hr-schedule",),
        "hires second-pass schedule type (default: the first pass's)",
        api="hr_scheduler",
        info="Hires schedule type",
        same_as="schedule",
    ),
    HiresSameParam(
        "hr_prompt",
        ("--hr-prompt",),
        "hires second-pass prompt (default: the first pass's; same LoRA tags)",
        api="hr_prompt",
        info="Hires prompt",
        same_as="prompt",
    ),
    HiresSameParam(
        "hr_negative",
        ("--hr-negative",),
        "hires second-pass negative prompt (default: the first pass's)",
        api="hr_negative_prompt",
        info="Hires negative prompt",
        same_as="negative",
    ),
    DenoiseParam(
        "denoise",
        ("--denoise",),
        "denoising strength of img2img or of the hires second pass",
        api="denoising_strength",
        info="Denoising strength",
        parse=float,
        show=_show_num,
    ),
    Param(
        "resize_mode",
        ("--resize-mode",),
        "img2img: Just resize | Crop and resize | Resize and fill (or A1111's 0 / 1 / 2)",
        api="resize_mode",
    ),
    InpaintParam(
        "mask_blur",
        ("--mask-blur",),
        "inpainting: Gaussian blur of the mask, pixels",
        api="mask_blur",
        info="Mask blur",
        parse=int,
        from_api=int,
    ),
    InpaintParam(
        "mask_invert",
        ("--mask-invert",),
        "inpainting: repaint what is not masked (A1111's 'Inpaint not masked')",
        api="inpainting_mask_invert",
        info="Mask mode",
        parse=lambda s: s == "Inpaint not masked",
        cli_kw={"action": "store_true"},
        from_api=lambda v: bool(int(v)),
    ),
    InpaintParam(
        "inpaint_area",
        ("--inpaint-area",),
        "inpainting: Whole picture | Only masked (the mask's box, padded, generated at full size)",
        api="inpaint_full_res",
        info="Inpaint area",
        parse=_inpaint_area,
        from_api=_inpaint_area,
    ),
    InpaintParam(
        "inpaint_padding",
        ("--inpaint-padding",),
        "inpainting: 'Only masked' padding around the mask, pixels",
        api="inpaint_full_res_padding",
        info="Masked area padding",
        parse=int,
        from_api=int,
    ),
    InpaintParam(
        "masked_content",
        ("--masked-content",),
        "inpainting: what the masked part starts from: fill | original | latent noise | latent nothing",
        api="inpainting_fill",
        info="Masked content",
        parse=_masked_content,
        from_api=_masked_content,
    ),
    InpaintParam(
        "inpaint_weight",
        ("--inpaint-weight",),
        "9-channel inpainting models: how much of the picture the model is shown (A1111's"
        " 'Conditional mask weight')",
        option="inpainting_mask_weight",
        info="Conditional mask weight",
        parse=float,
    ),
)

# where infotext keys go, A1111's order; keys the generator adds (model, hashes) are placed too
INFOTEXT_ORDER = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "VAE",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "CFG Rescale phi",
    "Noise Schedule",
    "Prediction",
    "FreeU",
    "Emphasis",
    "Pad conds",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Hires sampler",
    "Hires schedule type",
    "Hires prompt",
    "Hires negative prompt",
    "Mask mode",
    "Mask blur",
    "Inpaint area",
    "Masked area padding",
    "Masked content",
    "Dynamic thresholding enabled",
    "Mimic scale",
    "Separate Feature Channels",
    "Scaling Startpoint",
    "Variability Measure",
    "Interpolate Phi",
    "Threshold percentile",
    "Mimic mode",
    "Mimic scale minimum",
    "CFG mode",
    "CFG scale minimum",
    "Scheduler value",
    "Lora hashes",
    "TI hashes",
    "Version",
)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """Add every CLI parameter of the table to ``p``."""
    for row in PARAMS:
        if row.cli:
            row.add_cli(p)


def ordered_infotext(fields: Mapping[str, object]) -> dict[str, object]:
    """``fields`` in A1111's order (unknown keys after the known ones, in their own order)."""
    rank = {k: i for i, k in enumerate(INFOTEXT_ORDER)}
    return dict(sorted(fields.items(), key=lambda kv: rank.get(kv[0], len(rank))))


__all__ = ["GenParams", "PARAMS", "Param", "add_cli_args", "ordered_infotext"]
