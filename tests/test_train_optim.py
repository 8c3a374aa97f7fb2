"""kohya's optimizer choices by name, ``optimizer_args`` passed through, ``unet_lr`` / ``text_encoder_lr``
groups and kohya's ``ss_optimizer`` string."""

import pytest
import torch

from baka.errors import BakaError
from baka.train.config import TrainConfig
from baka.train.optim import make_optimizer, optimizer_description, param_groups


def _step(cfg):
    w = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = make_optimizer(cfg, [{"params": [w], "lr": cfg.learning_rate}])
    before = w.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    return opt, before, w.detach()


@pytest.mark.parametrize(
    ("name", "lr", "path"),
    [
        ("AdamW", 0.1, "torch.optim.adamw.AdamW"),
        ("SGD", 0.1, "torch.optim.sgd.SGD"),
        ("Lion", 0.1, "lion_pytorch.lion_pytorch.Lion"),
        ("Prodigy", 1.0, "prodigyopt.prodigy.Prodigy"),
        ("DAdaptAdam", 1.0, "dadaptation.dadapt_adam.DAdaptAdam"),
        ("DAdaptation", 1.0, "dadaptation.dadapt_adam.DAdaptAdam"),
        ("Adafactor", 0.1, "transformers.optimization.Adafactor"),
    ],
)
def test_optimizers_by_kohyas_names_train(name, lr, path):
    cfg = TrainConfig("m", optimizer=name, learning_rate=lr)
    opt, before, after = _step(cfg)
    assert (after.abs() < before.abs()).all(), name  # w^2 went down
    assert optimizer_description(cfg) == path


def test_optimizer_args_reach_the_optimizer():
    cfg = TrainConfig(
        "m", optimizer="Prodigy", learning_rate=1.0, optimizer_args=["d_coef=2", "use_bias_correction=True"]
    )
    opt, _, _ = _step(cfg)
    assert opt.param_groups[0]["d_coef"] == 2 and opt.param_groups[0]["use_bias_correction"] is True
    assert optimizer_description(cfg) == "prodigyopt.prodigy.Prodigy(d_coef=2,use_bias_correction=True)"
    table = TrainConfig("m", optimizer="AdamW", optimizer_args={"betas": [0.8, 0.9]})
    assert tuple(_step(table)[0].param_groups[0]["betas"]) == (0.8, 0.9)
    with pytest.raises(BakaError, match="optimizer AdamW: .*nope"):
        _step(TrainConfig("m", optimizer="AdamW", optimizer_args=["nope=1"]))
    with pytest.raises(BakaError, match="not key=value"):
        _step(TrainConfig("m", optimizer="AdamW", optimizer_args=["nope"]))


def test_optimizer_errors_are_one_line():
    with pytest.raises(BakaError, match="did you mean 'Lion'"):
        _step(TrainConfig("m", optimizer="Lio"))
    if not torch.cuda.is_available():
        with pytest.raises(BakaError, match="AdamW8bit .*CUDA only"):
            _step(TrainConfig("m", optimizer="AdamW8bit"))
    with pytest.raises(BakaError, match="relative_step"):
        _step(TrainConfig("m", optimizer="Adafactor", optimizer_args=["relative_step=True"]))


def test_unet_and_text_encoder_lrs():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    named = {"lora_unet_x.lora_up.weight": (p1, "IN01"), "lora_te_y.lora_up.weight": (p2, "BASE")}
    cfg = TrainConfig("m", learning_rate=1e-4, unet_lr=3e-4, text_encoder_lr=5e-5)
    _, groups = param_groups(named, cfg)
    assert sorted(g["lr"] for g in groups) == [5e-5, 3e-4]


def test_a_user_registered_optimizer_class_works():
    """An optimizer class added to the registry by a user (the GPU bench does) trains and is described."""
    from baka.train.optim import OPTIMIZERS

    class MyAdamW(torch.optim.AdamW):
        pass

    OPTIMIZERS.add("MyAdamWForTest", MyAdamW)
    cfg = TrainConfig("m", optimizer="MyAdamWForTest", learning_rate=0.1)
    opt, before, after = _step(cfg)
    assert isinstance(opt, MyAdamW) and (after.abs() < before.abs()).all()
    assert optimizer_description(cfg).endswith("MyAdamW")


def test_loraplus_ratios():
    """LoRA+ (kohya's loraplus_lr_ratio, per-component overrides): up matrices at ratio x the LR."""
    from baka.train.config import NetworkConfig

    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]
    named = {
        "lora_unet_x.up.weight": (ps[0], "IN01"),
        "lora_unet_x.down.weight": (ps[1], "IN01"),
        "lora_te_y.up.weight": (ps[2], "BASE"),
        "lora_te_y.down.weight": (ps[3], "BASE"),
    }
    net = NetworkConfig(loraplus_lr_ratio=16, loraplus_text_encoder_lr_ratio=4)
    cfg = TrainConfig("m", learning_rate=1e-4, text_encoder_lr=5e-5, network=net)
    _, groups = param_groups(named, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert [lr_of[id(p)] for p in ps] == pytest.approx([16e-4, 1e-4, 4 * 5e-5, 5e-5])
