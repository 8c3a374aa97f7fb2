"""What one server holds between requests: its settings, the job queue, the A1111 options, the
loaded generators. Also the mapping of exception types to HTTP status codes (the token check and the
body limit are the middleware in :mod:`baka.serve.guard`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from baka.errors import BakaError, NotFound
from baka.serve.fields import Unsupported
from baka.serve.folders import ModelFolders
from baka.serve.hashcache import HashCache
from baka.serve.jobs import Job, JobQueue, QueueFull
from baka.serve.outputs import Outputs

# The one place where errors become status codes; the most specific class in an error's MRO wins.
ERROR_STATUS: dict[type[Exception], int] = {NotFound: 404, BakaError: 400, Unsupported: 422, QueueFull: 503}
NO_VAE = ("Automatic", "None")  # sd_vae values that mean "the checkpoint's own VAE"


@dataclass
class Settings:
    folders: ModelFolders
    token: str | None = None
    queue_size: int = 8
    model: str | None = None  # default checkpoint name
    # a request body over this is a 413: room for an img2img upload, not for a flood
    max_body: int = 8 * 1024 * 1024
    # a prompt (or negative prompt) over this many characters is a 400: A1111 prompts are a few
    # thousand characters at most, and parsing one is the single worker's time
    max_prompt: int = 20_000
    # finished jobs (and their images) are kept this many at most, this many seconds at most
    keep_jobs: int = 64
    job_max_age: float = 3600.0
    api_auth: tuple[str, ...] = ()  # A1111 --api-auth: "user:pass" pairs for HTTP Basic
    # A1111 request fields baka does not build: refused (422) unless lenient (then listed in "info")
    lenient: bool = False
    outputs: Path = Path("outputs")  # where save_images (and the web UI) save, A1111's layout
    devices: tuple[str, ...] = ()  # one worker per device; () = every CUDA device, else one on the CPU


@dataclass
class State:
    settings: Settings
    queue: JobQueue
    options: dict = field(default_factory=dict)
    generators: dict[int, tuple[tuple, object]] = field(default_factory=dict)  # worker -> (key, Generator)
    preview: object | None = None  # (key, Generator, RuntimeBlockMerge)
    preview_lock: threading.Lock = field(default_factory=threading.Lock)
    hashes: HashCache = field(default_factory=HashCache)
    outputs: Outputs = field(default_factory=lambda: Outputs("outputs"))

    @classmethod
    def create(cls, settings: Settings) -> State:
        queue = JobQueue(
            settings.queue_size, settings.keep_jobs, settings.job_max_age, default_devices(settings)
        )
        st = cls(settings, queue)
        st.outputs = Outputs(settings.outputs)
        st.options = {
            "sd_model_checkpoint": settings.model or next(iter(settings.folders.list("checkpoints")), None),
            "CLIP_stop_at_last_layers": 1,
            "sd_vae": "Automatic",
            "emphasis": "Original",
            "pad_cond_uncond": False,
        }
        return st

    @property
    def folders(self) -> ModelFolders:
        return self.settings.folders

    def resolve(self, kind: str, name: str) -> Path:
        """``name`` inside the configured ``kind`` folders; raises NotFound or BakaError otherwise."""
        return self.folders.resolve(kind, name)

    def check_prompts(self, *texts: str) -> None:
        """Refuse prompts longer than ``settings.max_prompt`` before they reach the worker."""
        for text in texts:
            if len(text) > self.settings.max_prompt:
                raise BakaError(f"prompt of {len(text)} characters (at most {self.settings.max_prompt})")

    def submit(self, kind: str, fn: Callable[[Job], object]) -> Job:
        """Queue ``fn`` (raises QueueFull, a 503, when the queue is full)."""
        return self.queue.submit(kind, fn)

    def run(self, kind: str, fn: Callable[[Job], object]):
        """Queue ``fn`` and wait for its result; its errors are raised here."""
        return self.submit(kind, fn).future.result()

    def generator_for(self, name: str, vae: str | None, device: str = "cpu", worker: int = 0):
        """The generator for checkpoint ``name`` (and ``vae``) on ``device``; one is kept loaded per
        worker (a worker runs one job at a time, so no two jobs share one)."""
        import torch

        from baka.generate.engine import Generator

        path = self.resolve("checkpoints", name)
        vae_path = self.resolve("vae", vae) if vae and vae not in NO_VAE else None
        key = (path, vae_path)
        self.release_preview()  # the merge preview's model is not kept beside this one
        held = self.generators.get(worker)
        if held is None or held[0] != key:
            self.generators.pop(worker, None)  # free the old model first
            gen = Generator(
                path,
                vae=vae_path,
                embedding_dirs=self.folders.folders["embeddings"],
                lora_dirs=self.folders.folders["loras"],
                upscaler_dirs=self.folders.folders["upscalers"],
                progress=False,
                device=device,
                # half precision on GPUs, as A1111 runs; float32 on the CPU
                dtype=torch.float16 if device.startswith("cuda") else torch.float32,
            )
            self.generators[worker] = held = (key, gen)
        return held[1]

    def release_preview(self) -> None:
        """Drop the merge preview's models unless a preview is running right now."""
        if self.preview is not None and self.preview_lock.acquire(blocking=False):
            try:
                self.preview = None
            finally:
                self.preview_lock.release()

    def preview_for(self, pa: Path, pb: Path, device: str = "cpu", worker: int = 0):
        """(Generator on A, RuntimeBlockMerge with B) for the pair; one pair is kept loaded at a time
        (hold ``preview_lock`` while using it: workers on several devices share it). The worker's own
        generation model is dropped meanwhile: the two are never both held for one worker."""
        from baka.generate.engine import Generator
        from baka.generate.grid import GridContext

        self.generators.pop(worker, None)
        if self.preview is None or self.preview[0] != (pa, pb, device):
            self.preview = None  # free the old pair first
            gen = Generator(pa, progress=False, device=device)
            self.preview = ((pa, pb, device), gen, GridContext.with_merge(gen, str(pb)).merger)
        _, gen, rt = self.preview
        return gen, rt


def default_devices(settings: Settings) -> tuple[str, ...]:
    """The workers' devices: the configured ones, else one per CUDA device, else the CPU."""
    if settings.devices:
        return settings.devices
    import torch

    n = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(n)) or ("cpu",)


def get_state(request: Request) -> State:
    """Route dependency: the State of the app serving this request."""
    return request.app.state.baka


def status_for(exc: BaseException) -> int:
    """The HTTP status for ``exc`` by its type (500 for anything not in ERROR_STATUS)."""
    return next((ERROR_STATUS[c] for c in type(exc).__mro__ if c in ERROR_STATUS), 500)


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status_for(exc))


def add_error_handlers(app: FastAPI) -> None:
    """Answer the errors of ERROR_STATUS as FastAPI answers an HTTPException: ``{"detail": message}``."""
    for exc_type in ERROR_STATUS:
        app.add_exception_handler(exc_type, _error_response)
