"""Errors that reach the user as one line (the CLI prints ``str(err)`` and exits non-zero)."""

from __future__ import annotations

from pathlib import Path


class BakaError(Exception):
    """A problem the user can fix: bad input, wrong file kind, unknown name."""


class ModelFileError(BakaError):
    """A model file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class NotFound(BakaError):
    """A name that matches nothing (a model in the configured folders, a job id); HTTP 404."""
