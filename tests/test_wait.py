"""A submit that waits for its job (POST /api/submit?wait=1), as the original server's
later release answers: one request, the results back.  A real server over real HTTP;
every wait is for a condition, with generous bounds."""
import concurrent.futures
import json
import os
import socket
import time

import requests

from conftest import job_config, wait_for


def wait_submit(server, code, config=None, token=None, stream=False, query="wait=1",
                expected_time=30):
    """POST /api/submit?wait=1 (``token``: sent as Bearer; None: config.yaml's alone)."""
    config = config if config is not None else job_config(expected_time=expected_time)
    return requests.post(f"{server.url}/api/submit?{query}",
                         headers={"Authorization": f"Bearer {token}"} if token else {},
                         files={"code": ("job.py", code), "config_file": ("config.yaml", config)},
                         timeout=120, stream=stream)


def raw_wait_submit(server, code, config):
    """The same over a bare socket, so that a test can hang up: (socket, the headers)."""
    boundary = "b0undary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
        f'filename="{name}"\r\n\r\n'.encode() + data.encode() + b"\r\n"
        for name, data in (("code", code), ("config_file", config))) + f"--{boundary}--\r\n".encode()
    host, port = server.url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(f"POST /api/submit?wait=1 HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
              f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
              "\r\n".encode() + body)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    return s, got.split(b"\r\n\r\n")[0].decode()


def test_a_waiting_submit_of_a_3_second_job_answers_with_its_output(make_server):
    server = make_server(nodes=2)
    code = ("import sys, time\nprint('started', flush=True)\ntime.sleep(3)\n"
            "print('to stderr', file=sys.stderr)\nprint('done')\n")
    # The original server's flow: the token in config.yaml, no header.
    config = job_config(expected_time=10, token=server.token())
    began = time.monotonic()
    r = wait_submit(server, code, config, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    job_id = r.headers["X-Gpuqueue-Job-Id"]
    body = r.raw.read()
    assert time.monotonic() - began >= 3  # it waited for the job
    assert body[:1].isspace()  # keep-alive whitespace came before the JSON
    answer = json.loads(body)
    assert answer["job_id"] == job_id and answer["status"] == "completed"
    assert answer["stdout"] == "started\ndone\n" and answer["stderr"] == "to stderr\n"
    assert answer["exit_code"] == 0 and answer["error"] is None
    assert answer["node_id"] in (0, 1)
    for key in ("submitted_at", "started_at", "finished_at"):
        assert answer[key].endswith("Z"), answer
    # The same as GET /api/results, plus the node and the times.
    assert server.results(job_id).items() <= answer.items()

    # With a Bearer token, and a job that fails: 200 all the same, its status says.
    r = wait_submit(server, "import sys\nprint('x')\nsys.exit(3)\n", token=server.token(),
                    expected_time=5)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["status"], answer["exit_code"], answer["stdout"]) == ("failed", 3, "x\n")


def test_without_wait_a_submit_is_unchanged_and_a_bad_wait_changes_nothing(make_server):
    server = make_server(nodes=1)
    token = server.token()
    for query in ("", "wait=0", "wait=false"):
        r = wait_submit(server, "print(1)\n", token=token, query=query)
        assert r.status_code == 201 and r.json()["status"] == "pending", (query, r.text)
    before = server.spool_files()
    for query in ("wait=yes", "wait=1&wait=1", "wait=1&other=2"):
        r = wait_submit(server, "print(1)\n", token=token, query=query)
        assert r.status_code == 400 and "wait" in r.json()["error"], (query, r.text)
    assert server.spool_files() == before
    # An array is not waited for: 202 with the array, and where to follow it.
    r = wait_submit(server, "print(1)\n", job_config(expected_time=5, array="0-2"), token=token)
    assert r.status_code == 202, r.text
    assert len(r.json()["job_ids"]) == 3 and "/api/arrays/" in r.json()["message"]


def test_the_root_lists_service_and_endpoints(server):
    root = requests.get(server.url + "/", timeout=30).json()
    assert root["service"] == "gpuqueue"
    assert {"method": "POST", "path": "/api/submit"} in root["endpoints"]
    assert {"method": "GET", "path": "/api/results/{job_id}"} in root["endpoints"]


