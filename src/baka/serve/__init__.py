"""Local web UI and A1111-compatible HTTP API. Entry point: :func:`baka.serve.app.create_app`."""
