"""Model folders as A1111 and ComfyUI lay them out, plus ComfyUI's extra_model_paths.yaml.

Names given by clients are resolved only inside these folders: no absolute paths, no ``..``, no
symlink that leads outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from baka.errors import BakaError, NotFound

KINDS = ("checkpoints", "loras", "embeddings", "vae", "upscalers")
MAX_NAME = 1024  # characters of a relative model name (each part at most 255, as file systems allow)
SUFFIXES = {
    "checkpoints": (".safetensors", ".ckpt"),
    "loras": (".safetensors", ".pt", ".ckpt"),
    "embeddings": (".pt", ".safetensors", ".bin"),
    "vae": (".safetensors", ".pt", ".ckpt"),
    "upscalers": (".pth", ".pt", ".safetensors"),  # ESRGAN-family files (baka.models.esrgan)
}
# folder names below an install root, per kind: A1111 first, then ComfyUI
LAYOUTS = {
    "checkpoints": ("models/Stable-diffusion", "models/checkpoints"),
    "loras": ("models/Lora", "models/LyCORIS", "models/loras"),
    "embeddings": ("embeddings", "models/embeddings"),
    "vae": ("models/VAE", "models/vae"),
    "upscalers": ("models/ESRGAN", "models/RealESRGAN", "models/upscale_models"),
}
_YAML_KEYS = {
    "checkpoints": "checkpoints",
    "loras": "loras",
    "embeddings": "embeddings",
    "vae": "vae",
    "upscalers": "upscale_models",
}


@dataclass
class ModelFolders:
    folders: dict[str, list[Path]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def add(self, kind: str, folder: str | Path) -> None:
        p = Path(folder).expanduser().resolve()
        if p.is_dir() and p not in self.folders[kind]:
            self.folders[kind].append(p)

    def add_root(self, root: str | Path) -> None:
        """An A1111 or ComfyUI install (or any folder using one of their layouts)."""
        root = Path(root)
        if not root.is_dir():
            raise BakaError(f"{root}: model root does not exist")
        for kind, subs in LAYOUTS.items():
            for sub in subs:
                self.add(kind, root / sub)

    def add_extra_model_paths(self, yaml_path: str | Path) -> None:
        """ComfyUI's extra_model_paths.yaml: sections with base_path and per-kind (multi-line) paths."""
        import yaml

        path = Path(yaml_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BakaError(f"{path}: cannot read extra model paths ({e})") from None
        for section in data.values():
            if not isinstance(section, dict):
                continue
            base = Path(str(section.get("base_path", path.parent))).expanduser()
            if not base.is_absolute():
                base = path.parent / base
            for kind, key in _YAML_KEYS.items():
                for line in str(section.get(key, "") or "").splitlines():
                    if line.strip():
                        self.add(kind, base / line.strip())

    def list(self, kind: str) -> list[str]:
        """Names (paths relative to their folder, with '/') of every model file of ``kind``."""
        names: list[str] = []
        for folder in self.folders[kind]:
            for p in sorted(folder.rglob("*")):
                # symlinks that lead outside the folder are neither listed nor resolved
                if p.is_file() and p.suffix.lower() in SUFFIXES[kind] and p.resolve().is_relative_to(folder):
                    rel = p.relative_to(folder).as_posix()
                    if rel not in names:
                        names.append(rel)
        return names

    def resolve(self, kind: str, name: str) -> Path:
        """The file called ``name`` inside one of the ``kind`` folders; anything else is refused."""
        if not isinstance(name, str):
            raise BakaError(f"{kind} name must be a string, not {type(name).__name__}")
        clean = name.split(" [")[0].strip()  # A1111 titles look like "model.safetensors [hash]"
        rel = Path(clean)
        bad = "\x00" in clean or len(clean) > MAX_NAME or any(len(p) > 255 for p in rel.parts)
        if not clean or bad or rel.is_absolute() or ".." in rel.parts or "\\" in clean:
            raise BakaError(f"invalid {kind} name {name[:80]!r}")
        for folder in self.folders[kind]:
            for candidate in [folder / rel] + [folder / (clean + s) for s in SUFFIXES[kind]]:
                try:
                    real = candidate.resolve(strict=True)
                except (FileNotFoundError, RuntimeError):
                    continue
                if real.is_file() and real.is_relative_to(folder):
                    return real
        raise NotFound(f"{kind} {name!r} not found in the configured model folders")