def test_fifty_waiting_submits_leave_status_and_nodes_answering(make_server):
    """More waiters than waitress has threads (8): none of them holds one."""
    server = make_server(nodes=2)
    token = server.token()
    code = "import time\ntime.sleep(300)\n"
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        waiting = list(pool.map(lambda _: wait_submit(server, code, token=token, stream=True,
                                                      expected_time=60), range(50)))
    try:
        assert [r.status_code for r in waiting] == [200] * 50
        ids = [r.headers["X-Gpuqueue-Job-Id"] for r in waiting]
        for _ in range(5):
            for path in ("/api/nodes", f"/api/status/{ids[-1]}", "/"):
                began = time.monotonic()
                r = server.get(path, token)
                assert r.status_code == 200, r.text
                assert time.monotonic() - began < 1.0, path
        # Each waiter gets its own job's end: cancelled, pending or running alike.
        for job_id in ids:
            assert server.post(f"/api/cancel/{job_id}", token).status_code == 200
        for job_id, r in zip(ids, waiting):
            answer = json.loads(r.raw.read())
            assert answer["job_id"] == job_id and answer["status"] == "cancelled", answer
    finally:
        for r in waiting:
            r.close()


def test_a_waiting_client_that_hangs_up_leaves_its_job_to_complete(make_server, tmp_path):
    server = make_server(nodes=1)
    gate = tmp_path / "gate"
    code = (f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n"
            "print('finished anyway')\n")
    sock, headers = raw_wait_submit(server, code, job_config(expected_time=30,
                                                             token=server.token()))
    assert headers.startswith("HTTP/1.1 200"), headers
    job_id = next(line.split(": ")[1] for line in headers.split("\r\n")
                  if line.lower().startswith("x-gpuqueue-job-id"))
    server.wait(job_id, ("running",))
    sock.close()  # the client hangs up
    wait_for(lambda: "waiting submit(s) hung up" in server.log(), "the server to see it")
    assert server.status(job_id)["status"] == "running"
    gate.write_text("")
    assert server.wait(job_id)["status"] == "completed"
    assert server.results(job_id)["stdout"] == "finished anyway\n"
    # The server is none the worse: the next waiting submit is answered.
    r = wait_submit(server, "print('next')\n", token=server.token(), expected_time=5)
    assert r.status_code == 200 and r.json()["stdout"] == "next\n", r.text
    assert "Traceback" not in server.log()


def test_202_when_the_job_may_end_after_max_wait_seconds(make_server, tmp_path):
    server = make_server(nodes=1, max_wait_seconds=3)
    token = server.token()
    # Its time limit (2 x 30 s) is past max_wait_seconds: 202 at once, and it runs.
    began = time.monotonic()
    r = wait_submit(server, "print('long')\n", token=token, expected_time=30)
    assert time.monotonic() - began < 30
    assert r.status_code == 202, r.text
    answer = r.json()
    assert "max_wait_seconds" in answer["message"] and f"/api/results/{answer['job_id']}" \
        in answer["message"]
    assert server.wait(answer["job_id"])["status"] == "completed"

    # A job that may end in time but does not (it waits for another): past
    # max_wait_seconds the waiting answer (200 already) ends with its status.
    gate = tmp_path / "gate"
    first = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                             "    time.sleep(0.05)\n", expected_time=20)
    r = wait_submit(server, "print('after')\n", job_config(expected_time=1,
                                                           after=[first["job_id"]]),
                    token=token)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "pending" and "stdout" not in answer, answer
    assert "max_wait_seconds" in answer["message"], answer
    gate.write_text("")
    assert server.wait(answer["job_id"])["status"] == "completed"


def test_an_idle_server_with_none_waiting_leaves_the_cpu_alone(make_server):
    """The Waiters thread sleeps until a beat or a job's news: an idle server uses next to
    no CPU (a generous bound: a spinning thread takes most of a core)."""
    server = make_server(nodes=2)
    r = wait_submit(server, "print('one')\n", token=server.token(), expected_time=5)
    assert r.status_code == 200 and r.json()["stdout"] == "one\n"  # one came and went

    def cpu():
        with open(f"/proc/{server.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    before, began = cpu(), time.monotonic()
    time.sleep(3)  # the measured span itself, not a wait for anything
    assert (cpu() - before) / (time.monotonic() - began) < 0.25
