"""Request bodies of the server's routes (pydantic validates them; a bad field is a 422)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Txt2Img(BaseModel):
    """A1111 1.10's txt2img body, with its API defaults (50 steps, sampler "Euler" through
    ``sampler_index``). Fields it has and baka does not build are checked by
    :mod:`baka.serve.fields` (kept as pydantic extras), never dropped in silence."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(50, ge=1, le=150)
    sampler_name: str | None = None  # A1111 runs ``sampler_name or sampler_index``
    sampler_index: str = "Euler"
    scheduler: str | None = None
    cfg_scale: float = 7.0
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=8)
    # hires fix (A1111's fields; read only with enable_hr)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1, le=4)
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    hr_resize_x: int = Field(0, ge=0, le=4096)  # hires to this size instead of hr_scale; 0 = by aspect
    hr_resize_y: int = Field(0, ge=0, le=4096)
    hr_sampler_name: str | None = None  # None / "" / "Use same sampler": the first pass's
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    denoising_strength: float = Field(0.7, ge=0, le=1)
    override_settings: dict = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True  # False: the overrides stay as the options
    send_images: bool = True  # False: the response carries no images
    save_images: bool = False  # True: also saved under the outputs folder, A1111's layout
    freeu: str | None = None  # baka's own: "off", a FreeU preset or b1,b2,s1,s2[,version,...]
    # A1111 extensions' arguments by script title; baka reads "Dynamic Thresholding (CFG Scale Fix)"
    alwayson_scripts: dict = Field(default_factory=dict)

    def sampler(self) -> str:
        """The sampler A1111 runs: ``sampler_name``, else ``sampler_index``."""
        return self.sampler_name or self.sampler_index


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list)  # base64 / data: URLs; the first is used
    include_init_images: bool = False  # echo init_images and mask back in "parameters"
    resize_mode: int = Field(0, ge=0, le=2)  # Just resize, Crop and resize, Resize and fill
    denoising_strength: float = Field(0.75, ge=0, le=1)  # A1111's img2img default
    # inpainting, with A1111's API defaults (they differ from its UI's)
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=64)  # sets both axes when given
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)  # fill, original, latent noise, latent nothing
    inpaint_full_res: bool = True  # "Only masked"
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)

    def blur(self) -> int:
        """The one mask blur baka applies to both axes (A1111: ``mask_blur`` sets x and y)."""
        if self.mask_blur is not None:
            return self.mask_blur
        if self.mask_blur_x != self.mask_blur_y:
            from baka.errors import BakaError

            raise BakaError(
                f"mask_blur_x {self.mask_blur_x} and mask_blur_y {self.mask_blur_y} differ:"
                " baka blurs both axes by one value (send mask_blur)"
            )
        return self.mask_blur_x


class ExtrasSingle(BaseModel):
    """A1111's /extra-single-image body (its defaults); face restoration is not built (422 above 0)."""

    image: str
    resize_mode: int = Field(0, ge=0, le=1)  # 0: scale by upscaling_resize, 1: scale to w x h
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=8192)
    upscaling_resize_h: int = Field(512, ge=1, le=8192)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False  # the order against face restoration, which baka does not run


class PngInfo(BaseModel):
    image: str


class MergeJob(BaseModel):
    model_a: str
    model_b: str
    model_c: str | None = None
    method: str = "weight_sum"
    alpha: str | list[float] = "0.5"
    beta: str | list[float] | None = None
    elemental: str = ""
    output_name: str
    dtype: str | None = "fp16"


class Preview(BaseModel):
    model_a: str
    model_b: str
    weights: str | list[float] = "0.5"
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(12, ge=1, le=50)
    seed: int = Field(1, ge=-1, le=2**32 - 1)
    width: int = Field(512, ge=64, le=1024)
    height: int = Field(512, ge=64, le=1024)


class XYGrid(BaseModel):
    model: str | None = None  # default: the current checkpoint
    merge_with: str | None = None  # model B for the blocks axis (runtime merge)
    merge_method: str = "weight_sum"  # its method
    merge_c: str | None = None  # model C, for methods that take one
    merge_beta: str | list[float] | None = None  # the method's beta
    merge_elemental: str = ""  # supermerger elemental rules (';'-separated)
    x: str  # e.g. "cfg=5,7,9", "blocks=ALL_A,GRAD_V,ALL_B", "IN05=0,0.5,1"
    y: str | None = None
    z: str | None = None  # one grid per value, stacked
    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "Euler a"
    cfg_scale: float = 7.0
    steps: int = Field(12, ge=1, le=50)
    seed: int = Field(1, ge=-1, le=2**32 - 1)
    width: int = Field(512, ge=64, le=1024)
    height: int = Field(512, ge=64, le=1024)


class LoraUse(BaseModel):
    """A LoRA by name in the LoRA folders, its weight and an optional lora-block-weight."""

    name: str
    weight: float = 1.0
    lbw: str | None = None


class LoraExtract(BaseModel):
    """``baka lora extract``: a LoRA of B - A, written into the first LoRA folder."""

    model_a: str
    model_b: str
    output_name: str
    dim: int = Field(64, ge=1, le=1024)
    conv_dim: int = Field(0, ge=0, le=1024)
    te: bool = False
    clamp_quantile: float = Field(0.99, gt=0, le=1)
    rank_rule: str = "fixed"
    min_diff: float = Field(0.0, ge=0)
    save_precision: str = "float"


class LoraBake(BaseModel):
    """``baka lora bake``: LoRAs merged into a checkpoint, written into the first checkpoint folder."""

    model: str
    loras: list[LoraUse] = Field(min_length=1, max_length=32)
    output_name: str
    dtype: str | None = None


class LoraMerge(BaseModel):
    """``baka lora merge``: LoRAs as one, written into the first LoRA folder."""

    loras: list[LoraUse] = Field(min_length=1, max_length=32)
    output_name: str
    dim: int | None = Field(None, ge=1, le=1024)
    conv_dim: int | None = Field(None, ge=1, le=1024)
    model: str | None = None
    clamp_quantile: float = Field(0.99, gt=0, le=1)
    save_precision: str = "float"


class Scoring(BaseModel):
    """What probe and search judge: a registered scorer (no user code on the server) and how the
    pictures are made."""

    model_a: str
    model_b: str
    score: str = "world"
    prompts: list[str] = Field(default_factory=list, max_length=64)
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=150)
    sampler_name: str = "DPM++ 2M Karras"
    cfg_scale: float = Field(7.0, ge=0, le=30)
    width: int = Field(512, ge=64, le=1024)
    height: int = Field(512, ge=64, le=1024)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    per_prompt: int = Field(1, ge=1, le=8)
    method: str = "weight_sum"
    model_c: str | None = None
    beta: float | None = None
    blocks: list[str] | None = None


class MergeProbe(Scoring):
    """``baka merge probe``: each block of B alone (or left out), scored."""

    weight: float = 1.0
    mode: str = "single"


class MergeSearch(Scoring):
    """``baka merge search``: optuna TPE over the block weights; the best merge optionally written."""

    trials: int = Field(20, ge=1, le=500)
    objective: str | None = None
    minimize: bool = False
    fixed: float = 0.0
    step: float = Field(0.05, ge=0, le=1)
    search_seed: int = 0
    search_beta: bool = False
    output_name: str | None = None
