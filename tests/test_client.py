"""For people: the client commands, live output (/api/logs) and /metrics, against a
real server over real HTTP; the client commands run as real subprocesses."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import requests

from conftest import GPUQUEUE, job_config, wait_for

SLOW = ("import sys, time\nprint('first', flush=True)\nprint('oops', file=sys.stderr, flush=True)\n"
        "time.sleep({})\nprint('second é')\nsys.exit(3)\n")


def client(server, *args, token=None, user="alice", timeout=60):
    """Run a client command with the server and token from the environment, as a user would."""
    env = {**os.environ, "GPUQUEUE_URL": server.url,
           "GPUQUEUE_TOKEN": token if token is not None else server.token(user)}
    return subprocess.run([sys.executable, str(GPUQUEUE), *args], cwd=server.dir, env=env,
                          capture_output=True, text=True, timeout=timeout)


def job_files(tmp_path, code, user="alice", expected_time=30):
    (tmp_path / "job.py").write_text(code)
    (tmp_path / "config.yaml").write_text(job_config(user, expected_time))
    return str(tmp_path / "job.py"), str(tmp_path / "config.yaml")


def metrics(server):
    """{'name{labels}': value} from /metrics."""
    text = server.get("/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_submit_wait_prints_output_and_exits_with_the_jobs_code(make_server, tmp_path):
    server = make_server(nodes=1)
    script, config = job_files(tmp_path, SLOW.format(0.5))
    r = client(server, "submit", script, "-c", config, "--wait")
    assert r.returncode == 3, r.stderr
    assert r.stdout == "first\nsecond é\n"
    assert "oops" in r.stderr and "queued on node 0" in r.stderr and "running: " in r.stderr
    assert "exit code 3" in r.stderr


def test_submit_then_status_results_jobs_as_json(make_server, tmp_path):
    server = make_server(nodes=1)
    script, config = job_files(tmp_path, "print('hello')\n")
    sub = json.loads(client(server, "submit", script, "-c", config, "--json").stdout)
    assert sub["status"] == "pending" and sub["estimated_start"].endswith("Z")
    server.wait(sub["job_id"])
    st = json.loads(client(server, "status", sub["job_id"], "--json").stdout)
    assert st["status"] == "completed" and st["exit_code"] == 0
    res = client(server, "results", sub["job_id"])
    assert res.returncode == 0 and res.stdout == "hello\n"
    listed = json.loads(client(server, "jobs", "--status", "completed", "--json").stdout)
    assert set(listed) == {"jobs", "next_cursor"}  # the API's own shape
    assert [j["job_id"] for j in listed["jobs"]] == [sub["job_id"]]
    table = client(server, "jobs").stdout
    assert sub["job_id"] in table and "completed" in table


def test_client_errors_are_clear_and_nonzero(make_server, tmp_path):
    server = make_server(nodes=1)
    r = client(server, "status", "0" * 24)
    assert r.returncode == 1 and "no such job (HTTP 404)" in r.stderr
    r = client(server, "status", "0" * 24, token="x" * 20)
    assert r.returncode == 1 and "HTTP 401" in r.stderr
    r = client(server, "status", "0" * 24, token="")
    assert r.returncode == 1 and "no token" in r.stderr
    server.kill()
    r = client(server, "jobs")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_cancel_from_the_client(make_server, tmp_path):
    server = make_server(nodes=1)
    script, config = job_files(tmp_path, "import time\ntime.sleep(60)\n")
    sub = json.loads(client(server, "submit", script, "-c", config, "--json").stdout)
    server.wait(sub["job_id"], ("running",))
    r = client(server, "cancel", sub["job_id"])
    assert r.returncode == 0 and "cancel requested" in r.stdout
    assert server.wait(sub["job_id"])["status"] == "cancelled"
    assert client(server, "cancel", sub["job_id"]).returncode == 1


def test_logs_read_live_output_by_offset_then_the_stored_output(server):
    sub = server.submit_ok(SLOW.format(30), expected_time=60)
    token = server.token()
    path = f"/api/logs/{sub['job_id']}"
    server.wait(sub["job_id"], ("running",))
    # The job prints its first line soon after it starts; live output may be seen mid-line.
    part = wait_for(lambda: (p := server.get(path, token).json())["data"].endswith("\n") and p,
                    what="the first line")
    assert part == {"job_id": sub["job_id"], "status": "running", "stream": "stdout", "offset": 0,
                    "next_offset": 6, "data": "first\n", "complete": False}
    assert server.get(path + "?offset=6", token).json()["data"] == ""
    wait_for(lambda: server.get(path + "?stream=stderr", token).json()["data"] == "oops\n",
             what="the line on stderr, written after the first")
    server.post(f"/api/cancel/{sub['job_id']}", token)
    server.wait(sub["job_id"])
    done = server.get(path + "?offset=6", token).json()
    assert done["status"] == "cancelled" and done["complete"] and done["data"] == ""
    assert server.get(path, token).json()["data"] == "first\n"  # now from the spool


def test_logs_follow_streams_until_the_job_ends(server):
    sub = server.submit_ok(SLOW.format(1), expected_time=30)
    r = requests.get(server.url + f"/api/logs/{sub['job_id']}?follow=1",
                     headers={"Authorization": f"Bearer {server.token()}"}, stream=True, timeout=60)
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.iter_lines()]
    assert "".join(line.get("data", "") for line in lines) == "first\nsecond é\n"
    assert lines[-1] == {"end": True, "status": "failed", "exit_code": 3, "error": "exit code 3",
                         "next_offset": len("first\nsecond é\n".encode())}


def test_logs_follow_from_the_client_and_bad_queries(server, tmp_path):
    sub = server.submit_ok(SLOW.format(0.5), expected_time=30)
    r = client(server, "logs", sub["job_id"], "-f")
    # stdout on stdout, stderr on stderr, then the job's end; it exits as the job did.
    assert r.returncode == 3 and r.stdout == "first\nsecond é\n", r.stderr
    assert r.stderr == f"oops\ngpuqueue: job {sub['job_id']} failed: exit code 3\n", r.stderr
    token = server.token()
    for query in ("stream=stdin", "offset=-1", "offset=x", "follow=yes", "what=1",
                  "offset=1&offset=2"):
        resp = server.get(f"/api/logs/{sub['job_id']}?{query}", token)
        assert resp.status_code == 400 and resp.json()["error"], query
    assert server.get(f"/api/logs/{sub['job_id']}", server.token("bob")).status_code == 404


def test_whole_utf8_never_splits_a_character():
    sys.path.insert(0, str(GPUQUEUE.parent))
    import gpuqueue
    text = "aé€😀".encode()
    for cut in range(len(text) + 1):
        kept = gpuqueue._whole_utf8(text[:cut])
        assert text.startswith(kept) and len(text[:cut]) - len(kept) < 4
        kept.decode("utf-8")  # never raises


def test_metrics_count_jobs_nodes_and_dispatch(make_server):
    closed = {"id": 1, "host": "127.0.0.1", "port": 9, "user": "nobody"}  # nothing listens
    server = make_server(nodes=[{"id": 0, "host": "local"}, closed])
    ok = server.submit_ok("print(1)\n")
    bad = server.submit_ok("raise SystemExit(2)\n")
    for sub in (ok, bad):
        server.wait(sub["job_id"])
    m = metrics(server)
    assert m['gpuqueue_jobs_finished_total{node="0",status="completed"}'] == 1
    assert m['gpuqueue_jobs_finished_total{node="0",status="failed"}'] == 1
    assert m['gpuqueue_jobs_started_total{node="0"}'] == 2
    assert m['gpuqueue_jobs{state="pending"}'] == 0 and m['gpuqueue_jobs{state="running"}'] == 0
    assert m['gpuqueue_node_up{node="0"}'] == 1 and m['gpuqueue_node_up{node="1"}'] == 0
    assert m['gpuqueue_dispatch_seconds_count{node="0"}'] == 2
    assert m['gpuqueue_dispatch_seconds_bucket{node="0",le="+Inf"}'] == 2
    assert server.get("/metrics").headers["Content-Type"].startswith("text/plain; version=0.0.4")


FAKE_NVIDIA_SMI = """#!/bin/sh
# Stands in for nvidia-smi: two GPUs, whatever it is asked.
echo "0, GPU-aaaa-0000, NVIDIA A100-SXM4-40GB, 1024, 40960, 37"
echo "1, GPU-bbbb-1111, NVIDIA A100-SXM4-40GB, 0, 40960, [N/A]"
echo "2, GPU-cccc-2222, NVIDIA A100-SXM4-40GB, 512, 40960, 5"
"""


def fake_nvidia_smi(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def test_gpu_figures_on_local_nodes(make_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path)}:{os.environ['PATH']}")
    # Each pass reads the online nodes in config order: 3 just after 2.
    server = make_server(nodes=[{"id": 2, "host": "local", "gpus": "1"}, {"id": 3, "host": "local", "gpus": "7"},
                                {"id": 0, "host": "local"}, {"id": 1, "host": "local", "gpus": "GPU-cccc-2222"}])
    end = time.monotonic() + 30
    while True:
        nodes = server.get("/api/nodes").json()["nodes"]
        if "gpus" in nodes[0] and "gpus" in nodes[1]:
            break
        assert time.monotonic() < end, nodes
        time.sleep(0.1)
    assert nodes[0]["gpus"] == [{"index": 0, "device": "0", "name": "NVIDIA A100-SXM4-40GB",
                                 "memory_used_mib": 1024, "memory_total_mib": 40960,
                                 "utilization_pct": 37, "processes": [], "foreign": None}]
    assert [g["index"] for g in nodes[1]["gpus"]] == [2]  # chosen by UUID
    # A figure the board does not give ([N/A], as under MIG) is null; a node whose GPU
    # is not there has no figures; neither is an error.
    end = time.monotonic() + 30
    while "gpus" not in (node := server.get("/api/nodes").json()["nodes"][2]):
        assert time.monotonic() < end, node
        time.sleep(0.1)
    assert [(g["device"], g["memory_used_mib"], g["utilization_pct"]) for g in node["gpus"]] == [
        ("1", 0, None)]
    assert "1: free, NVIDIA A100-SXM4-40GB 0/40960 MiB ?%" in server.get("/ui").text
    assert "gpus" not in nodes[3]
    assert all(n["error"] is None for n in nodes)


class _CutServer(http.server.BaseHTTPRequestHandler):
    """Serves one job's listing (one file of 1000 bytes, with its sha256) and the file:
    the first time cut after 400 bytes (the connection closed, Content-Length 1000),
    then whole from where a Range asks."""
    DATA = bytes(range(250)) * 4
    cut = [True]

    def do_GET(self):
        if self.path == "/api/outputs/" + "a" * 24:
            body = json.dumps({"state": "complete", "error": None, "skipped": [], "files": [
                {"path": "f.bin", "size": 1000,
                 "sha256": hashlib.sha256(self.DATA).hexdigest()}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(1000 - start))
        self.end_headers()
        if self.cut[0]:
            self.cut[0] = False
            self.wfile.write(self.DATA[start:400])
            self.close_connection = True
            return
        self.wfile.write(self.DATA[start:])

    def log_message(self, *args):
        pass


def test_a_download_cut_short_keeps_what_came_and_resumes(tmp_path):
    """A connection closed before the promised bytes came is an error that says to run
    the command again, and keeps what came: the next run asks for the rest alone, and
    the file takes its name once its sha256 is the server's."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env = {"GPUQUEUE_URL": f"http://127.0.0.1:{httpd.server_address[1]}",
               "GPUQUEUE_TOKEN": "t" * 43, "PATH": "/usr/bin:/bin"}
        argv = ["/usr/bin/python3", str(GPUQUEUE), "outputs", "a" * 24, "-o", str(tmp_path / "o")]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 1 and "cut short" in r.stderr and "Traceback" not in r.stderr, \
            r.stderr
        assert (tmp_path / "o" / "f.bin.part").read_bytes() == _CutServer.DATA[:400]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "o" / "f.bin").read_bytes() == _CutServer.DATA
        assert not (tmp_path / "o" / "f.bin.part").exists()
    finally:
        httpd.shutdown()


def test_the_client_never_follows_a_redirect_with_its_token(tmp_path):
    """A server address that answers with a redirect is said to, and nothing is sent
    on: the token goes to the server the user named alone."""
    seen = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"jobs": [], "next": null}')

        def log_message(self, *args):
            pass
    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirecting(Elsewhere):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_address[1]}"
                                         f"{self.path}")
            self.end_headers()
    here = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for httpd in (here, elsewhere):
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = subprocess.run(["/usr/bin/python3", str(GPUQUEUE), "jobs"], capture_output=True,
                           text=True, timeout=60,
                           env={"GPUQUEUE_URL": f"http://127.0.0.1:{here.server_address[1]}",
                                "GPUQUEUE_TOKEN": "secret-" + "t" * 36, "PATH": "/usr/bin:/bin"})
        assert r.returncode == 1 and "redirect" in r.stderr and "Traceback" not in r.stderr, \
            r.stderr
        assert seen == []
    finally:
        here.shutdown()
        elsewhere.shutdown()
