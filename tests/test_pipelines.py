"""Sweeps and pipelines (issue 24): retries, and what else a team running nightly
sweeps needs.  A real server over real HTTP, every wait a condition."""
import contextlib
import errno
import hashlib
import hmac
import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import GPUQUEUE, ROOT, job_config, wait_for

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gpuqueue  # noqa: E402

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


def test_each_attempt_starts_with_an_empty_output_folder_and_the_last_ones_files_come_back(
        server, tmp_path):
    """As the README says: what a retried attempt left in its output folder goes with
    its folder on the node; the next attempt finds none of it, and the job's files
    are its last attempt's alone."""
    code = FLAKY.format(folder=str(tmp_path)).replace(
        "if not os.path.exists(marker):",
        "out = os.environ['GPUQUEUE_OUTPUT_DIR']\nprint(sorted(os.listdir(out)))\n"
        "open(os.path.join(out, 'try%d' % len(os.listdir(out))), 'w').write('x')\n"
        "if not os.path.exists(marker):")
    job_id = server.submit_ok(code, config=job_config(retries=1))["job_id"]
    assert server.wait(job_id)["status"] == "completed"
    assert server.results(job_id)["stdout"] == "[]\nsecond try\n"
    listing = server.get(f"/api/outputs/{job_id}", server.token()).json()
    assert [f["path"] for f in listing["files"]] == ["try0"], listing


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


def waiter(path):
    """A job that runs until ``path`` exists."""
    return (f"import os, time\nwhile not os.path.exists({str(path)!r}):\n    time.sleep(0.05)\n"
            "print('done waiting')\n")


def test_a_chain_runs_in_order_and_a_failed_link_cancels_the_rest(server, tmp_path):
    go = tmp_path / "go"
    first = server.submit_ok(waiter(go), config=job_config(expected_time=60))["job_id"]
    second = server.submit_ok("print('second')\n", config=job_config(after=[first]))
    assert second["queue_position"] is None  # it waits for a job, not in a queue
    second = second["job_id"]
    third = server.submit_ok("print('third')\n", config=job_config(after=[second]))["job_id"]
    st = server.status(second)
    assert st["status"] == "pending" and st["waiting_on"] == [first], st
    assert first in st["waiting"]
    go.touch()
    assert server.wait(third)["status"] == "completed"
    assert server.results(third)["stdout"] == "third\n"
    done = {j: server.status(j)["finished_at"] for j in (first, second, third)}
    assert done[first] <= server.status(second)["started_at"] and \
        done[second] <= server.status(third)["started_at"]

    # A chain whose first link fails: the rest is cancelled at once, each naming why.
    bad = server.submit_ok("import sys\nsys.exit(5)\n")["job_id"]
    after_bad = server.submit_ok("print('never')\n", config=job_config(after=[bad]))["job_id"]
    last = server.submit_ok("print('never')\n", config=job_config(after=[after_bad]))["job_id"]
    anyway = server.submit_ok("print('anyway')\n", config=job_config(after_any=[bad]))["job_id"]
    st = server.wait(last)
    assert st["status"] == "cancelled" and after_bad in st["error"], st
    st = server.status(after_bad)
    assert st["status"] == "cancelled" and f"its dependency {bad} failed" in st["error"], st
    assert server.wait(anyway)["status"] == "completed"
    # Submitted after its dependency had failed: cancelled at once all the same.
    late = server.submit_ok("print('never')\n", config=job_config(after=[bad]))["job_id"]
    assert server.wait(late)["status"] == "cancelled"


def test_jobs_submitted_after_a_failed_dependency_never_start(server, tmp_path):
    """A job whose ``after`` dependency failed before it was submitted is cancelled at
    once, naming the dependency; it is never queued meanwhile, where an idle node
    could start it first.  Arrays too, whose jobs are cancelled one by one."""
    bad = server.submit_ok("import sys\nsys.exit(5)\n")["job_id"]
    assert server.wait(bad)["status"] == "failed"
    ran = tmp_path / "ran"
    ran.mkdir()
    code = f"import os\nopen(os.path.join({str(ran)!r}, os.environ['GPUQUEUE_JOB_ID']), 'w')\n"
    ids = []
    for _ in range(3):
        ids.append(server.submit_ok(code, config=job_config(after=[bad]))["job_id"])
        ids += server.submit_ok(code, config=job_config(after=[bad], array=8))["job_ids"]
    for job_id in ids:
        st = server.wait(job_id)
        assert st["status"] == "cancelled" and st["started_at"] is None, st
        assert st["error"] == f"cancelled while pending: its dependency {bad} failed", st
    assert list(ran.iterdir()) == []


