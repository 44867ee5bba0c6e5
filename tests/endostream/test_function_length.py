"""No function in endostream/ is longer than 100 lines (split long parsers and runners instead)."""

from __future__ import annotations

from tests.layout import REPO, long_functions


def test_no_function_over_100_lines() -> None:
    long = long_functions(REPO / "endostream", 100)
    assert not long, "split these functions:\n" + "\n".join(f"{name}: {lines} lines" for name, lines in long)
