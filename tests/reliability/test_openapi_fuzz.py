"""schemathesis against the running service's own /openapi.json: generated requests for every documented operation
get no 5xx, and every answer matches what the schema declares (status code, content type, body). Bounded in
examples per operation so the suite stays fast; `ENDOSTREAM_FUZZ_EXAMPLES` raises it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.server import ServerProcess

EXAMPLES = int(os.environ.get("ENDOSTREAM_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(temporal_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # the tiny bundle with a temporal head: generated session ids and frame times reach real temporal state too
    proc = ServerProcess(temporal_bundle)
    proc.start(tmp_path_factory.mktemp("fuzz-server"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_declared_answers(case: schemathesis.Case) -> None:
    case.call_and_validate(timeout=30, checks=CHECKS)
