"""The HTTP server: A1111's /sdapi/v1 routes (so existing clients work), baka's merge and
runtime-preview routes, and the web UI page. Bound to 127.0.0.1 unless told otherwise.

The routes live in :mod:`baka.serve.sdapi`, :mod:`baka.serve.native` and :mod:`baka.serve.tools` (LoRA
tools, merge probe / search as jobs), the request bodies in
:mod:`baka.serve.schemas`, the server state, token check and error mapping in :mod:`baka.serve.state`.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from baka import __version__
from baka.serve import native, sdapi, tools
from baka.serve.guard import Guard
from baka.serve.state import Settings, State, add_error_handlers

__all__ = ["Settings", "create_app", "serve"]


def index() -> str:
    # the web UI: one static page; it calls the API with the ?token= it was opened with
    return resources.files("baka.serve").joinpath("static/index.html").read_text()


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application over ``settings.folders``."""
    app = FastAPI(title="baka", version=__version__)
    app.state.baka = State.create(settings)
    add_error_handlers(app)
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.include_router(sdapi.router)
    app.include_router(native.router)
    app.include_router(tools.router)
    # auth on every path (the page, /docs and /openapi.json too) and the body limit
    app.add_middleware(Guard, token=settings.token, max_body=settings.max_body, basic=settings.api_auth)
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
