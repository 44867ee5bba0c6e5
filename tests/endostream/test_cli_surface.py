"""The public command line does not change by accident: every subcommand path, option string, default, choice and
help text of `endostream` equals the committed snapshot (cli_surface.json, taken before the CLI was split into
endostream/commands/)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.endostream.cli_surface import current_surface

SNAPSHOT = Path(__file__).with_name("cli_surface.json")


def test_parser_matches_the_committed_surface() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    actual = json.loads(json.dumps(current_surface()))  # tuples -> lists, as in the file
    assert list(actual) == list(expected), "subcommand paths differ (or `--help` lists them in another order)"
    for path in expected:
        assert actual[path] == expected[path], f"`{path}` differs from {SNAPSHOT.name}"


def test_snapshot_covers_every_command() -> None:
    # guards the snapshot itself: an empty or truncated file would make the comparison above vacuous
    expected = json.loads(SNAPSHOT.read_text())
    top = expected["endostream"]["subcommands"]["help"]
    commands = {"data", "train", "eval", "ablate", "demo", "export", "bench", "gpu-check", "serve", "train-temporal"}
    assert set(top) == commands
    assert {"endostream bench http", "endostream export trt", "endostream serve"} <= set(expected)
    assert sum(len(entry["options"]) for entry in expected.values()) > 150
