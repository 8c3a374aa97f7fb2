"""Pictures the server saves, in A1111's layout: ``OUTPUTS/txt2img-images/YYYY-MM-DD/NNNNN-SEED.png``
(``img2img-images`` for img2img), the infotext in each PNG's "parameters" chunk. ``NNNNN`` goes on
from the highest number already in that day's folder, as A1111 counts; a file is never overwritten
and never left half-written (temp file, then rename)."""

from __future__ import annotations

import datetime
import re
import threading
from collections.abc import Iterable
from pathlib import Path

_NUMBERED = re.compile(r"^(\d+)-")


class Outputs:
    """The outputs folder of one server."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock = threading.Lock()  # several workers save at once; numbers stay unique

    def folder(self, kind: str, day: datetime.date | None = None) -> Path:
        return self.root / f"{kind}-images" / (day or datetime.date.today()).isoformat()

    @staticmethod
    def next_number(folder: Path) -> int:
        """A1111's sequence number: one past the highest ``NNNNN-`` prefix in ``folder`` (0 when none)."""
        if not folder.is_dir():
            return 0
        nums = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
        return max(nums, default=-1) + 1

    def save(self, kind: str, results: Iterable) -> list[Path]:
        """Save each result (``.image``, ``.seed``, ``.infotext``) as the next number; their paths."""
        saved = []
        with self._lock:
            folder = self.folder(kind)
            n = self.next_number(folder)
            for r in results:
                path = folder / f"{n:05}-{r.seed}.png"
                while path.exists():  # a file written meanwhile by someone else: never overwritten
                    n += 1
                    path = folder / f"{n:05}-{r.seed}.png"
                saved.append(r.save(path))
                n += 1
        return saved

    def history(self, limit: int = 100) -> list[Path]:
        """The saved pictures, newest first (by day folder, then number), at most ``limit``."""
        if not self.root.is_dir():
            return []
        found = []
        for kind_dir in self.root.glob("*-images"):
            if not kind_dir.is_dir():
                continue
            for day in kind_dir.iterdir():
                if day.is_dir():
                    found += [p for p in day.glob("*.png") if _NUMBERED.match(p.name)]
        found.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
        return found[:limit]


__all__ = ["Outputs"]
