"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): whatever a client sends, never a 5xx.

Runs against a real server per deployment kind (a classifier and a causal LM), admin endpoints included
(with the token: the fuzzer may add and remove tasks, so these servers are its own). Bounded: at most
MAX_EXAMPLES generated requests per operation."""

from __future__ import annotations

import zlib

import pytest
import schemathesis
import servekit
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from servekit import server_fixture


@pytest.fixture(scope="session")
def text_deployments(tmp_path_factory):
    return servekit.text_deployments(tmp_path_factory)

TOKEN = "fuzz-token"
MAX_EXAMPLES = 30


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def fuzzed_server(request, text_deployments):
    d = text_deployments[request.param]
    yield from server_fixture(d.deploy, "--admin-token", TOKEN, "--adapter-root", str(d.adapter_root),
                              "--request-timeout", "20")


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_request_gets_a_server_error(case):
    # Half the cases carry the admin token so that the task endpoints are exercised past authentication.
    with_token = zlib.crc32(repr((case.path_parameters, case.body)).encode()) % 2
    headers = {"Authorization": f"Bearer {TOKEN}"} if with_token else None
    case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=30)
