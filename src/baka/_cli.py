"""CLI plumbing shared by every subcommand module: the command registry, the ``@command`` / ``@args``
decorators and ``print_config``.

Subcommand modules (``baka.merge.cli``, ``baka.generate.cli``, ...) import this module, never
``baka.cli``: ``baka.cli`` imports them to build the parser, so importing it back would be a circle.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from baka.registry import Registry

Handler = Callable[[argparse.Namespace], int]
AddArgs = Callable[[argparse.ArgumentParser], None]


def _no_args(p: argparse.ArgumentParser) -> None:
    return None


@dataclass(frozen=True)
class Command:
    """One ``baka`` subcommand: its name, help line, argument builder and handler."""

    name: str
    help: str
    handler: Handler
    add_args: AddArgs = _no_args


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as subcommand ``name``; ``@args`` (applied first) adds its
    arguments. A duplicate name is rejected by the registry."""

    def deco(fn: Handler) -> Handler:
        COMMANDS.add(name, Command(name, help, fn, getattr(fn, "args", _no_args)))
        return fn

    return deco


def args(add: AddArgs) -> Callable[[Handler], Handler]:
    """Attach an argument builder to a handler (place it below ``@command``)."""

    def deco(fn: Handler) -> Handler:
        fn.args = add  # type: ignore[attr-defined]
        return fn

    return deco


def _has_default(action: argparse.Action) -> bool:
    d = action.default
    return not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, str | list) and not d))


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, except empty ones (None, False, [], "")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or not _has_default(action) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def show_defaults(p: argparse.ArgumentParser) -> None:
    """Options added without a help line still show their default in ``--help``; sub-actions
    (``baka world render``, ``baka lora extract``) get the same formatter."""
    for action in p._actions:
        if action.help is None and action.option_strings and _has_default(action):
            action.help = "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.formatter_class = DefaultsFormatter
                show_defaults(sub)


def print_config(title: str, cfg: dict) -> None:
    """The effective configuration of a run, printed before it starts."""
    print(f"[{title}]")
    width = max((len(k) for k in cfg), default=0)
    for k, v in cfg.items():
        print(f"  {k:<{width}} = {v}")


__all__ = ["COMMANDS", "Command", "DefaultsFormatter", "show_defaults", "args", "command", "print_config"]
