"""Parse `/metrics` with prometheus-client's own text parser (the format Prometheus scrapes)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """metric family name -> [(sample name, labels, value)]."""
    reply = httpx.get(f"{url}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")  # the Prometheus text format
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(reply.text)
    }


def value(families: dict, sample: str, **labels: str) -> float:
    """Sum of `sample` values whose labels include `labels`."""
    family = sample
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            family = sample[: -len(suffix)]
    return sum(
        v
        for name, lab, v in families.get(family, [])
        if name == sample and all(lab.get(k) == x for k, x in labels.items())
    )
