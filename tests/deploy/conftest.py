"""Deploy tests: the value every dashboard and rule query returned is printed after the run (with or without -s)."""

from __future__ import annotations

from typing import Any

import pytest

VALUES_KEY = pytest.StashKey[list[dict[str, Any]]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    values = config.stash.get(VALUES_KEY, None)
    if not values:
        return
    terminalreporter.section(f"endostream dashboard and rule queries against Prometheus ({len(values)} expressions)")
    width = max(len(f"{v['panel']} [{v['ref']}]") for v in values)
    for v in values:
        label = f"{v['panel']} [{v['ref']}]"
        terminalreporter.write_line(f"{v['source']:<9} {label:<{width}}  {v['value']}")
