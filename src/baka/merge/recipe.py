"""Merge recipes: what was merged, how, recorded in the output's metadata and replayable.

Written keys: ``baka_recipe`` (our JSON, replayable with ``baka merge --recipe``), A1111's
``sd_merge_recipe`` / ``sd_merge_models`` and modelspec keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from baka.errors import BakaError
from baka.merge.weights import Weights

RECIPE_VERSION = 1


@dataclass
class Recipe:
    method: str
    models: list[str]  # A, B[, C] paths
    alpha: Weights
    beta: Weights
    elemental: str = ""
    seed: int = 0
    dtype: str | None = None  # output dtype name; None = A's
    gamma: float = 0.3  # supermerger's option(gamma) (extract)
    adjust: str = ""  # supermerger's Adjust: IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3
    model_sha256: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["version"] = RECIPE_VERSION
        d["alpha"], d["beta"] = list(self.alpha), list(self.beta)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            d = json.loads(text)
            d.pop("version", None)
            d["alpha"], d["beta"] = tuple(d["alpha"]), tuple(d["beta"])
            return cls(**d)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise BakaError(f"{source}: not a baka merge recipe ({e})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """From a recipe JSON file or a merged .safetensors carrying ``baka_recipe`` metadata."""
        p = Path(path)
        if p.suffix == ".safetensors":
            from baka.models.safetensors_io import SafetensorsFile

            with SafetensorsFile(p) as f:
                if "baka_recipe" not in f.metadata:
                    raise BakaError(f"{p}: has no baka_recipe metadata")
                return cls.from_json(f.metadata["baka_recipe"], str(p))
        try:
            return cls.from_json(p.read_text(), str(p))
        except OSError as e:
            raise BakaError(f"{p}: cannot read recipe ({e.strerror})") from None


# A1111's names for the two methods its own merger has (its ``interp_method`` field)
A1111_METHODS = {"weight_sum": "Weighted sum", "add_difference": "Add difference"}


def _legacy(path: str) -> str | None:
    from baka.models.hashes import legacy_hash
    from baka.models.shipped import resolve

    p = resolve(path)
    return legacy_hash(p) if p.is_file() else None


def metadata_for(
    recipe: Recipe, input_metadata: list[dict[str, str]], title: str, *, inpainting: bool = False
) -> dict[str, str]:
    """The merged file's metadata: baka's own recipe, and A1111's ``sd_merge_recipe`` /
    ``sd_merge_models`` as A1111's merger writes them (types and ancestry included), so A1111 and
    Civitai read the merge like one of A1111's."""
    names = [Path(m).name for m in recipe.models]
    shas = recipe.model_sha256 or [""] * len(recipe.models)
    a1111 = {
        "type": "baka",
        "primary_model_hash": shas[0] or None,
        "secondary_model_hash": (shas[1] or None) if len(shas) > 1 else None,
        "tertiary_model_hash": (shas[2] or None) if len(shas) > 2 else None,
        "interp_method": A1111_METHODS.get(recipe.method, recipe.method),
        # A1111's multiplier is one float; the per-block weights go in baka's own keys
        "multiplier": round(sum(recipe.alpha) / len(recipe.alpha), 6),
        "baka_alpha": list(recipe.alpha),
        "baka_beta": list(recipe.beta),
        "save_as_half": recipe.dtype == "fp16",
        "custom_name": title,
        "config_source": 0,
        "bake_in_vae": None,
        "discard_weights": "",
        "is_inpainting": inpainting,
        "is_instruct_pix2pix": False,
    }
    # A1111: each input under its sha256 (name with extension, legacy hash, its own recipe), then
    # the input's own sd_merge_models merged in, so a merge of merges lists the whole ancestry
    models: dict[str, object] = {}
    for sha, name, path, meta in zip(shas, names, recipe.models, input_metadata, strict=False):
        if sha:
            models[sha] = {
                "name": name,
                "legacy_hash": _legacy(path),
                "sd_merge_recipe": _maybe_json(meta.get("sd_merge_recipe")),
            }
            parents = _maybe_json(meta.get("sd_merge_models"))
            if isinstance(parents, dict):
                models.update(parents)
    return {
        "baka_recipe": recipe.to_json(),
        "sd_merge_recipe": json.dumps(a1111, sort_keys=True),
        "sd_merge_models": json.dumps(models, sort_keys=True),
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
        "modelspec.description": f"baka {recipe.method} merge of {', '.join(names)}",
    }


def _maybe_json(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
