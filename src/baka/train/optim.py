"""What trains and how fast: EveryDream2 text-encoder freezing, the trainable parameters by block,
block-wise LR weights (weight 0 freezes a block), the text-encoder LR, the optimizer, and EMA."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS
from baka.registry import Registry
from baka.train.config import TrainConfig
from baka.train.modes import Trainable
from baka.train.network import block_lr_weights

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # (param groups, lr=, **kwargs) -> optimizer
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


def _from(module: str, cls: str, package: str, cuda: bool = False) -> OptimizerFactory:
    """An optimizer class of a maintained package (kohya's choices), imported when used."""

    def make(groups, **kw) -> torch.optim.Optimizer:
        import importlib

        if cuda and not torch.cuda.is_available():
            raise BakaError(f"optimizer {cls} ({package}) runs on CUDA only; this machine has no GPU")
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise BakaError(f"optimizer {cls} needs the {package} package (pip install {package})") from None
        return getattr(mod, cls)(groups, **kw)

    make.target = (module, cls)  # type: ignore[attr-defined]
    return make


def _adafactor(groups, **kw) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # baka's LR schedulers set the LR, so Adafactor's own relative-step schedule stays off (kohya's
    # usual SD arguments: relative_step / scale_parameter / warmup_init False)
    kw = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **kw}
    if kw["relative_step"] or kw["warmup_init"]:
        raise BakaError(
            "Adafactor: relative_step / warmup_init would replace the LR schedule; set them False"
        )
    return Adafactor(groups, **kw)


_adafactor.target = ("transformers.optimization", "Adafactor")  # type: ignore[attr-defined]


