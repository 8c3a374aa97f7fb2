"""A bounded job queue with one worker thread per device (one per GPU, else one): each worker runs
one job at a time on its device, a full queue is refused at once rather than growing without bound,
and finished jobs (with their results) are kept only for a while: at most ``keep`` of them, none
older than ``max_age`` seconds."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    pass


@dataclass
class Job:
    id: str
    kind: str
    future: Future = field(default_factory=Future)
    step: int = 0
    total: int = 0
    finished_at: float | None = None
    interrupted: bool = False  # /interrupt: stop the job after the current step
    skipped: bool = False  # /skip: stop the current batch, go on with the next
    on_interrupt: Callable[[], None] | None = None  # stops the generator that runs this job
    started_at: float | None = None  # time.monotonic() when the worker took it
    textinfo: str | None = None  # what it is doing ("Loading alpha.safetensors"), for /progress
    batch_no: int = 0  # A1111's job_no / job_count: the batch (of batch count) running now
    batch_count: int = 1
    latents: Any = None  # the last step's clean-latent estimate, for the live preview
    device: str = "cpu"  # the device of the worker that runs it
    worker: int = 0  # that worker's index (its loaded generator is its own)

    def set_progress(self, step: int, total: int) -> None:
        """A generator's ``on_step`` callback: what /sdapi/v1/progress reports."""
        self.step, self.total = step, total

    def set_latents(self, latents: Any) -> None:
        """A generator's ``on_preview`` callback: keeps a reference, rendered only when asked for."""
        self.latents = latents

    def fraction(self) -> float:
        """A1111's progress: finished batches plus the running one's share of its steps."""
        inner = self.step / self.total if self.total else 0.0
        return min((self.batch_no + inner) / max(self.batch_count, 1), 1.0)

    def eta_relative(self, now: float) -> float:
        """A1111's estimate of the seconds left: elapsed / progress - elapsed (0 before any progress)."""
        frac = self.fraction()
        if self.started_at is None or frac <= 0:
            return 0.0
        elapsed = now - self.started_at
        return max(elapsed / frac - elapsed, 0.0)

    def interrupt(self, *, skip: bool = False) -> None:
        """A1111's Interrupt (the whole job) or Skip (the current batch only)."""
        if skip:
            self.skipped = True
        else:
            self.interrupted = True
        if self.on_interrupt is not None:
            self.on_interrupt()


class JobQueue:
    def __init__(
        self, maxsize: int = 8, keep: int = 64, max_age: float = 3600.0, devices: tuple[str, ...] = ("cpu",)
    ):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.jobs: dict[str, Job] = {}
        self.keep, self.max_age = keep, max_age
        self._lock = threading.Lock()
        self.devices = devices or ("cpu",)
        self.running: dict[int, Job] = {}  # worker index -> its job
        self._ids = itertools.count(1)
        self._threads = [
            threading.Thread(target=self._run, args=(i, d), daemon=True, name=f"baka-worker-{i}")
            for i, d in enumerate(self.devices)
        ]
        for t in self._threads:
            t.start()

    @property
    def current(self) -> Job | None:
        """The running job that started first (what A1111's single-worker /progress reports)."""
        jobs = sorted(self.running_jobs(), key=lambda j: j.started_at or 0.0)
        return jobs[0] if jobs else None

    def running_jobs(self) -> list[Job]:
        with self._lock:
            return list(self.running.values())

    def submit(self, kind: str, fn: Callable[[Job], object]) -> Job:
        job = Job(f"{kind}-{next(self._ids)}", kind)
        try:
            self._q.put_nowait((job, fn))
        except queue.Full:
            raise QueueFull(f"queue is full ({self._q.maxsize} jobs waiting); try again later") from None
        with self._lock:
            self.jobs[job.id] = job
            self._expire()
        return job

    def _expire(self) -> None:
        """Forget finished jobs past the count or age bound (oldest first); queued ones stay."""
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        over = len(finished) - self.keep
        for j in finished:  # dicts keep submission order: oldest first
            if over > 0 or now - (j.finished_at or now) > self.max_age:
                del self.jobs[j.id]
                over -= 1

    def pending(self) -> int:
        return self._q.qsize()

    def _run(self, worker: int, device: str) -> None:
        while True:
            job, fn = self._q.get()
            if job is None:
                return
            job.device, job.worker, job.started_at = device, worker, time.monotonic()
            with self._lock:
                self.running[worker] = job
            result, error, run = None, None, job.future.set_running_or_notify_cancel()
            if run:
                try:
                    result = fn(job)
                except BaseException as e:  # reported to the client, the worker goes on
                    error = e
            job.finished_at = time.monotonic()
            job.latents = job.on_interrupt = None  # a finished job holds no tensors or generator
            with self._lock:
                del self.running[worker]
                self._expire()
            # the waiting request answers only now: a client that asks /progress right after its
            # reply must not see its own job still running
            if run and error is not None:
                job.future.set_exception(error)
            elif run:
                job.future.set_result(result)

    def close(self) -> None:
        for _ in self._threads:
            self._q.put((None, None))
