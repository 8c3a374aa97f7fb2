"""The generator: an SD1.x checkpoint on diffusers' StableDiffusionPipeline, driven A1111-style.

Per call: LoRA tags are applied (reversibly), prompts are encoded with A1111 semantics, the sampler is
built from its A1111 name, noise comes from a CPU generator per image (image i uses seed + i, so any
image of a batch can be reproduced alone), FreeU runs as a scheduled patch, the VAE decodes with an
automatic fp32 retry on NaNs, and every image carries A1111 infotext.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from baka import __version__
from baka.errors import BakaError
from baka.generate import infotext, inpaint
from baka.generate.conditioning import PromptEncoder
from baka.generate.denoise import CFGDenoiser, Prediction, expected_calls, first_index, noise_to, sample
from baka.generate.embeddings import EmbeddingDB
from baka.generate.freeu import FreeUPatch
from baka.generate.lora import LoraPatch, NetworkUse, find_network, load_network, target_names
from baka.generate.params import GenParams, ordered_infotext
from baka.generate.prompt import extract_networks
from baka.generate.samplers import build_scheduler
from baka.generate.upscale import (
    RESIZE_MODES,
    crop_latents,
    get_upscaler,
    hires_target,
    img2img_start,
    img2img_steps,
    resize_with,
)
from baka.models.patch import ModelPatcher


@dataclass
class Result:
    image: object  # PIL.Image
    seed: int
    infotext: str

    def save(self, path: str | Path) -> Path:
        from PIL.PngImagePlugin import PngInfo

        from baka.models.safetensors_io import atomic_output

        info = PngInfo()
        info.add_text("parameters", self.infotext)
        with atomic_output(path) as tmp:
            self.image.save(tmp, format="PNG", pnginfo=info)
        return Path(path)


@dataclass
class Generator:
    """Loads a model once; call it with :class:`GenParams` to get images with infotext."""

    model: str | Path
    vae: str | Path | None = None
    embedding_dirs: list[str | Path] = field(default_factory=list)
    lora_dirs: list[str | Path] = field(default_factory=list)
    upscaler_dirs: list[str | Path] = field(default_factory=list)  # ESRGAN-family files for hires fix
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    progress: bool = True
    pipe: object | None = None  # given by from_modules; otherwise built from ``model``
    sd_config: object | None = None
    on_step: object | None = None  # callable(step, total), e.g. for a progress endpoint
    on_preview: object | None = None  # callable(latents): each step's clean-latent estimate (live preview)

    def __post_init__(self) -> None:
        self.ckpt = None
        if self.pipe is None:
            from baka.models.io import load_checkpoint
            from baka.models.pipeline import build_pipeline

            self.ckpt = load_checkpoint(self.model, vae=self.vae, inpaint=True)
            self.sd_config = self.ckpt.config
            self.pipe = build_pipeline(self.ckpt, self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=not self.progress, leave=False)
        width = self.sd_config.text_encoder["hidden_size"]
        self.embeddings = EmbeddingDB(width)
        for d in self.embedding_dirs:
            self.embeddings.load_dir(d)
        # every live change to the model (LoRA, FreeU, a runtime merge) goes through this handle
        self.patcher = ModelPatcher(
            {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder, "vae": self.pipe.vae}
        )
        self._targets = target_names(self.pipe.unet, self.pipe.text_encoder)
        self._networks: dict[str, object] = {}
        self._hash: str | None = None
        self.base_scheduler = dict(self.sd_config.scheduler)
        self.lora_unmatched: list[str] = []
        self._stop = threading.Event()
        self.notes: list[str] = []  # what the last call could not do as asked (A1111's comments)

    def interrupt(self) -> None:
        """Stop the running generation after its current sampler step (A1111's Interrupt): the call
        returns the images as far as they got. Safe to call from another thread."""
        self._stop.set()

    @classmethod
    def from_modules(cls, unet, text_encoder, vae, sd_config, name: str = "model", **kw) -> Generator:
        """A generator over live modules (e.g. a model being trained); weights are shared, not copied."""
        from baka.models.pipeline import pipeline_from_modules

        pipe = pipeline_from_modules(
            {"unet": unet, "text_encoder": text_encoder, "vae": vae}, sd_config.scheduler
        )
        return cls(name, pipe=pipe, sd_config=sd_config, progress=False, dtype=unet.dtype, **kw)

    @property
    def model_hash(self) -> str | None:
        from baka.models.hashes import autov2

        if self._hash is None and Path(self.model).is_file():
            self._hash = autov2(self.model)
        return self._hash

    def _network(self, name: str):
        if name not in self._networks:
            self._networks[name] = load_network(find_network(name, [Path(d) for d in self.lora_dirs]))
        return self._networks[name]

    @property
    def inpainting_model(self) -> bool:
        """A 9-channel inpainting UNet (latents + mask + masked-picture latents)."""
        return self.pipe.unet.config.in_channels > self.pipe.vae.config.latent_channels

    @torch.no_grad()
    def __call__(self, p: GenParams, init_image=None, mask=None) -> list[Result]:
        """txt2img, or img2img from ``init_image`` (a PIL image, resized to the size by
        ``p.resize_mode``, denoised at ``p.denoise`` with A1111's step rule), or inpainting with
        ``mask`` (a PIL image, white = repaint; see :mod:`baka.generate.inpaint`)."""
        if init_image is not None and p.hires:
            raise BakaError("hires fix is for txt2img; img2img takes the size it is given")
        if mask is not None and init_image is None:
            raise BakaError("a mask needs an init image: inpainting is img2img with a mask")
        if p.width % 8 or p.height % 8:
            raise BakaError(f"size {p.width}x{p.height}: width and height must be multiples of 8")
        self.notes = []
        seed = p.seed if p.seed >= 0 else random.randrange(2**32)
        prompt, tags = extract_networks(p.prompt)
        negative, neg_tags = extract_networks(p.negative)
        loras = [t for t in tags + neg_tags if t.kind == "lora"]
        # other extra-network types (hypernet, ...) leave the text as in A1111 and are reported
        others = [
            f"<{t.kind}:{t.name}> (extra-network type not applied)"
            for t in tags + neg_tags
            if t.kind != "lora"
        ]
        uses = [NetworkUse(self._network(t.name), t.te, t.unet, t.lbw) for t in loras]
        lora = LoraPatch(uses, self._targets)
        # second-order samplers (Heun, DPM2) evaluate the UNet ~2N-1 times for N steps: FreeU's
        # schedule and progress count the denoising loop's real iterations
        scheduler = self._scheduler(p, p.steps)
        run, start = p.steps, 0
        masked = None
        if init_image is not None:
            if not 0 <= p.denoise <= 1:
                raise BakaError(f"denoising strength {p.denoise:g}: must be from 0 to 1")
            if mask is not None:
                masked = inpaint.prepare(init_image, mask, p)
                init_image = masked.image
            else:
                resize = RESIZE_MODES.get(str(p.resize_mode))
                init_image = resize(init_image.convert("RGB"), p.width, p.height)
            run = img2img_steps(p.steps, p.denoise)
            start = first_index(scheduler, p.steps, run)
        total = expected_calls(scheduler, start)
        hr_sched, hr_start, hr_run = None, 0, 0
        (w, h), cut = hires_target(p.width, p.height, p.hr_scale, p.hr_resize)
        if p.hires and ((w, h), cut) == ((p.width, p.height), (0, 0)):
            p = p.replace(hr_scale=1.0, hr_resize=(0, 0))  # A1111: a second pass at the same size is none
        if p.hires:
            up = get_upscaler(p.hr_upscaler, self.upscaler_dirs)  # unknown names fail before sampling
            if w < 8 or h < 8:
                raise BakaError(
                    f"hires scale {p.hr_scale:g} / resize {p.hr_resize}: gives {w}x{h}, too small"
                )
            if not 0 <= p.denoise <= 1:
                raise BakaError(f"denoising strength {p.denoise:g}: must be from 0 to 1")
            hr_schedule, hr_run = img2img_start(p.hr_steps or p.steps, p.denoise)
            if hr_schedule and hr_run:  # denoise 0: upscale only
                hr_p = p.replace(sampler=p.hr_sampler or p.sampler, schedule=p.hr_schedule or p.schedule)
                hr_sched = self._scheduler(hr_p, hr_schedule)
                hr_start = first_index(hr_sched, hr_schedule, hr_run)
                total += expected_calls(hr_sched, hr_start)
        hr_text, hr_neg = prompt, negative
        if p.hires and (p.hr_prompt or p.hr_negative):
            hr_text, hr_tags = extract_networks(p.hr_prompt) if p.hr_prompt else (prompt, tags)
            hr_neg, hr_neg_tags = extract_networks(p.hr_negative) if p.hr_negative else (negative, neg_tags)
            if sorted(map(repr, hr_tags + hr_neg_tags)) != sorted(map(repr, tags + neg_tags)):
                raise BakaError("hires prompt: its extra networks (<lora:...>) must be the first pass's")
        freeu = FreeUPatch(p.freeu, total) if p.freeu is not None else None
        with self.patcher.patched(lora, freeu):
            self.lora_unmatched = list(lora.unmatched) + others
            enc = PromptEncoder(self.pipe.text_encoder, self.embeddings, p.clip_skip, p.emphasis)
            conds, uncond = enc.conditioning(prompt, negative, p.steps)
            pad = enc.empty() if p.pad_cond_uncond else None
            noise, gen = self._noise(seed, p.batch, p.height // 8, p.width // 8)
            v_pred = scheduler.config.prediction_type == "v_prediction"
            prediction = Prediction(scheduler.alphas_cumprod, v_pred)
            blend = None
            if init_image is None:
                latents = noise * scheduler.init_noise_sigma
            else:
                init = self.encode([init_image] * p.batch)
                if masked is not None and masked.mask is not None:
                    keep = inpaint.latent_keep(masked.mask, p.height // 8, p.width // 8)
                    content = inpaint.MASKED_CONTENT.get(str(p.masked_content))
                    if content.latent is not None:  # A1111 draws this noise from the same seeds
                        init = content.latent(init, keep.to(init), noise)
                    blend = inpaint.LatentBlend(init, keep, prediction)
                latents = noise_to(scheduler, init, noise, start)
            denoiser = CFGDenoiser(
                self.pipe.unet,
                conds,
                uncond,
                p.cfg,
                p.guidance_rescale,
                pad_with=pad,
                blend=blend,
                image_cond=self._image_cond(p, init_image, masked, p.height, p.width),
                dynthresh=p.dynthresh,
                prediction=prediction,
                steps=run,
            )
            self._stop.clear()
            offset = 0

            def on_step(done: int, _total: int) -> bool:
                if freeu is not None:
                    freeu.set_step(offset + done)
                if self.on_step is not None:
                    self.on_step(offset + done, total)
                return self._stop.is_set()  # stop here, then decode what there is

            out = sample(
                denoiser,
                scheduler,
                latents,
                run,  # img2img: the prompt schedule counts from the first step run, as A1111's
                generator=gen,
                on_step=on_step,
                progress=self.progress,
                start=start,
                on_latents=self.on_preview,
            )
            if p.hires and not self._stop.is_set():
                offset = len(scheduler.timesteps)
                if up.latent:
                    out = up.apply(out, (h // 8, w // 8))
                else:
                    out = self.encode([resize_with(up, im, (w, h)) for im in self.decode(out)])
                out = crop_latents(out, cut)
                h, w = out.shape[-2] * 8, out.shape[-1] * 8
                if hr_sched is not None:
                    # A1111's hires prompts: the schedule counted in first-pass steps, read at hires ones
                    conds, uncond = enc.conditioning(hr_text, hr_neg, p.steps, hires_steps=hr_run)
                    denoiser = CFGDenoiser(
                        self.pipe.unet,
                        conds,
                        uncond,
                        p.cfg,
                        p.guidance_rescale,
                        pad_with=pad,
                        image_cond=self._image_cond(p, None, None, h, w),
                        dynthresh=p.dynthresh,
                        prediction=Prediction(hr_sched.alphas_cumprod, v_pred),
                        steps=hr_run,
                    )
                    noise, gen = self._noise(seed, p.batch, h // 8, w // 8)  # fresh per seed, as A1111
                    out = sample(
                        denoiser,
                        hr_sched,
                        noise_to(hr_sched, out, noise, hr_start),
                        hr_run,
                        generator=gen,
                        on_step=on_step,
                        progress=self.progress,
                        start=hr_start,
                        on_latents=self.on_preview,
                    )
            if blend is not None:
                out = blend.final(out)
            images = self.decode(out)
            info = self._infotext(p, enc, lora)
            if init_image is not None:
                img2img = {"Denoising strength": f"{p.denoise:g}"}
                if self.inpainting_model:
                    img2img["Conditional mask weight"] = f"{p.inpaint_weight:g}"
                info = ordered_infotext({**info, **img2img})
            if masked is not None:
                images = [masked.composite(im) for im in images]
                info = ordered_infotext({**info, **masked.info})
                self.notes = list(masked.notes)
        return [
            Result(img, seed + i, infotext.build(p.prompt, p.negative, {**info, "Seed": seed + i}))
            for i, img in enumerate(images)
        ]

    def _image_cond(self, p: GenParams, image, masked, height: int, width: int) -> torch.Tensor | None:
        """A 9-channel model's extra input [batch, 5, h, w]: the rounded mask on the latent grid and
        the latents of the picture with its masked part blanked (A1111's inpainting conditioning;
        txt2img and plain img2img: mask all ones, picture all grey). None for a plain model."""
        if not self.inpainting_model:
            return None
        m = masked.mask if masked is not None else None
        x = inpaint.conditioning_image(image if m is not None else None, m, p.inpaint_weight, height, width)
        vae = self.pipe.vae
        lat = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        cm = inpaint.conditioning_mask(m, height, width).to(lat)
        cm = torch.nn.functional.interpolate(cm, size=lat.shape[-2:])
        return torch.cat([cm, lat], 1).expand(p.batch, -1, -1, -1).to(self.dtype)

    def _scheduler(self, p: GenParams, steps: int):
        scheduler = build_scheduler(
            p.sampler, self.base_scheduler, zero_snr=p.zero_snr, v_pred=p.v_pred, schedule=p.schedule
        )
        scheduler.set_timesteps(steps)
        return scheduler

    def _noise(self, seed: int, batch: int, h: int, w: int):
        """Image i's noise from its own CPU generator seeded ``seed + i`` (reproducible alone), and those
        generators, which go on to feed the sampler's own noise (ancestral / SDE steps)."""
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        shape = (1, self.pipe.vae.config.latent_channels, h, w)
        noise = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(self.device, self.dtype)
        return noise, (gens if batch > 1 else gens[0])

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        """PIL images -> scaled latents (the posterior mean: deterministic; A1111 samples it)."""
        vae = self.pipe.vae
        x = self.pipe.image_processor.preprocess(images).to(self.device, vae.dtype)
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        """VAE decode; fp16 NaNs (a known SD1.x VAE failure) trigger one fp32 retry."""
        vae = self.pipe.vae
        scaled = latents / vae.config.scaling_factor
        image = vae.decode(scaled.to(vae.dtype)).sample
        if torch.isnan(image).any() and vae.dtype != torch.float32:
            # diffusers warns on every dtype cast of a model; this one is deliberate
            quiet = logging.getLogger("diffusers.models.modeling_utils")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            vae.to(torch.float32)
            try:
                image = vae.decode(scaled.float()).sample
            finally:
                vae.to(self.dtype)
                quiet.setLevel(level)
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")

    def _infotext(self, p: GenParams, enc: PromptEncoder, patch: LoraPatch) -> dict[str, object]:
        ti = {name: e.hash for name, e in enc.used.items()}
        loras = {u.net.name: u.net.hash for u in patch.applied}
        return ordered_infotext(
            {
                **p.infotext_fields(),
                "Seed": None,  # filled per image
                "Model hash": self.model_hash,
                "Model": Path(self.model).stem,
                "VAE": Path(self.vae).name if self.vae else None,
                "Lora hashes": ", ".join(f"{k}: {v}" for k, v in loras.items()) or None,
                "TI hashes": ", ".join(f"{k}: {v}" for k, v in ti.items()) or None,
                "Version": f"baka {__version__}",
            }
        )


__all__ = ["GenParams", "Generator", "Result"]
