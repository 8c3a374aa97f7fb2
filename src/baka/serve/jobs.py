"""A bounded job queue with one worker thread: generation and merges run one at a time, and a
full queue is refused at once rather than growing without bound."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFull(Exception):
    pass


@dataclass
class Job:
    id: str
    kind: str
    future: Future = field(default_factory=Future)
    step: int = 0
    total: int = 0

    def set_progress(self, step: int, total: int) -> None:
        """A generator's ``on_step`` callback: what /sdapi/v1/progress reports."""
        self.step, self.total = step, total


class JobQueue:
    def __init__(self, maxsize: int = 8):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.jobs: dict[str, Job] = {}
        self.current: Job | None = None
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, daemon=True, name="baka-worker")
        self._thread.start()

    def submit(self, kind: str, fn: Callable[[Job], object]) -> Job:
        job = Job(f"{kind}-{next(self._ids)}", kind)
        try:
            self._q.put_nowait((job, fn))
        except queue.Full:
            raise QueueFull(f"queue is full ({self._q.maxsize} jobs waiting); try again later") from None
        self.jobs[job.id] = job
        return job

    def pending(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        while True:
            job, fn = self._q.get()
            if job is None:
                return
            self.current = job
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(fn(job))
                except BaseException as e:  # reported to the client, the worker goes on
                    job.future.set_exception(e)
            self.current = None

    def close(self) -> None:
        self._q.put((None, None))