def test_a_dependency_must_be_a_job_the_user_may_see(server):
    alices = server.submit_ok("print(1)\n")["job_id"]
    r = server.submit("print(2)\n", config=job_config("bob", after=[alices]), user="bob")
    assert r.status_code == 404 and "no such job" in r.json()["error"], r.text
    r = server.submit("print(2)\n", config=job_config(after=["0" * 24]))
    assert r.status_code == 404, r.text
    r = server.submit("print(2)\n", config=job_config(after=["not an id"]))
    assert r.status_code == 400 and "'after' must list" in r.json()["error"], r.text
    admin = server.token("root", admin=True)
    r = server.submit("print(3)\n", config=job_config("bob", after=[alices]), token=admin)
    assert r.status_code == 201, r.text  # an admin may chain anyone's jobs


def test_dependencies_hold_across_a_kill_9(make_server, tmp_path):
    server = make_server(nodes=2)
    go = tmp_path / "go"
    first = server.submit_ok(waiter(go), config=job_config(expected_time=60))["job_id"]
    server.wait(first, ("running",))
    then = server.submit_ok("print('then')\n", config=job_config(after=[first]))["job_id"]
    doomed_first = server.submit_ok(waiter(go) + "import sys\nsys.exit(1)\n",
                                    config=job_config(expected_time=60))["job_id"]
    doomed = server.submit_ok("print('never')\n",
                              config=job_config(after=[doomed_first]))["job_id"]
    server.kill()
    server.start()
    for job_id, on in ((then, first), (doomed, doomed_first)):
        st = server.status(job_id)
        assert st["status"] == "pending" and st["waiting_on"] == [on], st
    go.touch()
    assert server.wait(then)["status"] == "completed"
    assert server.wait(doomed)["status"] == "cancelled"


