"""Training configuration from TOML. The dataset part accepts kohya's dataset TOML layout
(``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]`` with ``image_dir``, ``num_repeats``,
``keep_tokens``, ``shuffle_caption``, ``caption_extension``, ``caption_dropout_rate``,
``caption_tag_dropout_rate``, ``resolution``, ``enable_bucket``, ``min_bucket_reso``,
``max_bucket_reso``, ``bucket_reso_steps``), either inline or in a separate file."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from baka.errors import BakaError

if TYPE_CHECKING:
    from baka.train.loss import LossWeighting


SAVE_PRECISIONS = ("float", "fp16", "bf16")


@dataclass
class Subset:
    image_dir: str
    num_repeats: int = 1
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_extension: str = ".txt"
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_separator: str = ","
    caption_prefix: str = ""  # kohya: "prefix caption suffix", before dropout / shuffle
    caption_suffix: str = ""
    class_tokens: str = ""  # kohya: the caption of an image without a caption file
    flip_aug: bool = False  # kohya: each step an image is mirrored with probability 1/2


@dataclass
class DatasetConfig:
    subsets: list[Subset]
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    batch_size: int = 1
    cache_latents: bool = True
    validation_split: float = 0.0


@dataclass
class NetworkConfig:
    dim: int = 8
    alpha: float = 8.0
    conv_dim: int = 0  # > 0: LoCon, also train the resnet/sampler convs
    conv_alpha: float = 1.0
    dropout: float = 0.0  # kohya network_dropout: on the down projection's output
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    block_dims: list[int] | None = None  # 25 values IN00..IN11, M00, OUT00..OUT11
    block_alphas: list[float] | None = None
    down_lr_weight: str | list[float] | None = None  # 12 values or a preset (cosine, sine, linear, ...)
    mid_lr_weight: float | None = None
    up_lr_weight: str | list[float] | None = None
    # LoRA+ (Hayou et al. 2024; kohya's network_args): the up matrices train at ratio x the LR
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None  # overrides it for the UNet
    loraplus_text_encoder_lr_ratio: float | None = None  # ... and for the text encoder


@dataclass
class TrainConfig:
    model: str
    output_dir: str = "train-output"
    output_name: str = "baka"
    mode: str = "lora"  # lora | full | embedding (baka.train.modes.MODES)
    # textual inversion (mode = "embedding"), kohya's names: the word captions use, the word whose token
    # embeddings start the vectors, how many vectors; the file is named output_name
    token_string: str | None = None
    init_word: str = "*"
    num_vectors_per_token: int = 1
    save_model_as: str = "safetensors"  # embedding files: safetensors (kohya) | pt (A1111)
    max_steps: int = 100
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    unet_lr: float | None = None  # kohya: the UNet's own LR (default learning_rate)
    train_text_encoder: bool = False
    unfreeze_last_n_layers: int | None = None  # EveryDream2: only the last N CLIP layers train
    freeze_embeddings: bool = True
    freeze_final_layer_norm: bool = True
    clip_skip: int = 1  # kohya / A1111: condition on CLIP layer -N (anime SD1 models use 2)
    max_token_length: int = 75  # kohya: 75, 150 or 225 caption tokens (A1111's 75-token chunks)
    optimizer: str = "AdamW"  # kohya's names (baka.train.optim.OPTIMIZERS)
    optimizer_args: list[str] | dict = field(default_factory=list)  # kohya: ["key=value", ...]
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1  # kohya: micro-batches per optimizer step (max_steps counts steps)
    seed: int = 0
    mixed_precision: str = "no"
    save_precision: str = "float"  # kohya's --save_precision for the LoRA file: float | fp16 | bf16
    v_prediction: bool = False
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    # kohya's other per-timestep loss weights (baka.train.loss.LossWeighting)
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0
    debiased_estimation_loss: bool = False
    # LR schedule (diffusers' get_scheduler; kohya's names). Warmup: steps, or a fraction of max_steps if < 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    noise_offset: float = 0.0
    min_timestep: int = 0  # kohya: t drawn uniformly from [min_timestep, max_timestep)
    max_timestep: int | None = None  # None: the schedule's length (1000)
    ema_decay: float | None = None
    save_every: int = 0  # steps between resumable checkpoints (0: only at the end)
    save_every_n_steps: int = 0  # kohya: also write the output (LoRA / model / embedding) every N steps
    save_every_n_epochs: int = 0  # kohya: ... and at the end of every N epochs
    network_weights: str | None = None  # kohya: continue from this LoRA file (its modules must fit)
    validate_every: int = 0
    # kohya's sample settings (baka.train.samples): prompts inline or a .txt / .toml / .json file
    sample_prompts: list | str = field(default_factory=list)
    sample_every_n_steps: int = 0
    sample_every: int = 0  # baka's older name of sample_every_n_steps
    sample_every_n_epochs: int = 0  # wins over sample_every_n_steps, as in kohya
    sample_at_first: bool = False
    sample_steps: int = 30  # a prompt's steps unless it says --s
    sample_sampler: str = "ddim"  # kohya's names (ddim, k_euler_a, dpmsolver++, ...) or A1111's
    block_dropout: dict[str, str] = field(default_factory=dict)  # block -> "step:p, step:p, ..."
    network: NetworkConfig = field(default_factory=NetworkConfig)
    dataset: DatasetConfig | None = None

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def loss_weighting(self) -> LossWeighting:
        from baka.train.loss import LossWeighting

        return LossWeighting(
            self.min_snr_gamma,
            self.scale_v_pred_loss_like_noise_pred,
            self.v_pred_like_loss,
            self.debiased_estimation_loss,
        )


def _build(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], names, n=1)
        raise BakaError(
            f"{where}: unknown setting {unknown[0]!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        )
    return cls(**data)


# kohya dataset keys baka does not build yet: refused by name, never silently dropped
KOHYA_UNSUPPORTED = (
    "is_reg",
    "color_aug",
    "random_crop",
    "face_crop_aug_range",
    "token_warmup_min",
    "token_warmup_step",
    "secondary_separator",
    "enable_wildcard",
    "keep_tokens_separator",
    "metadata_file",
    "conditioning_data_dir",
    "alpha_mask",
    "caption_dropout_every_n_epochs",
    "cache_latents_to_disk",
)


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key in allowed:
            continue
        if key in KOHYA_UNSUPPORTED:
            raise BakaError(f"{where}: kohya's {key!r} is not supported by baka yet; remove it")
        import difflib

        hint = difflib.get_close_matches(key, sorted(allowed), n=1)
        raise BakaError(
            f"{where}: unknown dataset setting {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        )


def parse_dataset_toml(data: dict, where: str) -> DatasetConfig:
    """kohya dataset TOML: general settings, then datasets with subsets (first dataset's settings win).
    Every key at every level is a known setting, or an error naming it."""
    general = dict(data.get("general", {}))
    datasets = data.get("datasets") or []
    if not datasets:
        raise BakaError(f"{where}: no [[datasets]] in the dataset config")
    subset_fields = {f.name for f in dataclasses.fields(Subset)}
    ds_fields = {f.name for f in dataclasses.fields(DatasetConfig)} - {"subsets"}
    _check_keys(general, subset_fields | ds_fields, f"{where} [general]")
    for ds in datasets:
        _check_keys(ds, subset_fields | ds_fields | {"subsets"}, f"{where} [[datasets]]")
        for sub in ds.get("subsets", []):
            _check_keys(sub, subset_fields, f"{where} [[datasets.subsets]]")
    settings = {k: v for k, v in general.items() if k in ds_fields}
    subsets = []
    for ds in datasets:
        settings.update({k: v for k, v in ds.items() if k in ds_fields})
        for sub in ds.get("subsets", []):
            merged = {k: v for k, v in {**general, **ds, **sub}.items() if k in subset_fields}
            if "image_dir" not in merged:
                raise BakaError(f"{where}: a subset has no image_dir")
            subsets.append(Subset(**merged))
    if isinstance(settings.get("resolution"), list):
        settings["resolution"] = int(settings["resolution"][0])
    return DatasetConfig(subsets=subsets, **settings)


def _check_samples(cfg: TrainConfig, path: Path) -> None:
    """kohya's sample settings, checked before training: the prompts parse, the samplers exist, and a
    prompt file's path is taken relative to the config file (as ``dataset_config`` is)."""
    from baka.generate.samplers import SAMPLERS
    from baka.train.samples import load_prompts

    if cfg.sample_every and cfg.sample_every_n_steps and cfg.sample_every != cfg.sample_every_n_steps:
        raise BakaError(f"{path}: sample_every and sample_every_n_steps disagree; keep one")
    cfg.sample_every_n_steps = cfg.sample_every_n_steps or cfg.sample_every
    if isinstance(cfg.sample_prompts, str):
        cfg.sample_prompts = str((path.parent / cfg.sample_prompts).resolve())
    try:
        for name in {cfg.sample_sampler, *(p.sampler for p in load_prompts(cfg.sample_prompts) if p.sampler)}:
            SAMPLERS.get(name)
    except BakaError as e:
        raise BakaError(f"{path}: {e}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise BakaError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise BakaError(f"{path}: invalid TOML ({e})") from None
    data.update(overrides or {})
    net = data.pop("network", {})
    dataset = data.pop("dataset", None)
    if "datasets" in data:  # kohya dataset tables inline in the training config
        dataset = {"datasets": data.pop("datasets"), "general": data.pop("general", {})}
    dataset_config = data.pop("dataset_config", None)
    if dataset_config:
        dpath = (path.parent / dataset_config).resolve()
        try:
            dataset = tomllib.loads(dpath.read_text())
        except OSError as e:
            raise BakaError(f"{dpath}: cannot read dataset config ({e.strerror})") from None
    if "model" not in data:
        raise BakaError(f"{path}: 'model' (the base checkpoint) is required")
    cfg = _build(TrainConfig, data, str(path))
    cfg.network = _build(NetworkConfig, net, f"{path} [network]")
    if dataset is None:
        raise BakaError(f"{path}: no dataset (a [[datasets]] table, or dataset_config = 'file.toml')")
    cfg.dataset = parse_dataset_toml(dataset, str(path))
    _check_samples(cfg, path)
    hi = 1000 if cfg.max_timestep is None else cfg.max_timestep
    if not 0 <= cfg.min_timestep < hi <= 1000:
        raise BakaError(
            f"{path}: min_timestep {cfg.min_timestep} / max_timestep {cfg.max_timestep}:"
            " need 0 <= min_timestep < max_timestep <= 1000"
        )
    if cfg.save_precision not in SAVE_PRECISIONS:
        raise BakaError(
            f"{path}: save_precision must be one of {', '.join(SAVE_PRECISIONS)}, not {cfg.save_precision!r}"
        )
    from baka.train.modes import MODES

    try:
        cfg.mode = MODES.canonical(cfg.mode)
    except BakaError as e:
        raise BakaError(f"{path}: {e}") from None
    if cfg.mode == "embedding" and not cfg.token_string:
        raise BakaError(f"{path}: mode 'embedding' needs token_string (the word captions use for it)")
    if cfg.save_model_as not in ("safetensors", "pt"):
        raise BakaError(f"{path}: save_model_as must be 'safetensors' or 'pt', not {cfg.save_model_as!r}")
    try:
        check_text_settings(cfg)
        check_steps(cfg)
    except BakaError as e:
        raise BakaError(f"{path}: {e}") from None
    return cfg


def check_steps(cfg: TrainConfig) -> None:
    if cfg.gradient_accumulation_steps < 1:
        raise BakaError(
            f"gradient_accumulation_steps must be at least 1, not {cfg.gradient_accumulation_steps}"
        )


def check_text_settings(cfg: TrainConfig) -> None:
    """kohya's ranges: ``max_token_length`` 75 / 150 / 225, ``clip_skip`` from 1 (to the encoder's 12)."""
    if cfg.max_token_length not in (75, 150, 225):
        raise BakaError(f"max_token_length must be 75, 150 or 225 (kohya), not {cfg.max_token_length}")
    if not 1 <= cfg.clip_skip <= 12:
        raise BakaError(f"clip_skip must be from 1 to 12, not {cfg.clip_skip}")
