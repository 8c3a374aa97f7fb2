"""sha256 of model files for ``/sd-models`` (A1111's ``hash`` = first 10 hex, ``sha256`` = all), each
file hashed once per (size, mtime) in a background thread: a listing never waits on reading 2 GB files,
it shows None until the hash is known, as A1111 does for files it has not hashed yet."""

from __future__ import annotations

import queue
import threading
from pathlib import Path


class HashCache:
    def __init__(self) -> None:
        self._done: dict[tuple[str, int, int], str] = {}
        self._asked: set[tuple[str, int, int]] = set()
        self._q: queue.Queue[tuple[tuple[str, int, int], Path]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="baka-hashes")
        self._thread.start()

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return (str(path), st.st_size, st.st_mtime_ns)

    def get(self, path: Path) -> str | None:
        """The file's sha256 if known; otherwise None, and it is queued for hashing."""
        key = self._key(path)
        with self._lock:
            if key in self._done:
                return self._done[key]
            if key not in self._asked:
                self._asked.add(key)
                self._q.put((key, path))
        return None

    def join(self) -> None:
        """Wait until everything asked for is hashed (tests, refresh)."""
        self._q.join()

    def _run(self) -> None:
        from baka.models.hashes import sha256_file

        while True:
            key, path = self._q.get()
            try:
                digest = sha256_file(path)
                with self._lock:
                    self._done[key] = digest
            except OSError:  # gone or unreadable: asked again on the next listing
                with self._lock:
                    self._asked.discard(key)
            finally:
                self._q.task_done()


__all__ = ["HashCache"]
