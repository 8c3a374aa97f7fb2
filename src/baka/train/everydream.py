"""EveryDream2's dataset configuration files, resolved per image as ED2's ``data/dataset.py`` does.

Per folder, for the folder's own images: ``multiply.txt``, ``cond_dropout.txt``, ``flip_p.txt``,
``loss_scale.txt``, ``batch_id.txt``, ``shuffle_tags.txt`` (present: shuffle) and ``local.yaml`` /
``local.yml``. ``global.yaml`` / ``global.yml`` apply to the folder and every folder below it. Per
image, a ``.yaml`` / ``.yml`` sidecar beside the caption file::

    main_prompt: a photo of ted bennet
    tags:
      - sitting on a green armchair
      - tag: wearing a tuxedo
        weight: 1.5
    max_caption_length: 1024      # characters, for the weighted shuffle
    multiply: 2                   # and flip_p, cond_dropout, loss_scale, shuffle_tags, batch_id

Precedence is ED2's: global, then local, then the image's own files; a later number replaces an earlier
one, tags are united with the image's first (ED2's dict union), the first main prompt wins. The caption
is the main prompt, then the tags by decreasing weight; when tags are shuffled and their weights differ,
ED2's weighted shuffle picks them in turn with probability proportional to weight
(:func:`weighted_tags`). ``batch_id`` keeps images with the same id in batches of their own
(:meth:`baka.train.data.Dataset.epoch_batches`). ``rating`` is read but, as in ED2 without its
``rated_dataset`` option, has no effect.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baka.errors import BakaError

log = logging.getLogger(__name__)

# ED2's number files: name -> (field, highest value; None: no upper bound)
NUMBER_FILES = {
    "multiply.txt": ("multiply", None),
    "cond_dropout.txt": ("cond_dropout", 1.0),
    "flip_p.txt": ("flip_p", 1.0),
    "loss_scale.txt": ("loss_scale", None),
}
_RANGES = {field: top for field, top in NUMBER_FILES.values()}
# the keys ED2's ImageConfig.from_dict reads ("image" names the picture in ED2's JSON datasets only)
YAML_KEYS = (
    "main_prompt",
    "tags",
    "caption",
    "max_caption_length",
    "multiply",
    "cond_dropout",
    "flip_p",
    "loss_scale",
    "shuffle_tags",
    "batch_id",
    "rating",
)
DEFAULT_MAX_CAPTION_LENGTH = 2048  # ED2's, in characters


@dataclass(frozen=True)
class Tag:
    value: str
    weight: float = 1.0


@dataclass(frozen=True)
class ImageOptions:
    """What EveryDream2's files say about one image. None: the subset's own setting."""

    multiply: float = 1.0
    cond_dropout: float | None = None
    flip_p: float | None = None
    loss_scale: float = 1.0
    shuffle_tags: bool = False
    batch_id: str = ""  # "": ED2's default batch (any image may share it)
    # when the tags' weights differ (ED2's use_weights): the main prompt and the weighted tags
    main_prompt: str = ""
    weighted: tuple[Tag, ...] = ()
    max_caption_length: int = DEFAULT_MAX_CAPTION_LENGTH


NO_OPTIONS = ImageOptions()


@dataclass(frozen=True)
class Ed2Config:
    """One file's (or a fold of files') settings; None: not said."""

    main_prompts: tuple[str, ...] = ()
    tags: tuple[Tag, ...] = ()
    multiply: float | None = None
    cond_dropout: float | None = None
    flip_p: float | None = None
    loss_scale: float | None = None
    shuffle_tags: bool = False
    batch_id: str | None = None
    max_caption_length: int | None = None
    rating: float | None = None

    def merge(self, other: Ed2Config) -> Ed2Config:
        """``other`` over ``self`` (ED2's ImageConfig.merge): numbers replaced, main prompts and tags
        united with ``other``'s first, duplicates once."""
        over = {
            f.name: getattr(other, f.name) if getattr(other, f.name) is not None else getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("main_prompts", "tags", "shuffle_tags")
        }
        return Ed2Config(
            main_prompts=tuple(dict.fromkeys(other.main_prompts + self.main_prompts)),
            tags=tuple(dict.fromkeys(other.tags + self.tags)),
            shuffle_tags=self.shuffle_tags or other.shuffle_tags,
            **over,
        )

    @property
    def has_caption(self) -> bool:
        return bool(self.main_prompts or self.tags)


NOTHING = Ed2Config()


def caption_config(text: str) -> Ed2Config:
    """A plain caption as ED2 splits it: the first comma-separated part is the main prompt, the rest tags."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        return NOTHING
    return Ed2Config(main_prompts=(parts[0],), tags=tuple(dict.fromkeys(Tag(p) for p in parts[1:] if p)))


def _in_range(where: str, value: float, top: float | None) -> float:
    if not value >= 0 or (top is not None and value > top):
        raise BakaError(f"{where} is out of range (0 to {top if top is not None else 'any'})")
    return float(value)


def _number(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BakaError(f"{path}: {key} must be a number (got {value!r})")
    return _in_range(f"{path}: {key} {value!r}", value, _RANGES.get(key))


def _tag(path: Path, entry: Any) -> Tag | None:
    if isinstance(entry, str):
        return Tag(entry.strip()) if entry.strip() else None
    if isinstance(entry, dict) and "tag" in entry:
        unknown = set(entry) - {"tag", "weight"}
        if unknown:
            raise BakaError(f"{path}: a tag has unknown keys {sorted(unknown)} (tag, weight)")
        weight = entry.get("weight")
        weight = 1.0 if weight is None else _number(path, "tag weight", weight)
        return Tag(str(entry["tag"]).strip(), weight) if str(entry["tag"]).strip() else None
    raise BakaError(f"{path}: a tag must be a string or {{tag: ..., weight: ...}} (got {entry!r})")


def yaml_config(path: Path) -> Ed2Config:
    """An ED2 ``.yaml`` file (image sidecar, local.yaml or global.yaml); unknown keys are an error."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BakaError(f"{path}: cannot read EveryDream2 YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return NOTHING
    if not isinstance(data, dict):
        raise BakaError(f"{path}: an EveryDream2 YAML file holds a mapping (main_prompt, tags, ...)")
    for key in data:
        if key not in YAML_KEYS:
            near = difflib.get_close_matches(str(key), YAML_KEYS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (known: {', '.join(YAML_KEYS)})"
            raise BakaError(f"{path}: unknown key {key!r}{hint}")
    tags = data.get("tags") or []
    if not isinstance(tags, list):
        raise BakaError(f"{path}: tags must be a list")
    main = data.get("main_prompt")
    nums = {k: _number(path, k, data[k]) for k in _RANGES if data.get(k) is not None}
    length = data.get("max_caption_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise BakaError(f"{path}: max_caption_length must be a whole number of characters >= 1")
    rating = data.get("rating")
    cfg = Ed2Config(
        main_prompts=(str(main).strip(),) if main is not None and str(main).strip() else (),
        tags=tuple(dict.fromkeys(t for t in (_tag(path, e) for e in tags) if t is not None)),
        shuffle_tags=bool(data.get("shuffle_tags")),
        batch_id=None if data.get("batch_id") is None else str(data["batch_id"]).strip(),
        max_caption_length=length,
        rating=None if rating is None else _number(path, "rating", rating),
        **nums,
    )
    if data.get("caption"):  # ED2: a caption string as a .txt would give it
        cfg = cfg.merge(caption_config(str(data["caption"])))
    return cfg


class FolderFiles:
    """EveryDream2's files of the folders under one root, read once per folder."""

    def __init__(self, root: Path):
        self.root = root
        self._local: dict[Path, Ed2Config] = {}
        self._global: dict[Path, Ed2Config] = {}
        self._names: dict[Path, set[str]] = {}

    def names(self, folder: Path) -> set[str]:
        if folder not in self._names:
            self._names[folder] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        return self._names[folder]

    def local(self, folder: Path) -> Ed2Config:
        """The folder's own files: number files, batch_id.txt, shuffle_tags.txt, local.yaml / .yml."""
        if folder not in self._local:
            names, cfg = self.names(folder), NOTHING
            # ED2's order (Dataset.__local_cfg): a later file wins
            for name in ("multiply.txt", "cond_dropout.txt", "flip_p.txt", "local.yaml", "local.yml",
                         "batch_id.txt", "loss_scale.txt"):  # fmt: skip
                if name in names:
                    cfg = cfg.merge(self._local_file(folder / name))
            if "shuffle_tags.txt" in names:
                cfg = dataclasses.replace(cfg, shuffle_tags=True)
            self._local[folder] = cfg
        return self._local[folder]

    @staticmethod
    def _local_file(f: Path) -> Ed2Config:
        if f.suffix in (".yaml", ".yml"):
            return yaml_config(f)
        try:
            text = f.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise BakaError(f"{f}: cannot read ({e})") from None
        if f.name == "batch_id.txt":
            return Ed2Config(batch_id=text)
        field_name, top = NUMBER_FILES[f.name]
        try:
            value = float(text)
        except ValueError:
            raise BakaError(f"{f}: not a number ({text[:40]!r})") from None
        return Ed2Config(**{field_name: _in_range(f"{f}: {text!r}", value, top)})

    def inherited(self, folder: Path) -> Ed2Config:
        """global.yaml / .yml of the folder and of every folder above it up to the root."""
        if folder not in self._global:
            inner = folder != self.root and self.root in folder.parents
            cfg = self.inherited(folder.parent) if inner else NOTHING
            for name in ("global.yaml", "global.yml"):
                if name in self.names(folder):
                    cfg = cfg.merge(yaml_config(folder / name))
            self._global[folder] = cfg
        return self._global[folder]

    def resolve(self, image: Path, caption: str, fallback: str = "") -> tuple[str, ImageOptions]:
        """The image's caption (``caption``: its caption file's text) and options: global, local, then
        its caption text and its own .yaml / .yml, as ED2 folds them; ``fallback`` (ED2's caption from
        the file name) gives the main prompt (and tags) when none of them does."""
        folder, names = image.parent, self.names(image.parent)
        own = NOTHING
        for ext in (".yml", ".yaml"):
            if image.stem + ext in names:
                own = own.merge(yaml_config(folder / (image.stem + ext)))
        cfg = self.inherited(folder).merge(self.local(folder))
        by_name = bool(fallback) and not caption.strip()  # a caption file's text comes first
        if cfg.has_caption or own.has_caption or by_name:  # ED2 builds the caption from its parts
            parts = cfg.merge(caption_config(caption)).merge(own)
            if not parts.main_prompts and fallback:
                parts = parts.merge(caption_config(fallback))
            tags = sorted(parts.tags, key=lambda t: t.weight, reverse=True)  # stable, as ED2
            text = ", ".join(
                ([parts.main_prompts[0]] if parts.main_prompts else []) + [t.value for t in tags]
            )
            weighted = tuple(tags) if len({t.weight for t in tags}) > 1 else ()
            if not parts.main_prompts:
                log.warning("baka: warning: %s: no main_prompt in its EveryDream2 files", image)
            caption = text
        else:
            parts, weighted = cfg.merge(own), ()
        if parts.rating is not None and parts.rating != 1:
            log.debug("%s: EveryDream2 rating has no effect without ED2's rated_dataset", image)
        opts = ImageOptions(
            multiply=1.0 if parts.multiply is None else parts.multiply,
            cond_dropout=parts.cond_dropout,
            flip_p=parts.flip_p,
            loss_scale=1.0 if parts.loss_scale is None else parts.loss_scale,
            shuffle_tags=parts.shuffle_tags,
            batch_id=parts.batch_id or "",
            main_prompt=parts.main_prompts[0] if weighted and parts.main_prompts else "",
            weighted=weighted,
            max_caption_length=parts.max_caption_length or DEFAULT_MAX_CAPTION_LENGTH,
        )
        return caption, (NO_OPTIONS if opts == NO_OPTIONS else opts)


def weighted_tags(
    main: str, tags: list[str], weights: list[float], max_length: int, rng: random.Random
) -> list[str]:
    """EveryDream2's weighted shuffle: tags drawn one at a time, each with probability proportional to
    its weight among those left (a uniform point on the cumulative weights), while the tags so far are
    shorter than ``max_length`` minus the main prompt's length (characters; the last tag may cross it)."""
    tags, weights = list(tags), list(weights)
    budget = max_length - len(main)
    out: list[str] = []
    length = 0
    while tags and length < budget:
        cum, total = [], 0.0
        for w in weights:
            total += w
            cum.append(total)
        i = bisect.bisect_left(cum, rng.uniform(0, total))
        weights.pop(i)
        out.append(tags.pop(i))
        length += len(out[-1]) + (2 if len(out) > 1 else 0)  # ", " between tags
    return out


__all__ = [
    "Ed2Config",
    "FolderFiles",
    "ImageOptions",
    "NO_OPTIONS",
    "Tag",
    "caption_config",
    "weighted_tags",
    "yaml_config",
]
