"""Sweeps and pipelines (issue 24): retries, and what else a team running nightly
sweeps needs.  A real server over real HTTP, every wait a condition."""
import pytest

from conftest import job_config, wait_for

#: A job that fails with exit code 3 on its first run and succeeds on its second: it
#: leaves a marker beside itself in a folder of the test's.
FLAKY = """import os, sys
marker = os.path.join({folder!r}, os.environ["GPUQUEUE_JOB_ID"])
if not os.path.exists(marker):
    open(marker, "w").close()
    print("first try"); print("it broke", file=sys.stderr)
    sys.exit(3)
print("second try")
"""


def test_a_job_that_fails_once_then_succeeds_is_retried(server, tmp_path):
    code = FLAKY.format(folder=str(tmp_path))
    job_id = server.submit_ok(code, config=job_config(retries=2))["job_id"]
    st = server.wait(job_id)
    assert (st["status"], st["attempt"], st["exit_code"]) == ("completed", 2, 0), st
    res = server.results(job_id)
    assert (res["stdout"], res["attempt"]) == ("second try\n", 2)
    first = server.get(f"/api/results/{job_id}?attempt=1", server.token()).json()
    assert (first["exit_code"], first["error"], first["stdout"], first["stderr"]) == \
        (3, "exit code 3", "first try\n", "it broke\n")
    assert server.get(f"/api/results/{job_id}?attempt=2", server.token()).status_code == 404


@pytest.mark.parametrize("extra, attempts, status", [
    ({}, 1, "failed"),                                  # no retries asked for
    ({"retries": 2}, 3, "failed"),                      # every attempt fails
    ({"retries": 2, "retry_on_exit": [3]}, 1, "failed"),  # exit 4 does not count
    ({"retries": 2, "retry_on_exit": [4, 5]}, 3, "failed"),
])
def test_retries_stop_at_their_count_and_count_only_the_exits_asked_for(server, extra,
                                                                         attempts, status):
    job_id = server.submit_ok("import sys\nsys.exit(4)\n", config=job_config(**extra))["job_id"]
    st = server.wait(job_id)
    assert (st["status"], st["attempt"], st["exit_code"]) == (status, attempts, 4), st


def test_a_cancelled_job_is_never_retried(server, tmp_path):
    job_id = server.submit_ok("import time\nprint('up', flush=True)\ntime.sleep(60)\n",
                              config=job_config(expected_time=60, retries=3))["job_id"]
    server.wait(job_id, ("running",))
    assert server.post(f"/api/cancel/{job_id}", server.token()).status_code == 200
    st = server.wait(job_id)
    assert (st["status"], st["attempt"]) == ("cancelled", 1), st


@pytest.mark.parametrize("config, message", [
    ({"retries": 11}, "'retries' must be from 0 to 10"),
    ({"retries": -1}, "'retries' must be from 0 to 10"),
    ({"retry_on_exit": "3"}, "'retry_on_exit' must be a list"),
    ({"retry_on_exit": [3, "x"]}, "'retry_on_exit' must list"),
])
def test_bad_retry_keys_are_refused(server, config, message):
    r = server.submit("print(1)\n", config=job_config(**config))
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_a_retry_survives_a_kill_9_and_its_attempt_counts_on(make_server, tmp_path):
    """kill -9 while the second attempt runs: it is followed again as attempt 2, and the
    first attempt's output is still there."""
    server = make_server(nodes=1)
    go = tmp_path / "go"
    code = FLAKY.format(folder=str(tmp_path)).replace(
        'print("second try")', f'import time\nwhile not os.path.exists({str(go)!r}):\n'
        '    time.sleep(0.05)\nprint("second try")')
    job_id = server.submit_ok(code, config=job_config(expected_time=60, retries=1))["job_id"]
    wait_for(lambda: (st := server.status(job_id))["attempt"] == 2 and st["status"] == "running",
             "the second attempt to run")
    server.kill()
    server.start()
    st = server.status(job_id)
    assert (st["status"], st["attempt"]) == ("running", 2), st
    go.touch()
    st = server.wait(job_id)
    assert (st["status"], st["attempt"]) == ("completed", 2), st
    assert server.results(job_id)["stdout"] == "second try\n"
    first = server.get(f"/api/results/{job_id}?attempt=1", server.token()).json()
    assert first["stdout"] == "first try\n" and first["exit_code"] == 3
