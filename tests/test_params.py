"""The one parameter table: CLI flags, A1111 API fields and infotext keys of every GenParams field
agree, and each path builds the same GenParams."""

import argparse

import pytest

from baka.errors import BakaError
from baka.generate import infotext
from baka.generate.freeu import parse_freeu
from baka.generate.params import PARAMS, GenParams, add_cli_args, ordered_infotext

FULL = GenParams(
    "a (cat:1.2), masterpiece",
    "lowres",
    steps=12,
    sampler="DPM++ 2M Karras",
    cfg=5.5,
    seed=42,
    width=600,
    height=896,
    clip_skip=2,
    guidance_rescale=0.7,
    zero_snr=True,
    v_pred=True,
    freeu=parse_freeu("sd1-v2"),
    emphasis="No norm",
    pad_cond_uncond=True,
)


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_cli_args(p)
    return GenParams.from_cli(p.parse_args(list(argv)))


def test_every_field_is_in_the_table_once():
    names = [r.name for r in PARAMS]
    assert sorted(names) == sorted(GenParams.__dataclass_fields__) and len(set(names)) == len(names)


def test_cli_defaults_are_genparams_defaults():
    assert _parse() == GenParams("")


def test_cli_builds_the_same_params():
    got = _parse(
        *("-p", FULL.prompt, "-n", FULL.negative, "--steps", "12", "--sampler", "DPM++ 2M Karras"),
        *("--cfg", "5.5", "--seed", "42", "-W", "600", "-H", "896", "--clip-skip", "2"),
        *("--cfg-rescale", "0.7", "--zero-snr", "--v-pred", "--freeu", "sd1-v2", "--emphasis", "No norm"),
        "--pad-cond-uncond",
    )
    assert got == FULL


def test_infotext_round_trip_through_a1111_keys():
    fields = FULL.infotext_fields()
    assert fields["Size"] == "600x896"
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert fields["CFG scale"] == "5.5" and fields["Clip skip"] == 2
    assert fields["Noise Schedule"] == "Zero Terminal SNR" and fields["Prediction"] == "v_prediction"
    assert fields["Pad conds"] == "True"
    text = infotext.build(FULL.prompt, FULL.negative, ordered_infotext(fields))
    assert GenParams.from_infotext(text) == FULL.replace(batch=1)
    # defaults write nothing optional
    plain = GenParams("x").infotext_fields()
    assert {k for k, v in plain.items() if v is not None} == {"Steps", "Sampler", "CFG scale", "Seed", "Size"}


def test_a1111_schedule_type_is_folded_into_the_sampler():
    text = "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    assert GenParams.from_infotext(text).sampler == "DPM++ 2M Karras"


def test_api_body_and_options():
    body = {
        "prompt": "p",
        "negative_prompt": "n",
        "steps": 9,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "cfg_scale": 4.0,
        "seed": 3,
        "width": 640,
        "height": 384,
        "batch_size": 2,
        "n_iter": 3,  # batch count is the server's loop, not a GenParams field
    }
    got = GenParams.from_api(body, {"CLIP_stop_at_last_layers": 2})
    want = GenParams(
        "p", "n", steps=9, sampler="DPM++ 2M Karras", cfg=4.0, seed=3, width=640, height=384, batch=2
    )
    assert got == want.replace(clip_skip=2)
    assert GenParams.from_api({**body, "scheduler": "Automatic"}, {}).sampler == "DPM++ 2M"
    with pytest.raises(BakaError, match="CLIP_stop_at_last_layers"):
        GenParams.from_api(body, {"CLIP_stop_at_last_layers": "abc"})


def test_built_by_keyword():
    with pytest.raises(TypeError):
        GenParams("a", "b", 20)  # steps and the rest are keyword-only
