"""``baka serve``."""

from __future__ import annotations

import argparse
from pathlib import Path

from baka._cli import args, command, print_config


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", action="append", default=[], help="A1111 or ComfyUI install folder (repeatable)")
    p.add_argument("--extra-model-paths", action="append", default=[], help="ComfyUI extra_model_paths.yaml")
    p.add_argument("--checkpoints", action="append", default=[], help="a checkpoint folder (repeatable)")
    p.add_argument("--loras", action="append", default=[], help="a LoRA folder (repeatable)")
    p.add_argument("--embeddings", action="append", default=[], help="an embeddings folder (repeatable)")
    p.add_argument(
        "--upscalers", action="append", default=[], help="an ESRGAN-family upscaler folder (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every route")
    p.add_argument(
        "--api-auth", help="A1111's user:pass[,user2:pass2]: HTTP Basic credentials accepted on every route"
    )
    p.add_argument("--queue", type=int, default=8, help="at most this many jobs waiting")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (413 above)")
    p.add_argument("--max-prompt", type=int, default=20_000, help="longest prompt in characters (400 above)")
    p.add_argument(
        "--lenient",
        action="store_true",
        help="ignore A1111 request fields baka does not build (default: 422 naming them); info lists them",
    )
    p.add_argument("--outputs", default="outputs", help="where save_images and the web UI save pictures")
    p.add_argument(
        "--devices",
        help="comma-separated torch devices, one worker each (default: every CUDA device, else the CPU)",
    )


def _credentials(spec: str | None) -> tuple[str, ...]:
    """``user:pass[,user2:pass2]`` (A1111's --api-auth) as "user:pass" strings."""
    from baka.errors import BakaError

    creds = tuple(c.strip() for c in (spec or "").split(",") if c.strip())
    for c in creds:
        user, sep, pw = c.partition(":")
        if not sep or not user or not pw:
            raise BakaError(f"--api-auth: {c.split(':')[0]!r} needs the form user:pass")
    return creds


@command("serve", "local web UI and A1111-compatible API (/sdapi/v1)")
@args(_serve_args)
def cmd_serve(a: argparse.Namespace) -> int:
    from baka.serve.app import Settings, serve
    from baka.serve.folders import ModelFolders

    folders = ModelFolders()
    for r in a.root:
        folders.add_root(r)
    for y in a.extra_model_paths:
        folders.add_extra_model_paths(y)
    for kind in ("checkpoints", "loras", "embeddings", "upscalers"):
        for f in getattr(a, kind):
            folders.add(kind, f)
    print_config(
        "serve",
        {
            "url": f"http://{a.host}:{a.port}/",
            "token": "set" if a.token else "none",
            "api_auth": f"{len(_credentials(a.api_auth))} user(s)" if a.api_auth else "none",
            "queue": a.queue,
            "max_body_mb": a.max_body_mb,
            "max_prompt": a.max_prompt,
            "lenient": a.lenient,
            "outputs": a.outputs,
            "devices": a.devices or "auto",
            **{k: [str(p) for p in v] for k, v in folders.folders.items()},
        },
    )
    settings = Settings(
        folders,
        a.token,
        a.queue,
        max_body=int(a.max_body_mb * 1024 * 1024),
        max_prompt=a.max_prompt,
        api_auth=_credentials(a.api_auth),
        lenient=a.lenient,
        outputs=Path(a.outputs),
        devices=tuple(d.strip() for d in (a.devices or "").split(",") if d.strip()),
    )
    serve(settings, a.host, a.port)
    return 0
