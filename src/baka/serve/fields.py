"""A1111 request fields that baka does not build, and which of their values ask for nothing.

A1111 1.10's txt2img / img2img bodies carry many fields; clients such as ``webuiapi`` send most of
them on every call with values that change nothing ("restore_faces": false, "s_churn": 0, "eta": 1
on an ancestral sampler). A field in this table is accepted when its value asks for nothing in
baka's output; any other value, and any field A1111 does not have, is refused with one 422 that
names each such field, unless the server runs with ``--lenient``: then the request goes on and the
response's ``info`` lists what was ignored (``ignored_fields``). Nothing is dropped in silence.

The neutral values are A1111 1.10's defaults (``StableDiffusionProcessing`` and the API models)
and those ``webuiapi`` 0.9.17 sends.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from baka.errors import BakaError
from baka.registry import Registry


class Unsupported(BakaError):
    """A request asks for something baka does not build (HTTP 422; ``--lenient`` ignores it)."""


@dataclass(frozen=True)
class Unbuilt:
    name: str
    neutral: Callable[[Any, Mapping[str, Any]], bool]  # (value, whole body) -> changes nothing here
    what: str  # what A1111 would do with a value that is not neutral


UNBUILT: Registry[Unbuilt] = Registry("unbuilt request field")


def _none_or(*values: Any) -> Callable[[Any, Mapping[str, Any]], bool]:
    # a bool is no number here: "s_churn": false is not A1111's 0
    return lambda v, body: v is None or (not isinstance(v, bool) and v in values)


def _falsy(v: Any, body: Mapping[str, Any]) -> bool:
    return not v


def _any(v: Any, body: Mapping[str, Any]) -> bool:
    return True


def _when_off(gate: str) -> Callable[[Any, Mapping[str, Any]], bool]:
    """Neutral whatever it holds while ``gate`` is off (s_tmin without s_churn, script_args, no script)."""
    return lambda v, body: not body.get(gate)


def _eta_neutral(v: Any, body: Mapping[str, Any]) -> bool:
    """eta asks for nothing when it is what baka runs the sampler at, or the sampler has no eta."""
    from baka.generate.samplers import SAMPLERS, split_name

    if v is None:
        return True
    name = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    try:
        eta = SAMPLERS.get(split_name(str(name))[0]).eta
    except BakaError:
        return True  # an unknown sampler is refused with its own message
    return eta is None or v == eta


def _noise_from_neutral(v: Any, body: Mapping[str, Any]) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v <= 0)


def _same_checkpoint(v: Any, body: Mapping[str, Any]) -> bool:
    return v in (None, "", "Use same checkpoint")


def _add(name: str, neutral: Callable[[Any, Mapping[str, Any]], bool], what: str) -> None:
    UNBUILT.add(name, Unbuilt(name, neutral, what))


# -- fields baka does not build: accepted only with their neutral values ------------------------------
_add("styles", lambda v, body: not v, "apply saved prompt styles (baka has none: /prompt-styles is empty)")
_add("restore_faces", _falsy, "run a face restorer (GFPGAN / CodeFormer)")
_add("tiling", _falsy, "make a tileable picture")
_add("subseed_strength", _none_or(0), "mix in a variation seed")
_add("subseed", _when_off("subseed_strength"), "mix in a variation seed")
_add("seed_resize_from_h", _noise_from_neutral, "draw the noise at another size")
_add("seed_resize_from_w", _noise_from_neutral, "draw the noise at another size")
_add("eta", _eta_neutral, "run the sampler at another eta (baka: DDIM 0, ancestral and SDE samplers 1)")
_add("s_churn", _none_or(0), "add churn noise (k-diffusion's Euler / Heun / DPM2)")
_add("s_tmin", _when_off("s_churn"), "bound the churn")
_add("s_tmax", _when_off("s_churn"), "bound the churn")
_add("s_noise", _none_or(1), "scale the sampler's added noise")
_add("s_min_uncond", _none_or(0), "skip the negative prompt at low sigmas")
_add("script_name", lambda v, body: not v, "run a script (baka runs none)")
_add("script_args", _when_off("script_name"), "pass arguments to the script")
_add("hr_checkpoint_name", _same_checkpoint, "run the hires pass on another checkpoint")
_add("refiner_checkpoint", _none_or("", "None"), "switch to a refiner checkpoint")
_add("disable_extra_networks", _falsy, "leave <lora:...> tags unapplied")
_add("infotext", lambda v, body: not v, "read the parameters from an infotext")
_add("mask_round", lambda v, body: v is None or v is True, "use a soft (unrounded) mask")
_add("initial_noise_multiplier", _none_or(1), "scale img2img's initial noise")
_add("latent_mask", lambda v, body: not v, "use another mask for the latent blend")
# fields that change nothing in baka whatever they hold
for _name, _why in (
    ("do_not_save_samples", "saving is save_images"),
    ("do_not_save_grid", "baka writes no grid for API calls"),
    ("comments", "not part of the picture"),
    ("force_task_id", "a job id"),
    ("refiner_switch_at", "only with a refiner checkpoint"),
    ("firstphase_width", "unused since A1111 1.6"),
    ("firstphase_height", "unused since A1111 1.6"),
    ("image_cfg_scale", "instruct-pix2pix models only, which baka does not load"),
):
    _add(_name, _any, _why)


def _script_disabled(args: Any) -> bool:
    """An ``alwayson_scripts`` entry that asks for nothing: no arguments, or the extensions'
    convention of a first ``enabled`` argument set to false (``{"ADetailer": {"args": [false]}}``)."""
    if isinstance(args, Mapping):
        args = args.get("args", [])
    if isinstance(args, list | tuple):
        return not args or args[0] is False
    return False


# alwayson scripts baka builds (lowercased titles, as A1111 matches them)
BUILT_SCRIPTS = ("dynamic thresholding (cfg scale fix)",)


def check(
    body: Mapping[str, Any],
    extra: Mapping[str, Any],
    *,
    lenient: bool,
    options: Collection[str] | None = None,
) -> list[str]:
    """The request fields that ask for something baka does not build: raises Unsupported naming
    them all, or (``lenient``) returns their names. ``extra`` holds the fields the schema does not
    know (pydantic's ``model_extra``); ``body`` the whole request, for the fields' conditions;
    ``options`` the A1111 options baka has (``override_settings`` may set only those)."""
    refused: dict[str, str] = {}  # field -> why
    for name, value in extra.items():
        if name not in UNBUILT:
            refused[name] = f"{name!r}: not an A1111 1.10 request field"
        elif not UNBUILT.get(name).neutral(value, body):
            refused[name] = f"{name}={value!r}: would {UNBUILT.get(name).what}, not built in baka"
    for title, args in (body.get("alwayson_scripts") or {}).items():
        if str(title).lower() not in BUILT_SCRIPTS and not _script_disabled(args):
            refused[f"alwayson_scripts.{title}"] = f"alwayson_scripts {title!r}: no such script in baka"
    if options is not None:
        for key in body.get("override_settings") or {}:
            if key not in options:
                refused[f"override_settings.{key}"] = (
                    f"override_settings {key!r}: an A1111 option baka does not have"
                )
    if refused and not lenient:
        raise Unsupported(
            "; ".join(refused.values()) + " (send the neutral value or leave the field out;"
            " a server started with --lenient ignores such fields)"
        )
    return list(refused)


__all__ = ["BUILT_SCRIPTS", "UNBUILT", "Unbuilt", "Unsupported", "check"]
