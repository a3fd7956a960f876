"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): whatever a client sends, never a 5xx.

Runs against a real server per deployment kind (a classifier and a causal LM), admin endpoints included
(with the token: the fuzzer may add and remove tasks, so these servers are its own). Bounded: at most
MAX_EXAMPLES generated requests per operation."""

from __future__ import annotations

import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from servekit import server_fixture

TOKEN = "fuzz-token"
MAX_EXAMPLES = 30


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def fuzzed_server(request, text_deployments):
    d = text_deployments[request.param]
    yield from server_fixture(d.deploy, "--admin-token", TOKEN, "--adapter-root", str(d.adapter_root),
                              "--request-timeout", "20")


def _operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 8, f"the schema lists only {[f'{o.method} {o.path}' for o in ops]}"
    return ops


# schemathesis's own pytest integration reaches into pytest internals that pytest 9.2 renamed, so the
# operations are driven here with Hypothesis directly: positive cases (valid by the schema) and negative
# ones (violating it), for every operation the schema documents.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_request_gets_a_server_error(fuzzed_server, mode):
    failures, fuzzed = [], 0
    for op in _operations(fuzzed_server.url):
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            # Half the cases carry the admin token so that the task endpoints are exercised past authentication.
            with_token = zlib.crc32(repr((case.path_parameters, case.body)).encode()) % 2
            headers = {"Authorization": f"Bearer {TOKEN}"} if with_token else None
            case.call_and_validate(base_url=fuzzed_server.url, headers=headers, checks=[not_a_server_error],
                                   timeout=30)

        try:
            fuzz()
            fuzzed += 1
        except Unsatisfiable:
            # An operation without parameters or body has no negative cases (GET /health, /metrics, ...).
            if mode is GenerationMode.POSITIVE:
                failures.append(f"{op.method.upper()} {op.path}: no case could be generated")
        except Exception as e:  # every operation is fuzzed; all failures are reported together
            failures.append(f"{op.method.upper()} {op.path}: {e}")
    assert not failures, "\n\n".join(failures)
    assert fuzzed >= 5  # classify/completions, and the task administration endpoints
