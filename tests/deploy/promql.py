"""PromQL found in the shipped dashboard and rule files, made evaluable outside Grafana and Prometheus' rule engine.

- Grafana variables get concrete values (`$__rate_interval` -> `1m`, `$stream` -> `.*`, ...).
- An alert expression is a condition: it returns nothing while all is well, so "returns data" says nothing about
  it. `condition_operands` splits it at the top-level set operators (`and`, `or`, `unless`) and strips the top-level
  comparison of each part (`X > 0.05` -> `X`), and `absent(X == 1)` -> `X`: what is left are the series the condition
  is computed from, and each of those must return data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Values for a test run lasting well under a minute with a 1 s scrape interval: every window holds all samples.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1m",
    "${__rate_interval}": "1m",
    "${__interval}": "15s",
    "${__range}": "1m",
}
GPU_METRIC = re.compile(r"\bDCGM_[A-Z0-9_]+")
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_SET_OPERATOR = re.compile(r"\s(and|or|unless)\s")
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")
_ABSENT = re.compile(r"^absent(?:_over_time)?\((.*)\)$", re.S)


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it came from."""

    source: str  # "dashboard" or "rules"
    owner: str  # panel title or rule name
    ref: str  # target refId, "expr", or "expr[i]" for an alert operand
    expr: str  # as written in the file
    promql: str  # what is sent to Prometheus

    @property
    def gpu(self) -> bool:
        return bool(GPU_METRIC.search(self.expr))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's built-in interval variables, then dashboard variables (unknown ones become `.*`)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return _VARIABLE.sub(lambda m: variables.get(m.group(1), ".*"), expr)


def dashboard_queries(path: Path) -> list[Query]:
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v.get("allValue") or ".*" for v in dashboard.get("templating", {}).get("list", [])}
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                expr = target["expr"]
                out.append(Query("dashboard", panel["title"], target["refId"], expr, substitute(expr, variables)))
    return out


def dashboard_variable_queries(path: Path) -> dict[str, str]:
    """Template variable name -> its `label_values(metric, label)` definition."""
    dashboard = json.loads(path.read_text())
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        out[var["name"]] = query["query"] if isinstance(query, dict) else query
    return out


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))  # rows (collapsed or not) hold panels too
    return out


def rule_queries(path: Path) -> list[Query]:
    """Recording rules as they are; each alert as the operands of its condition (see the module docstring)."""
    out = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            if "record" in rule:
                out.append(Query("rules", rule["record"], "expr", expr, expr))
                continue
            for i, operand in enumerate(condition_operands(expr)):
                out.append(Query("rules", rule["alert"], f"expr[{i}]", expr, operand))
    return out


def condition_operands(expr: str) -> list[str]:
    return [_series_of(part) for part in _split_top_level(expr.strip(), _SET_OPERATOR)]


def _series_of(part: str) -> str:
    part = _unwrap(part.strip())
    absent = _ABSENT.match(part)
    if absent:
        return _series_of(absent.group(1))
    return _unwrap(_strip_comparison(part))


def _top_level(expr: str) -> Iterator[int]:
    """Positions in `expr` outside strings and brackets (where operators of the whole expression sit)."""
    depth, quote = 0, ""
    for i, ch in enumerate(expr):
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            yield i


def _strip_comparison(expr: str) -> str:
    """`A > 0.05` -> `A` (the first comparison at depth 0, outside strings; label matchers sit inside braces)."""
    for i in _top_level(expr):
        match = _COMPARISON.match(expr, i)
        if match and not (match.group(1) in ("<", ">") and expr[i + 1 : i + 2] == "="):
            return expr[:i].strip()
    return expr.strip()


def _split_top_level(expr: str, pattern: re.Pattern[str]) -> list[str]:
    parts, start = [], 0
    for i in _top_level(expr):
        if i < start:
            continue  # inside the separator just matched
        match = pattern.match(expr, i)
        if match:
            parts.append(expr[start:i])
            start = match.end()
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def _unwrap(expr: str) -> str:
    """Drop parentheses that wrap the whole expression."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")") and _closing(expr) == len(expr) - 1:
        expr = expr[1:-1].strip()
    return expr


def _closing(expr: str) -> int:
    depth, quote = 0, ""
    for i, ch in enumerate(expr):
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
        elif ch in "\"'`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1
