"""Training configuration from TOML. The dataset part accepts kohya's dataset TOML layout
(``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]`` with ``image_dir``, ``num_repeats``,
``keep_tokens``, ``shuffle_caption``, ``caption_extension``, ``caption_dropout_rate``,
``caption_tag_dropout_rate``, ``resolution``, ``enable_bucket``, ``min_bucket_reso``,
``max_bucket_reso``, ``bucket_reso_steps``, ``flip_aug``, ``random_crop``, ``color_aug``, ``is_reg``, ...),
either inline or in a separate file, or kohya's folder layout (``train_data_dir`` / ``reg_data_dir`` with
``N_name`` subfolders and kohya's command-line dataset names at the top level)."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from baka.errors import BakaError

if TYPE_CHECKING:
    from baka.train.loss import LossWeighting


log = logging.getLogger(__name__)

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
    random_crop: bool = False  # kohya: crop the resized image at a random place, not its centre
    color_aug: bool = False  # kohya: weak hue / gamma changes (baka.train.augment)
    is_reg: bool = False  # kohya: regularisation images (prior_loss_weight, repeats balanced to training)
    recursive: bool = False  # EveryDream2: images in subfolders too (each folder may have multiply.txt)
    # EveryDream2: an image whose files give no main prompt takes its file name, up to the first "_"
    caption_from_filename: bool = False


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
    cache_latents_to_disk: bool = False  # kohya: latents in files (latent_cache_dir), not in memory
    latent_cache_dir: str | None = None  # default: output_dir/latent_cache
    validation_split: float = 0.0


@dataclass
class NetworkConfig:
    algo: str = "lora"  # lora (LoCon with conv_dim) | loha | lokr (LyCORIS's names; baka.train.network.ALGOS)
    dora_wd: bool = False  # LyCORIS: DoRA's weight decomposition (a magnitude per output channel)
    factor: int = -1  # LoKr: LyCORIS's factorisation limit (-1: the most balanced split)
    decompose_both: bool = False  # LoKr: the small Kronecker factor as a low-rank product too
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
    # EveryDream2's text-encoder freezing, with ED2's defaults (baka.train.optim.freeze_text_encoder)
    unfreeze_last_n_layers: int | None = None  # only the last N CLIP layers train (None: all)
    freeze_front_n_layers: int | None = None  # ED2's older name: N front layers frozen (-N: all but N)
    freeze_embeddings: bool | None = None  # None: ED2's rule (frozen when only some layers train)
    freeze_final_layer_norm: bool = False  # ED2 trains the final layer norm unless told not to
    clip_skip: int = 1  # kohya / A1111: condition on CLIP layer -N (anime SD1 models use 2)
    max_token_length: int = 75  # kohya: 75, 150 or 225 caption tokens (A1111's 75-token chunks)
    # kohya: captions' A1111 emphasis ("(red:1.3)") weights the text encoder's states, as in generation
    weighted_captions: bool = False
    # how the weights apply (A1111's emphasis modes): "No norm" (kohya today), "Original" (A1111 default)
    weighted_captions_emphasis: str = "No norm"
    optimizer: str = "AdamW"  # kohya's names (baka.train.optim.OPTIMIZERS)
    optimizer_args: list[str] | dict = field(default_factory=list)  # kohya: ["key=value", ...]
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1  # kohya: micro-batches per optimizer step (max_steps counts steps)
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False  # kohya: recompute activations in backward (less memory)
    sdpa: bool = True  # kohya: torch's scaled-dot-product attention (diffusers' default); false: plain
    xformers: bool = False  # kohya: xformers attention; baka uses SDPA (true is refused)
    training_comment: str | None = None  # kohya: written to ss_training_comment
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
    # baka: below this timestep the caption is dropped and the captioned prediction trained to the
    # uncaptioned one, so CFG does nothing on the low-noise steps (baka.train.loss.caption_free_loss; 0: off)
    caption_free_below_timestep: int = 0
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
    prior_loss_weight: float = 1.0  # kohya: loss weight of the regularisation (is_reg) images
    cache_text_encoder_outputs: bool = False  # kohya: a frozen encoder's states, once per caption
    # kohya's logging (baka.train.logs): logging_dir alone means TensorBoard
    log_with: str | None = None  # tensorboard | wandb | all
    logging_dir: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None  # default: kohya's per-script name (network_train, finetuning)
    log_config: bool = False  # kohya: the training settings as the run's hyperparameters
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


# kohya's command-line dataset arguments, taken with train_data_dir (its folder layout); the dataset
# setting each one fills
KOHYA_DATASET_ARGS = {
    "train_batch_size": "batch_size",
    **{
        k: k
        for k in (
            "resolution",
            "enable_bucket",
            "min_bucket_reso",
            "max_bucket_reso",
            "bucket_reso_steps",
            "caption_extension",
            "caption_separator",
            "shuffle_caption",
            "keep_tokens",
            "flip_aug",
            "color_aug",
            "random_crop",
            "caption_dropout_rate",
            "caption_tag_dropout_rate",
            "caption_prefix",
            "caption_suffix",
        )
    },
}


# kohya's latent caching settings are training arguments: taken at the top level with any dataset layout
CACHE_ARGS = ("cache_latents", "cache_latents_to_disk", "latent_cache_dir")


def folder_subsets(root: str | Path, is_reg: bool, where: str) -> list[dict]:
    """kohya's DreamBooth folders: each subfolder ``N_tokens`` of ``root`` is a subset repeated N times
    whose images without a caption file get the caption ``tokens``; other subfolders are skipped with a
    warning, as kohya does."""
    root = Path(root)
    if not root.is_dir():
        raise BakaError(f"{where}: {root} is not a folder")
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        head, _, tokens = sub.name.partition("_")
        if not head.isdigit() or int(head) < 1:
            log.warning("baka: warning: %s: no repeat count in the folder name ('10_name'); skipped", sub)
            continue
        out.append(
            {"image_dir": str(sub), "num_repeats": int(head), "class_tokens": tokens, "is_reg": is_reg}
        )
    if not out:
        if not is_reg:
            raise BakaError(f"{where}: {root} has no 'N_name' image folders (kohya's train_data_dir layout)")
        log.warning("baka: warning: %s has no 'N_name' folders: no regularisation images", root)
    return out


def folder_dataset(data: dict, path: Path) -> dict | None:
    """The dataset of kohya's ``train_data_dir`` / ``reg_data_dir`` (taken out of ``data`` with kohya's
    top-level dataset arguments), as a dataset TOML table; None without ``train_data_dir``."""
    root = data.pop("train_data_dir", None)
    reg = data.pop("reg_data_dir", None)
    general = {KOHYA_DATASET_ARGS[k]: data.pop(k) for k in list(data) if k in KOHYA_DATASET_ARGS}
    if root is None:
        if reg is not None or general:
            name = "reg_data_dir" if reg is not None else next(iter(general))
            raise BakaError(f"{path}: {name!r} goes with train_data_dir (or into a [[datasets]] table)")
        return None
    if isinstance(general.get("resolution"), str):  # kohya: "512" or "512,768"
        general["resolution"] = [int(x) for x in general["resolution"].split(",")]
    where = str(path)
    subsets = folder_subsets(path.parent / root, False, where)
    if reg is not None:
        subsets += folder_subsets(path.parent / reg, True, where)
    return {"general": general, "datasets": [{"subsets": subsets}]}


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
    caching = {k: data.pop(k) for k in CACHE_ARGS if k in data}
    folders = folder_dataset(data, path)
    if folders is not None:
        if dataset is not None or dataset_config:
            raise BakaError(f"{path}: train_data_dir and a dataset table / dataset_config: keep one")
        dataset = folders
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
    for k, v in caching.items():
        setattr(cfg.dataset, k, v)
    _check_samples(cfg, path)
    hi = 1000 if cfg.max_timestep is None else cfg.max_timestep
    if not 0 <= cfg.min_timestep < hi <= 1000:
        raise BakaError(
            f"{path}: min_timestep {cfg.min_timestep} / max_timestep {cfg.max_timestep}:"
            " need 0 <= min_timestep < max_timestep <= 1000"
        )
    if not 0 <= cfg.caption_free_below_timestep <= 1000:
        raise BakaError(
            f"{path}: caption_free_below_timestep must be in 0..1000, not {cfg.caption_free_below_timestep}"
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
    if cfg.cache_text_encoder_outputs:
        check_text_cache(cfg, path)
    if cfg.xformers:
        raise BakaError(f"{path}: xformers is not used by baka; torch's SDPA (sdpa = true) does its job")
    if cfg.prior_loss_weight < 0:
        raise BakaError(f"{path}: prior_loss_weight must be >= 0, not {cfg.prior_loss_weight}")
    if cfg.save_model_as not in ("safetensors", "pt"):
        raise BakaError(f"{path}: save_model_as must be 'safetensors' or 'pt', not {cfg.save_model_as!r}")
    try:
        check_text_settings(cfg)
        check_steps(cfg)
        from baka.train.logs import log_target
        from baka.train.network import module_factory

        log_target(cfg)
        if cfg.mode == "lora":
            module_factory(cfg.network)
    except BakaError as e:
        raise BakaError(f"{path}: {e}") from None
    return cfg


def check_text_cache(cfg: TrainConfig, path: Path) -> None:
    """kohya's conditions for cache_text_encoder_outputs: the encoder does not train, and captions do not
    change from step to step (baka caches per caption, so caption dropout's empty caption is allowed)."""
    why = None
    if cfg.train_text_encoder:
        why = "the text encoder trains (train_text_encoder)"
    elif cfg.mode == "embedding":
        why = "textual inversion changes the encoder's input"
    else:
        assert cfg.dataset is not None
        for s in cfg.dataset.subsets:
            if s.shuffle_caption or s.caption_tag_dropout_rate > 0:
                why = f"{s.image_dir} shuffles or drops tags (every step a new caption)"
                break
    if why:
        raise BakaError(f"{path}: cache_text_encoder_outputs cannot be used: {why}")


def check_steps(cfg: TrainConfig) -> None:
    if cfg.gradient_accumulation_steps < 1:
        raise BakaError(
            f"gradient_accumulation_steps must be at least 1, not {cfg.gradient_accumulation_steps}"
        )


def check_text_settings(cfg: TrainConfig) -> None:
    """kohya's ranges: ``max_token_length`` 75 / 150 / 225, ``clip_skip`` from 1 (to the encoder's 12);
    ``weighted_captions`` with a known emphasis mode, and not for textual inversion."""
    if cfg.max_token_length not in (75, 150, 225):
        raise BakaError(f"max_token_length must be 75, 150 or 225 (kohya), not {cfg.max_token_length}")
    if not 1 <= cfg.clip_skip <= 12:
        raise BakaError(f"clip_skip must be from 1 to 12, not {cfg.clip_skip}")
    if cfg.weighted_captions:
        from baka.generate.conditioning import EMPHASIS
        from baka.train.modes import MODES

        if MODES.canonical(cfg.mode) == "embedding":  # a config built in Python may name an alias
            raise BakaError("weighted_captions: not with mode 'embedding' (its captions are read unweighted)")
        try:
            cfg.weighted_captions_emphasis = EMPHASIS.canonical(cfg.weighted_captions_emphasis)
        except BakaError as e:
            raise BakaError(f"weighted_captions_emphasis: {e}") from None
