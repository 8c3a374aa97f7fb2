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


class OutputError(BakaError):
    """An output that could not be written (disk full, read-only folder); names the path and the cause.

    Nothing is left behind: the partial temp file is removed before this is raised.
    """

    def __init__(self, path: str | Path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: cannot write ({cause}); nothing was written")
