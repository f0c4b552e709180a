"""Spec-driven fuzzing: schemathesis reads the server's own /openapi.json and throws
generated (valid and invalid) requests at every operation of a REAL running server.

Every answer must be: not a 5xx, a documented status code, a documented content type,
and a body that conforms to the documented schema for that status.  Checks that demand
2xx for schema-valid input are deliberately not run: a schema-valid submit is random
bytes, not a YAML config, so the server is right to refuse it.

Each operation is fuzzed three ways: with a valid user token, with no token, and with
a wrong one.  Generation is bounded and derandomized (a fixed seed) so a CI run is
short and reproducible.  The last test checks the server survived it all.
"""
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import pytest
import requests

from conftest import Server, kill_processes_under

SEED = 20240611
MAX_EXAMPLES = 50

CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    # No .hypothesis folder and no replay of old failures: the same cases on every run.
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    # The stateful phase would chain calls through links the document does not declare.
    "phases": {"stateful": {"enabled": False}},
})

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

#: Operations that need no token; every other one must never answer 2xx without one.
PUBLIC = {("GET", "/"), ("GET", "/api/nodes"), ("GET", "/metrics"), ("GET", "/openapi.json"),
          ("GET", "/docs")}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    server = Server(base / "s", nodes=2).start()
    # One finished job, so that listings and nodes answer with real content to validate.
    server.done = server.submit_ok("print('before the fuzzing')\n", expected_time=5)["job_id"]
    assert server.wait(server.done)["status"] == "completed"
    yield server
    server.kill()
    kill_processes_under(base)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", config=CONFIG,
                                         timeout=30)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _nodeid_for_schemathesis(request):
    """schemathesis 4.32's from_fixture() reads and writes ``item._nodeid``, which pytest 9.2
    no longer has (it keeps ``item._id``); give it a plain attribute to use.  Only the
    names of the sub-tests in reports depend on it."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _call(case, server, authorization):
    """Send ``case`` with exactly this Authorization header (None: no header at all)."""
    if case.headers:
        for name in [h for h in case.headers if h.lower() == "authorization"]:
            del case.headers[name]
    headers = {"Authorization": authorization} if authorization is not None else None
    response = case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS,
                                      timeout=60)
    # Ours, or none where schemathesis drops it on purpose to try a missing credential.
    assert response.request.headers.get("Authorization") in (authorization, None)
    return response


@schema.parametrize()
def test_fuzz_with_a_valid_token(case, fuzz_server):
    _call(case, fuzz_server, f"Bearer {fuzz_server.token('alice')}")


@schema.parametrize()
def test_fuzz_without_a_token(case, fuzz_server):
    r = _call(case, fuzz_server, None)
    if (case.method.upper(), case.operation.path) not in PUBLIC:
        assert not 200 <= r.status_code < 300, (case.method, case.formatted_path, r.status_code)


@schema.parametrize()
def test_fuzz_with_a_wrong_token(case, fuzz_server):
    r = _call(case, fuzz_server, "Bearer " + "not-a-real-token-" + "x" * 26)
    if (case.method.upper(), case.operation.path) not in PUBLIC:
        assert not 200 <= r.status_code < 300, (case.method, case.formatted_path, r.status_code)


def test_server_survived_the_fuzzing(fuzz_server):
    assert fuzz_server.proc.poll() is None, f"the server died\n{fuzz_server.log()}"
    r = requests.get(fuzz_server.url + "/", timeout=30)
    assert r.status_code == 200 and r.json()["name"] == "gpuqueue", r.text
    # The job from before is intact, and the fuzzing queued nothing that is still waiting.
    assert fuzz_server.results(fuzz_server.done)["stdout"] == "before the fuzzing\n"
    assert r.json()["queue_length"] == 0
    assert "Traceback" not in fuzz_server.log(), fuzz_server.log()[-3000:]
