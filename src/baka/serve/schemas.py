"""Request bodies of the server's routes (pydantic validates them; a bad field is a 422)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Txt2Img(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=150)
    sampler_name: str = "Euler a"
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
    denoising_strength: float = Field(0.7, ge=0, le=1)
    override_settings: dict = Field(default_factory=dict)


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list)  # base64 / data: URLs; the first is used
    resize_mode: int = Field(0, ge=0, le=2)  # Just resize, Crop and resize, Resize and fill
    denoising_strength: float = Field(0.75, ge=0, le=1)  # A1111's img2img default
    mask: str | None = None


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