def test_the_same_submit_twice_with_one_key_queues_one_job(make_server):
    server = make_server(nodes=1)
    token = server.token()
    files = {"code": ("j.py", "print('once')\n"), "config_file": ("c.yaml", job_config())}
    first = requests.post(server.url + "/api/submit", files=files, timeout=30,
                          headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
    again = requests.post(server.url + "/api/submit", files=files, timeout=30,
                          headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    other = {"code": ("j.py", "print('another')\n"), "config_file": ("c.yaml", job_config())}
    r = requests.post(server.url + "/api/submit", files=other, timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"], r.text
    # Another user's same key is another key; a new key is a new job.
    bob = requests.post(server.url + "/api/submit", timeout=30,
                        files={**files, "config_file": ("c.yaml", job_config("bob"))},
                        headers={"Authorization": f"Bearer {server.token('bob')}",
                                 "Idempotency-Key": "k-1"})
    assert bob.status_code == 201 and bob.json()["job_id"] != first.json()["job_id"]
    server.wait(first.json()["job_id"])
    # Kept across a restart: after kill -9, the key still answers with the first job.
    server.kill()
    server.start()
    later = requests.post(server.url + "/api/submit", files=files, timeout=30,
                          headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"})
    assert later.status_code == 201 and later.json()["job_id"] == first.json()["job_id"]
    jobs = server.get("/api/jobs", token).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [first.json()["job_id"]]
    r = requests.post(server.url + "/api/submit", files=files, timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k" * 256})
    assert r.status_code == 400, r.text


def test_a_key_whose_job_retention_removed_never_runs_it_again(make_server):
    """A key is kept a day; retention may remove its job sooner (keep_finished_days).
    The same submit with that key then says so (409) and queues nothing: the job ran
    once.  An array's key too, never a 500."""
    server = make_server(nodes=1, keep_finished_days=3 / 86400)
    token = server.token()
    for key, cfg in (("k-job", job_config()), ("k-array", job_config(array=2))):
        files = {"code": ("j.py", "print('once')\n"), "config_file": ("c.yaml", cfg)}
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
        first = requests.post(server.url + "/api/submit", files=files, headers=headers,
                              timeout=30)
        assert first.status_code == 201, first.text
        ids = first.json().get("job_ids") or [first.json()["job_id"]]
        for job_id in ids:
            server.wait(job_id)
        wait_for(lambda: all(server.get(f"/api/status/{j}", token).status_code == 404
                             for j in ids), "retention to remove them", timeout=30)
        again = requests.post(server.url + "/api/submit", files=files, headers=headers,
                              timeout=30)
        assert again.status_code == 409 and "new key" in again.json()["error"], again.text
        assert server.get("/api/jobs", token).json()["jobs"] == []


class DroppingProxy:
    """A loopback TCP proxy that passes requests on to the server but, on its first
    connection, drops the server's answer: a submit that reached the server whose
    client never heard back."""

    def __init__(self, target):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            client, _ = self.sock.accept()
            self.connections += 1
            threading.Thread(target=self._pipe, args=(client, self.connections == 1),
                             daemon=True).start()

    def _pipe(self, client, drop):
        host, port = self.target.split("//")[1].split(":")
        with client, socket.create_connection((host, int(port))) as upstream:
            threading.Thread(target=self._copy, args=(client, upstream), daemon=True).start()
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
                if drop and b"\r\n\r\n" in answer:  # the server has answered: cut the
                    client.shutdown(socket.SHUT_RDWR)  # client off (a close would wait
                    return                             # for the copying thread's recv)
                if not drop:
                    client.sendall(chunk)

    @staticmethod
    def _copy(src, dst):
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)


def test_the_client_sends_a_broken_submit_again_and_it_is_queued_once(server, tmp_path):
    proxy = DroppingProxy(server.url)
    script = tmp_path / "once.py"
    script.write_text("print('once')\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(job_config())
    r = subprocess.run([sys.executable, str(GPUQUEUE), "submit", str(script), "-c", str(cfg),
                        "--json", "--server", proxy.url, "--token", server.token()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "trying again" in r.stderr and proxy.connections == 2, (r.stderr, proxy.connections)
    job_id = json.loads(r.stdout)["job_id"]
    jobs = server.get("/api/jobs", server.token()).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id]  # reached the server twice, queued once


class Receiver:
    """A webhook receiver on loopback: every POST it gets, with its headers."""

    def __init__(self, port=0):
        got = self.got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


SECRET = "a-shared-secret-of-the-admins"


@pytest.fixture
def hooked(make_server, monkeypatch):
    """A server that may notify loopback URLs under /hooks/ of one port, kept free."""
    monkeypatch.setenv("GQ_TEST_HOOK_SECRET", SECRET)
    with socket.socket() as probe:  # a port nothing listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = make_server(nodes=1, webhooks={"secret_env": "GQ_TEST_HOOK_SECRET",
                                            "allow": [f"http://127.0.0.1:{port}/hooks"]})
    return server, port


def test_a_notice_waits_for_a_receiver_that_is_down_and_is_signed(hooked):
    server, port = hooked
    url = f"http://127.0.0.1:{port}/hooks/done"
    job_id = server.submit_ok("print('done')\n", config=job_config(notify=url))["job_id"]
    st = server.wait(job_id)
    assert st["status"] == "completed"
    wait_for(lambda: (server.status(job_id)["notice"] or "").startswith("pending: 2 tries"),
             "two tries at a receiver that is down")
    receiver = Receiver(port)  # it comes up; the next try (backoff) reaches it
    try:
        wait_for(lambda: server.status(job_id)["notice"] == "delivered", "the notice", 60)
        (headers, body), = receiver.got
        want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Gpuqueue-Signature"] == want
        notice = json.loads(body)
        assert (notice["job_id"], notice["status"], notice["exit_code"]) == (job_id, "completed", 0)
    finally:
        receiver.stop()
    # Once delivered, it stays so across a restart, and is not sent again.
    server.kill()
    server.start()
    assert server.status(job_id)["notice"] == "delivered" and len(receiver.got) == 1


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/other", "http://127.0.0.1:{port}/hooksx",
    "http://127.0.0.1:1/hooks/x", "http://intranet.example.com/hooks", "http://user@127.0.0.1:{port}/hooks/",
    "file:///etc/passwd", "ftp://127.0.0.1:{port}/hooks/", "http://127.0.0.1:{port}@evil/hooks",
])
def test_notices_go_only_under_the_allowed_prefixes(hooked, url):
    server, port = hooked
    r = server.submit("print(1)\n", config=job_config(notify=url.format(port=port)))
    assert r.status_code == 400 and "'notify'" in r.json()["error"], r.text


def test_notify_on_a_server_without_webhooks_is_refused(server):
    r = server.submit("print(1)\n", config=job_config(notify="http://127.0.0.1:9/hooks"))
    assert r.status_code == 400 and "sends no notices" in r.json()["error"], r.text


ARRAY_JOB = """import json, os, time
print(os.environ["GPUQUEUE_ARRAY_ID"], os.environ["GPUQUEUE_ARRAY_INDEX"],
      os.environ["GPUQUEUE_ARRAY_SIZE"], os.environ.get("GPUQUEUE_PARAMS"))
time.sleep(0.3)
"""


def test_an_array_of_8_runs_2_at_a_time_and_a_sweep_of_4_gets_its_values(make_server):
    server = make_server(nodes=4)
    token = server.token()
    r = server.submit(ARRAY_JOB, config=job_config(array="0-7%2"))
    assert r.status_code == 201, r.text
    arr = r.json()
    assert len(arr["job_ids"]) == 8 and len(set(arr["job_ids"])) == 8
    for job_id in arr["job_ids"]:
        server.wait(job_id)
    runs = []
    for i, job_id in enumerate(arr["job_ids"]):
        st = server.status(job_id)
        assert (st["status"], st["array_id"], st["array_index"]) == ("completed", arr["array_id"], i)
        assert server.results(job_id)["stdout"] == f"{arr['array_id']} {i} 8 None\n"
        runs.append((st["started_at"], st["finished_at"]))
    # Never more than 2 at once: at each start, fewer than 2 others were running.
    for start, _ in runs:
        assert sum(1 for s, f in runs if s < start < f) < 2, runs
    info = server.get(f"/api/arrays/{arr['array_id']}", token).json()
    assert info["size"] == 8 and info["counts"]["completed"] == 8 and info["limit"] == 2
    listed = server.get(f"/api/jobs?array={arr['array_id']}&limit=5", token).json()
    assert len(listed["jobs"]) == 5 and listed["next_cursor"]

    r = server.submit(ARRAY_JOB, config=job_config(sweep={"lr": [0.1, 0.01], "batch": [32, 64]}))
    assert r.status_code == 201, r.text
    seen = []
    for job_id in r.json()["job_ids"]:
        server.wait(job_id)
        seen.append(json.loads(server.results(job_id)["stdout"].split(" ", 3)[3]))
    # Every combination, the first key's values slowest (job_config writes keys sorted).
    assert seen == [{"batch": 32, "lr": 0.1}, {"batch": 32, "lr": 0.01},
                    {"batch": 64, "lr": 0.1}, {"batch": 64, "lr": 0.01}]
    # The code is stored once for all of an array's jobs.
    spool = server.dir / "spool" / "done"
    inodes = {(spool / j / "code.py").stat().st_ino for j in r.json()["job_ids"]}
    assert len(inodes) == 1


def test_an_array_is_cancelled_whole_and_refused_whole(make_server):
    server = make_server(nodes=2, max_pending_per_user=10, max_array_size=50)
    token = server.token()
    arr = server.submit("import time\ntime.sleep(60)\n",
                        config=job_config(expected_time=60, array=6)).json()
    r = server.post(f"/api/cancel/{arr['array_id']}", token)
    assert r.status_code == 200 and r.json()["cancelled"] == 6, r.text
    for job_id in arr["job_ids"]:
        assert server.wait(job_id)["status"] == "cancelled"
    r = server.submit("print(1)\n", config=job_config(array=11))   # over the pending cap
    assert r.status_code == 429 and "refused whole" in r.json()["error"], r.text
    r = server.submit("print(1)\n", config=job_config(array=51))   # over max_array_size
    assert r.status_code == 400 and "max_array_size" in r.json()["error"], r.text
    r = server.submit("print(1)\n", config=job_config(array="3-1"))
    assert r.status_code == 400, r.text
    assert server.get("/api/jobs", token).json()["jobs"].__len__() == 6
    # Someone else's array is no one's to see or cancel.
    bob = server.token("bob")
    assert server.get(f"/api/arrays/{arr['array_id']}", bob).status_code == 404
    assert server.post(f"/api/cancel/{arr['array_id']}", bob).status_code == 404


def test_a_kill_9_during_an_array_submit_leaves_all_of_it_or_none(make_server):
    server = make_server(nodes=1, max_pending_per_user=10 ** 6)
    token = server.token()
    code = "print(1)\n" + "#" * 200_000  # stored once, whatever the array's size
    for delay in (0.0, 0.05, 0.2, 0.5):
        result = {}

        def submit():
            with contextlib.suppress(requests.RequestException):
                result["r"] = server.submit(code, config=job_config(expected_time=3600,
                                                                    array=1000))
        thread = threading.Thread(target=submit)
        thread.start()
        time.sleep(delay)
        server.kill()
        thread.join()
        server.start()
        jobs = []
        cursor = ""
        while cursor is not None:
            page = server.get(f"/api/jobs?limit=1000{cursor}", token).json()
            jobs += page["jobs"]
            cursor = page["next_cursor"] and f"&cursor={page['next_cursor']}"
        arrays = {j["array_id"] for j in jobs}
        for array_id in arrays:  # every array there is whole, and its record says so
            mine = [j for j in jobs if j["array_id"] == array_id]
            assert len(mine) == 1000 and sorted(j["array_index"] for j in mine) == \
                list(range(1000)), (delay, len(mine))
        if "r" in result and result["r"].status_code == 201:  # answered: it must be there
            assert result["r"].json()["array_id"] in arrays
        for array_id in arrays:
            server.post(f"/api/cancel/{array_id}", token)


@pytest.mark.parametrize("committed", [True, False])
def test_recovery_queues_a_committed_array_whole_and_drops_an_uncommitted_one(tmp_path,
                                                                               committed):
    """The crash between an array's record and the moves into its queues, made on
    purpose: the next start queues every job of it (or, with no record, none)."""
    spool = gpuqueue.Spool(tmp_path / "spool", [0, 1])
    spool.open()
    array_id = gpuqueue.new_job_id()
    jobs = [gpuqueue.Job(id=gpuqueue.new_job_id(), user_id="alice", competition_id="c",
                         project_id="p", expected_time=5.0, submitted_at=time.time(),
                         node_id=-1, array_id=array_id, array_index=i, array_size=3)
            for i in range(3)]
    spool.stage_array(array_id, jobs, b"print(1)\n", b"x: 1\n")
    if committed:
        spool.commit_array(array_id, jobs)
    spool.close()  # the crash: nothing more happens
    again = gpuqueue.Spool(tmp_path / "spool", [0, 1])
    again.open()
    try:
        found = [again.get(j.id) for j in jobs]
        if committed:
            assert [(j.status, j.array_index) for j in found] == [("pending", i) for i in range(3)]
            assert sum(len(again.pending_ids(n)) for n in (0, 1)) == 3
        else:
            assert found == [None] * 3 and again.array(array_id) is None
        assert not list((tmp_path / "spool" / "tmp").iterdir())
    finally:
        again.close()


def test_an_arrays_notice_is_not_due_while_the_array_is_being_queued(tmp_path):
    """The notices thread may look at the outbox at any moment: between the array's
    notice entry and its record it must not take the array for one that never was
    (dropping its notice), nor, before its jobs are placed, for one whose jobs have
    all ended (sending counts of nothing, and nothing when they really end)."""
    spool = gpuqueue.Spool(tmp_path / "spool", [0, 1])
    spool.open()
    try:
        array_id = gpuqueue.new_job_id()
        jobs = [gpuqueue.Job(id=gpuqueue.new_job_id(), user_id="alice", competition_id="c",
                             project_id="p", expected_time=5.0, submitted_at=time.time(),
                             node_id=-1, array_id=array_id, array_index=i, array_size=3,
                             notify="http://127.0.0.1:9/notice")
                for i in range(3)]
        base = spool.stage_array(array_id, jobs, b"print(1)\n", b"x: 1\n")
        seen, commit = [], spool.commit_array

        def commit_looked_at(*args):
            seen.append(spool.notices_due()[0])
            commit(*args)
            seen.append(spool.notices_due()[0])
        spool.commit_array = commit_looked_at
        spool.enqueue_array(array_id, jobs, base, {0, 1}, 100, None, {})
        assert seen == [[], []]
        assert spool.notices_due()[0] == []
        outbox = json.loads((tmp_path / "spool" / "outbox" / f"{array_id}.json").read_text())
        assert outbox["body"] is None  # due once its three jobs have ended
        assert sum(len(spool.pending_ids(n)) for n in (0, 1)) == 3
    finally:
        spool.close()


def test_two_arrays_submitted_at_once_never_pass_the_pending_cap_together(tmp_path):
    """An array's room under its user's pending cap is held from the check to its
    jobs' placing: a second array submitted meanwhile (another HTTP thread) counts
    it, and is refused whole when both would not fit."""
    spool = gpuqueue.Spool(tmp_path / "spool", [0])
    spool.open()
    try:
        def array():
            array_id = gpuqueue.new_job_id()
            jobs = [gpuqueue.Job(id=gpuqueue.new_job_id(), user_id="alice", competition_id="c",
                                 project_id="p", expected_time=5.0, submitted_at=time.time(),
                                 node_id=-1, array_id=array_id, array_index=i, array_size=6)
                    for i in range(6)]
            return array_id, jobs, spool.stage_array(array_id, jobs, b"print(1)\n", b"x: 1\n")
        second, commit, refused = array(), spool.commit_array, []

        def commit_beside_another(*args):
            spool.commit_array = commit
            with pytest.raises(gpuqueue.TooMany) as exc:
                spool.enqueue_array(*second, {0}, 10, None, {})
            refused.append(str(exc.value))
            commit(*args)
        spool.commit_array = commit_beside_another
        spool.enqueue_array(*array(), {0}, 10, None, {})
        assert refused and "has 6 pending jobs" in refused[0], refused
        assert len(spool.pending_ids(0)) == 6
        assert not (tmp_path / "spool" / "tmp" / second[0]).exists()
    finally:
        spool.close()


def test_a_cancel_that_finds_no_room_leaves_its_job_waiting_on_what_is_left(tmp_path):
    """A cancel of a waiting job takes it out of the index, then writes its record: with
    no room for it the job is put back as it was, waiting only on what has not ended
    since (the end of what it waited for, meanwhile, released it without it)."""
    spool = gpuqueue.Spool(tmp_path / "spool", [0])
    spool.open()
    try:
        def queued(**deps):
            job = gpuqueue.Job(id=gpuqueue.new_job_id(), user_id="alice", competition_id="c",
                               project_id="p", expected_time=5.0, submitted_at=time.time(),
                               node_id=-1, **deps)
            spool.enqueue(job, spool.stage(job, b"print(1)\n", b"x: 1\n"), {0}, 100)
            return job
        first = queued()
        then = queued(after_any=[first.id])
        assert spool.get(then.id).waiting_on == {first.id}
        write = spool._write_result

        def no_room_for_the_second(job, folder, outcome):
            if job.id == then.id:
                spool.request_cancel(first.id)  # the job it waits for ends meanwhile
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(job, folder, outcome)
        spool._write_result = no_room_for_the_second
        with pytest.raises(gpuqueue.DiskFull):
            spool.request_cancel(then.id)
        assert spool.get(first.id).status == "cancelled"
        assert spool.get(then.id).waiting_on == frozenset()
        assert spool.pending_ids(0) == [then.id]  # queued: nothing is left to wait for
    finally:
        spool.close()


def test_the_clients_wait_for_an_array_waits_for_all_its_jobs(server, tmp_path):
    """'submit --array N --wait' waits until every job of the array has ended, and
    its status says whether all completed, so that 'submit ... --wait && next' never
    goes on while they run, nor after one failed."""
    script = tmp_path / "a.py"
    script.write_text("import os, sys, time\ntime.sleep(1)\n"
                      "sys.exit(3 if os.environ['GPUQUEUE_ARRAY_INDEX'] == '1' else 0)\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(job_config(expected_time=30))
    env = {"GPUQUEUE_URL": server.url, "GPUQUEUE_TOKEN": server.token(), "PATH": "/usr/bin:/bin"}

    def submit(*args):
        return subprocess.run(["/usr/bin/python3", str(GPUQUEUE), "submit", str(script), "-c",
                               str(cfg), *args], capture_output=True, text=True, timeout=120,
                              env=env)
    r = submit("--array", "0-2", "--wait")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "2 completed, 1 failed" in r.stderr, r.stderr
    array_id = r.stdout.split()[1].rstrip(":")
    counts = server.get(f"/api/arrays/{array_id}", server.token()).json()["counts"]
    assert (counts["completed"], counts["failed"]) == (2, 1), counts
    r = submit("--array", "1", "--wait", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["counts"]["completed"] == 1
    r = submit("--array", "2", "--wait", "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "outputs JOB -o DIR" in r.stderr, r.stderr


def test_the_client_submits_lists_and_cancels_an_array(server, tmp_path):
    script = tmp_path / "a.py"
    script.write_text("import time\ntime.sleep(60)\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(job_config(expected_time=60))
    env = {"GPUQUEUE_URL": server.url, "GPUQUEUE_TOKEN": server.token(), "PATH": "/usr/bin:/bin"}

    def client(*args):
        r = subprocess.run(["/usr/bin/python3", str(GPUQUEUE), *args], capture_output=True,
                           text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout
    out = json.loads(client("submit", str(script), "-c", str(cfg), "--array", "0-3%1", "--json"))
    assert len(out["job_ids"]) == 4
    listed = client("jobs", "--array", out["array_id"])
    assert all(j in listed for j in out["job_ids"])
    assert f"array {out['array_id']}: 4 jobs cancelled" in client("cancel", out["array_id"])
    for job_id in out["job_ids"]:
        assert server.wait(job_id)["status"] == "cancelled"


def test_an_array_sends_one_notice_once_all_its_jobs_have_ended(hooked):
    server, port = hooked
    receiver = Receiver(port)
    try:
        url = f"http://127.0.0.1:{port}/hooks/array"
        arr = server.submit("import os, sys\nsys.exit(int(os.environ['GPUQUEUE_ARRAY_INDEX']) % 2)\n",
                            config=job_config(array=4, notify=url)).json()
        for job_id in arr["job_ids"]:
            server.wait(job_id)
        wait_for(lambda: server.status(arr["job_ids"][0])["notice"] == "delivered",
                 "the array's notice")
        (headers, body), = receiver.got  # one, for the whole array
        notice = json.loads(body)
        assert (notice["array_id"], notice["size"], notice["counts"]) == \
            (arr["array_id"], 4, {"completed": 2, "failed": 2, "cancelled": 0}), notice
        assert headers["X-Gpuqueue-Signature"] == "sha256=" + hmac.new(
            SECRET.encode(), body, hashlib.sha256).hexdigest()
    finally:
        receiver.stop()


def test_a_sweep_of_one_user_takes_turns_with_another_users_single_job(make_server):
    server = make_server(nodes=2)
    server.token("bob")  # made now: the CLI's start would otherwise delay bob's submit
    arr = server.submit("import time\ntime.sleep(0.2)\n", config=job_config(array=40)).json()
    single = server.submit_ok("print('mine')\n", user="bob",
                              config=job_config("bob"))["job_id"]
    started = server.wait(single, user="bob")["started_at"]
    before = [j for j in arr["job_ids"]
              if (st := server.status(j))["started_at"] and st["started_at"] < started]
    # Bob's job waits for a turn, not for Alice's 40: users take turns on each node.
    assert len(before) <= 4, (len(before), started)
    for job_id in arr["job_ids"]:
        server.wait(job_id)