for _name, _factory in {
    "AdamW": _from("torch.optim", "AdamW", "torch"),
    "Adam": _from("torch.optim", "Adam", "torch"),
    "SGD": _from("torch.optim", "SGD", "torch"),
    "Lion": _from("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": _from("prodigyopt", "Prodigy", "prodigyopt"),
    "DAdaptAdam": _from("dadaptation", "DAdaptAdam", "dadaptation"),
    "DAdaptSGD": _from("dadaptation", "DAdaptSGD", "dadaptation"),
    "DAdaptAdaGrad": _from("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "DAdaptLion": _from("dadaptation", "DAdaptLion", "dadaptation"),
    "Adafactor": _adafactor,
    "AdamW8bit": _from("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", cuda=True),
    "Lion8bit": _from("bitsandbytes.optim", "Lion8bit", "bitsandbytes", cuda=True),
    "PagedAdamW8bit": _from("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", cuda=True),
}.items():
    OPTIMIZERS.add(_name, _factory, aliases=("DAdaptation",) if _name == "DAdaptAdam" else ())


def optimizer_args(cfg: TrainConfig) -> dict:
    """kohya's ``optimizer_args``: a list of ``key=value`` strings (values read as Python literals) or
    a TOML table, passed to the optimizer as keyword arguments."""
    import ast

    args = cfg.optimizer_args
    if isinstance(args, dict):
        return dict(args)
    out = {}
    for item in args:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise BakaError(f"optimizer_args: {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def trainable_te_layers(cfg: TrainConfig, n: int) -> int:
    """How many of the last CLIP layers train, by EveryDream2's rules (optimizer/optimizers.py
    ``_apply_text_encoder_freeze``): ``unfreeze_last_n_layers`` wins over the older
    ``freeze_front_n_layers`` (N: the first N frozen; -N: all but the last N); neither: all ``n``."""
    if cfg.unfreeze_last_n_layers is not None:
        keep = cfg.unfreeze_last_n_layers
    elif cfg.freeze_front_n_layers is not None:
        f = cfg.freeze_front_n_layers
        keep = -f if f < 0 else n - f
    else:
        return n
    if keep <= 0:
        raise BakaError(f"the text encoder's trainable layers must be at least 1 (ED2), not {keep}")
    return min(n, keep)


def freeze_text_encoder(te: nn.Module, cfg: TrainConfig) -> set[int]:
    """EveryDream2 freezing by requires_grad, with ED2's defaults: the embeddings train unless only some
    layers do (or ``freeze_embeddings``), the final layer norm trains unless ``freeze_final_layer_norm``.
    Returns the indices of CLIP layers left trainable."""
    tm = getattr(te, "text_model", te)
    n = len(tm.encoder.layers)
    te.requires_grad_(cfg.train_text_encoder)
    if not cfg.train_text_encoder:
        return set()
    keep = trainable_te_layers(cfg, n)
    for i, layer in enumerate(tm.encoder.layers):
        layer.requires_grad_(i >= n - keep)
    freeze_embeddings = keep < n if cfg.freeze_embeddings is None else cfg.freeze_embeddings
    if freeze_embeddings:
        tm.embeddings.requires_grad_(False)
    if cfg.freeze_final_layer_norm:
        tm.final_layer_norm.requires_grad_(False)
    return set(range(n - keep, n))


def trainables(
    cfg: TrainConfig, unet: nn.Module, te: nn.Module, te_layers: set[int], device
) -> tuple[nn.Module | None, Trainable]:
    """(the mode's own module: the LoRA network, the embedding being learnt, or None; the trainable
    parameters by name). LoRA and embedding freeze the base models; a full fine-tune trains the whole
    UNet and what :func:`freeze_text_encoder` left of the text encoder."""
    from baka.train.modes import MODES

    return MODES.get(cfg.mode).build(cfg, unet, te, te_layers, device)


def _is_text_encoder(name: str) -> bool:
    return "lora_te_" in name or name.startswith("text_encoder.")


def _loraplus(cfg: TrainConfig, text_encoder: bool) -> float:
    """LoRA+'s LR ratio for the up matrices (the component's own ratio first, as kohya)."""
    n = cfg.network
    own = n.loraplus_text_encoder_lr_ratio if text_encoder else n.loraplus_unet_lr_ratio
    ratio = own if own is not None else n.loraplus_lr_ratio
    return 1.0 if ratio is None else float(ratio)


def param_groups(named: Trainable, cfg: TrainConfig) -> tuple[Trainable, list[dict]]:
    """Optimizer groups, one per (block, lr): lr = (text_encoder_lr or learning_rate) * block weight.
    Parameters of a block with LR weight 0 are frozen (requires_grad off) and left out. Returns the
    parameters still trainable and the groups."""
    lr_w = block_lr_weights(cfg.network)
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    groups: dict[tuple[str, float, bool], list] = {}  # text encoder and UNet apart, as kohya
    for name, (p, block) in named.items():
        w = lr_w[block]
        if w == 0:
            p.requires_grad_(False)
            continue
        te = _is_text_encoder(name)
        lr = (te_lr if te else unet_lr) * w * (_loraplus(cfg, te) if name.endswith(".up.weight") else 1.0)
        groups.setdefault((block, lr, te), []).append(p)
    named = {k: v for k, v in named.items() if v[0].requires_grad}
    if not named:
        raise BakaError("nothing to train: every block has LR weight 0 or dim 0")
    return named, [{"params": ps, "lr": lr, "block": b, "te": te} for (b, lr, te), ps in groups.items()]


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups`` (each with its own lr), ``weight_decay`` and the
    ``optimizer_args``; an unknown name suggests the nearest, a missing package names it."""
    kw = {"weight_decay": cfg.weight_decay} if OPTIMIZERS.canonical(cfg.optimizer) != "SGD" else {}
    kw |= optimizer_args(cfg)
    try:
        return OPTIMIZERS.get(cfg.optimizer)(groups, lr=cfg.learning_rate, **kw)
    except TypeError as e:  # an argument the optimizer does not take
        raise BakaError(f"optimizer {cfg.optimizer}: {e}") from None


def optimizer_description(cfg: TrainConfig) -> str:
    """kohya's ``ss_optimizer``: the optimizer class's module.name and, given, its arguments."""
    import importlib

    entry = OPTIMIZERS.get(cfg.optimizer)
    target = getattr(entry, "target", None)
    if target is None:  # registered by a user as an optimizer class (or any factory) itself
        name = f"{entry.__module__}.{getattr(entry, '__qualname__', cfg.optimizer)}"
    else:
        module, cls = target
        try:
            klass = getattr(importlib.import_module(module), cls)
            name = f"{klass.__module__}.{klass.__name__}"
        except ImportError:
            name = f"{module}.{cls}"
    args = optimizer_args(cfg)
    return name + (f"({','.join(f'{k}={v}' for k, v in args.items())})" if args else "")


# diffusers' schedules under kohya's names (piecewise_constant needs step rules: not offered)
LR_SCHEDULERS: Registry[str] = Registry("LR scheduler")
for _name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
    LR_SCHEDULERS.add(_name, _name)


def warmup_steps(cfg: TrainConfig) -> int:
    """kohya: ``lr_warmup_steps`` below 1 is a fraction of ``max_steps``."""
    w = cfg.lr_warmup_steps
    return int(w * cfg.max_steps) if 0 < w < 1 else int(w)


def make_lr_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """One step per optimizer step; the LR is a pure function of the step (so resume only sets the step)."""
    from diffusers.optimization import get_scheduler

    name = LR_SCHEDULERS.get(cfg.lr_scheduler)
    warm = warmup_steps(cfg)
    if name == "constant" and warm:  # kohya refuses this too: warmup needs constant_with_warmup
        raise BakaError(
            f"lr_scheduler 'constant' takes no warmup (lr_warmup_steps = {cfg.lr_warmup_steps});"
            " use 'constant_with_warmup'"
        )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warm,
        num_training_steps=cfg.max_steps,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
    )


def by_block(named: Trainable) -> dict[str, list[nn.Parameter]]:
    out: dict[str, list[nn.Parameter]] = {b: [] for b in BLOCK_IDS}
    for p, b in named.values():
        out[b].append(p)
    return out


class EMA:
    """Exponential moving average of the trainable parameters, in float32: ema = d * ema + (1 - d) * p."""

    def __init__(self, named: Trainable, decay: float):
        self.named, self.decay = named, decay
        self.shadow = {k: p.detach().float().clone() for k, (p, _) in named.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, (p, _) in self.named.items():
            self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for k, (p, _) in self.named.items():
            p.copy_(self.shadow[k].to(p.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a checkpoint: ``ema.<name>`` -> tensor."""
        return {f"ema.{k}": v for k, v in self.shadow.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: tensors[f"ema.{k}"].float() for k in self.named}
