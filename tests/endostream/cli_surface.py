"""The `endostream` command line as data: every subcommand path with its options, defaults and help texts.

`python -m tests.endostream.cli_surface > tests/endostream/cli_surface.json` writes the snapshot that
test_cli_surface.py holds the parser to; regenerate it only for a deliberate change of the public CLI.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

# `data synth --workers` defaults to os.cpu_count(): pinned so that the snapshot is the same on every machine
PINNED_CPU_COUNT = 4


def _plain(value: Any) -> Any:
    """A JSON value for an argparse default, const, choice or type (callables by name: they are not the surface)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return {"path": str(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    if callable(value):
        return "<callable>"
    return repr(value)


def _action(action: argparse.Action) -> dict[str, Any]:
    return {
        "option_strings": list(action.option_strings),
        "dest": action.dest,
        "kind": type(action).__name__,
        "default": _plain(action.default),
        "const": _plain(action.const),
        "type": _plain(action.type),
        "choices": _plain(list(action.choices)) if action.choices is not None else None,
        "nargs": _plain(action.nargs),
        "required": action.required,
        "metavar": _plain(action.metavar),
        "help": action.help,
        "version": getattr(action, "version", None),
    }


def _groups(parser: argparse.ArgumentParser) -> list[list[str]]:
    """Mutually exclusive groups by their members' dests."""
    return [[a.dest for a in group._group_actions] for group in parser._mutually_exclusive_groups]


def surface(parser: argparse.ArgumentParser, path: str = "endostream") -> dict[str, dict[str, Any]]:
    """{"endostream bench http": {...}, ...}: each (sub)parser's options, subcommands and parser-level defaults."""
    entry: dict[str, Any] = {
        "prog": parser.prog,
        "description": parser.description,
        "epilog": parser.epilog,
        "defaults": {k: _plain(v) for k, v in sorted(parser._defaults.items())},
        "exclusive_groups": _groups(parser),
        "options": [],
        "subcommands": {},
    }
    out = {path: entry}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            entry["subcommands"] = {
                "dest": action.dest,
                "required": action.required,
                "help": {name: helps.get(name) for name in action.choices},
            }
            for name, child in action.choices.items():
                out.update(surface(child, f"{path} {name}"))
        else:
            entry["options"].append(_action(action))
    return out


def current_surface() -> dict[str, dict[str, Any]]:
    """The surface of the parser `endostream` builds now."""
    from endostream.cli import build_parser

    with mock.patch.object(os, "cpu_count", return_value=PINNED_CPU_COUNT):
        return surface(build_parser())


if __name__ == "__main__":
    print(json.dumps(current_surface(), indent=1, ensure_ascii=False))  # noqa: T201
