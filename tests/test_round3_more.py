"""Round 3, the rest: GPU readings that are garbage, binary, huge, slow or failing; a
jump host that stalls; nodes whose errors must say what to fix; retention while a job
is read; a webhook receiver that is slow; a spool disk that fills while jobs wait.
Real processes, a real loopback sshd cluster, real tmpfs mounts."""
import hashlib
import http.server
import io
import json
import os
import signal
import socket
import tarfile
import threading
import time

import pytest
import requests

from conftest import job_config, kill_processes_under, wait_for
from sshcluster import Cluster, open_to_nodes
from test_faults import fill, tmpfs  # noqa: F401  (the tmpfs fixture)

#: Stands in for nvidia-smi.  It runs in the node agent's folder (the node's workdir):
#: a file there, fake-mode, says how it misbehaves, so each node can misbehave alone.
FAKE_NVIDIA_SMI = r'''#!/usr/bin/python3
import os, sys, time
mode = open("fake-mode").read().strip() if os.path.exists("fake-mode") else "ok"
apps = any(a.startswith("--query-compute-apps") for a in sys.argv)
if mode == "slow":
    time.sleep(60)
elif mode == "fail":
    sys.exit(9)
elif mode == "garbage":
    print("this is, not a, reading\nnor, is, this, one, at, all")
elif mode == "binary":
    sys.stdout.buffer.write(b"\x00\xff\xfe\x01" * 5000)
elif mode == "huge":
    sys.stdout.write("0, GPU-0000, Fake A100, 10, 40960, 0\n" * 100000)
elif apps:
    if mode == "foreign":
        print("GPU-0000, 1, 2048")  # pid 1: no job of the queue's
else:
    print("0, GPU-0000, Fake A100, 10, 40960, 0")
'''


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """The stand-in nvidia-smi first on the server's PATH (local agents inherit it)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    os.chmod(bin_dir / "nvidia-smi", 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def node(server, n):
    return next(x for x in server.get("/api/nodes").json()["nodes"] if x["id"] == n)


def mode(workdir, how):
    tmp = workdir / "fake-mode.tmp"
    tmp.write_text(how)
    os.replace(tmp, workdir / "fake-mode")


# -- GPUs ---------------------------------------------------------------------------


def test_one_nodes_slow_nvidia_smi_never_delays_anothers_reading(make_server, tmp_path, fake_smi):
    """Node 0's nvidia-smi hangs; node 1's reading, taken meanwhile, shows its GPU used
    outside the queue at once, and /api/nodes answers from memory throughout."""
    work = {n: tmp_path / f"w{n}" for n in (0, 1)}
    for n, w in work.items():
        w.mkdir()
    mode(work[0], "slow")
    mode(work[1], "foreign")
    server = make_server(nodes=[{"id": n, "host": "local", "workdir": str(w), "gpus": "0"}
                                for n, w in work.items()])
    began = time.monotonic()
    wait_for(lambda: node(server, 1)["gpu_slots"][0]["state"] == "foreign",
             "node 1's GPU to show as used outside the queue", timeout=8)
    assert time.monotonic() - began < 8
    slowest = 0.0
    while not node(server, 0).get("gpu_error"):
        t = time.monotonic()
        server.get("/api/nodes")
        slowest = max(slowest, time.monotonic() - t)
        assert time.monotonic() - began < 45, node(server, 0)
        time.sleep(0.2)
    assert "did not answer" in node(server, 0)["gpu_error"], node(server, 0)
    assert slowest < 1.0, slowest
    assert "Traceback" not in server.log()


def test_a_reading_that_is_no_reading_is_said_and_clears_what_it_marked(make_server, tmp_path,
                                                                        fake_smi):
    """A GPU marked used outside the queue holds a job back; once nvidia-smi gives
    garbage the mark goes (the job starts) and the reason shows; binary, huge and
    failing answers each show their own reason; the reader never dies."""
    work = tmp_path / "w0"
    work.mkdir()
    mode(work, "foreign")
    server = make_server(nodes=[{"id": 0, "host": "local", "workdir": str(work), "gpus": "0"}])
    wait_for(lambda: node(server, 0)["gpu_slots"][0]["state"] == "foreign", "the foreign mark")
    job = server.submit_ok("print('ran')\n")
    time.sleep(1)
    assert server.status(job["job_id"])["status"] == "pending"  # held back by the mark
    for how, said in (("garbage", "lists none of the node's GPUs"), ("binary", "not text"),
                      ("huge", "wrote more than"), ("fail", "exited with 9")):
        mode(work, how)
        wait_for(lambda: said in (node(server, 0).get("gpu_error") or ""),
                 f"the reason for {how}: {node(server, 0)}", timeout=40)
        assert node(server, 0)["gpu_slots"][0]["state"] != "foreign"
        assert not node(server, 0).get("gpus")
        if how == "garbage":
            assert server.wait(job["job_id"])["status"] == "completed"
    mode(work, "ok")
    wait_for(lambda: node(server, 0).get("gpu_error") is None and node(server, 0).get("gpus"),
             "a good reading again", timeout=40)
    assert "Traceback" not in server.log()


# -- SSH ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("r3more-cluster")
    c = Cluster(root, n=3).start()
    yield c
    c.stop()
    kill_processes_under(root)


def test_a_stalled_jump_host_never_slows_nodes_or_status(cluster, make_server, tmp_path):
    """With the jump host stopped (SIGSTOP) while a job runs: /api/nodes and the job's
    status answer within a second each time; reads of its live output answer 503
    within seconds, and eight of them at once leave status answering."""
    open_to_nodes(tmp_path, writable=False)
    server = make_server(**cluster.config(node_timeout=30))
    token = server.token()
    wait_for(lambda: all(n["state"] == "online" for n in server.get("/api/nodes").json()["nodes"]),
             "the SSH nodes", timeout=60)
    job = server.submit_ok("import time\nprint('up', flush=True)\ntime.sleep(60)\n",
                           expected_time=120)
    server.wait(job["job_id"], ("running",))
    cluster.jump.signal_all(signal.SIGSTOP)
    try:
        reads = []

        def read():
            t = time.monotonic()
            try:
                r = requests.get(server.url + f"/api/logs/{job['job_id']}", timeout=30,
                                 headers={"Authorization": f"Bearer {token}"})
                reads.append((r.status_code, time.monotonic() - t))
            except requests.RequestException as exc:
                reads.append((type(exc).__name__, time.monotonic() - t))
        threads = [threading.Thread(target=read) for _ in range(8)]
        for t in threads:
            t.start()
        end = time.monotonic() + 8
        while time.monotonic() < end:
            for path in ("/api/nodes", f"/api/status/{job['job_id']}"):
                t = time.monotonic()
                r = server.get(path, token)
                assert r.status_code == 200 and time.monotonic() - t < 1.0, (path, r.text)
            time.sleep(0.2)
        for t in threads:
            t.join(30)
        assert len(reads) == 8 and all(code in (200, 503) and took < 10 for code, took in reads), \
            reads
    finally:
        cluster.jump.signal_all(signal.SIGCONT)
    server.post(f"/api/cancel/{job['job_id']}", token)


def test_node_errors_say_what_to_fix(cluster, make_server, tmp_path, tmpfs):  # noqa: F811
    """An interpreter that is not there, a workdir the login user may not write, and a
    read-only one: each node is offline with words an admin can act on."""
    open_to_nodes(tmp_path, writable=False)
    read_only = tmpfs("ro", options="ro,mode=777")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o755)  # root's: the nodes' user may not write here
    cfg = cluster.config()
    cfg["nodes"][0]["python"] = "/nonexistent/python3"
    cfg["nodes"][1]["workdir"] = str(locked / "work")
    cfg["nodes"][2]["workdir"] = str(read_only / "work")
    server = make_server(**cfg)

    def error(n):
        return node(server, n)["error"] or ""
    wait_for(lambda: all(error(n) not in ("", "connecting") for n in range(3)),
             "the three nodes' errors", timeout=60)
    assert "/nonexistent/python3 not found" in error(0) and "`python`" in error(0), error(0)
    for n in (1, 2):
        assert "workdir" in error(n) and "`workdir`" in error(n), error(n)
    assert "ermission" in error(1), error(1)
    assert all(node(server, n)["state"] == "offline" for n in range(3))


# -- retention while a job is read --------------------------------------------------


def slow_get(url, token, per_read=0.05, piece=65536):
    """GET ``url`` over a raw socket, reading ``piece`` bytes every ``per_read`` s:
    the whole body."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(piece):
            data += chunk
            time.sleep(per_read)
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if not n:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return head, body


def test_retention_never_cuts_an_answer_being_read(make_server):
    """A job kept a few seconds is removed while its results and the tar of its files
    are read slowly: both answers come whole, and the job goes afterwards."""
    server = make_server(nodes=1, keep_finished_days=8 / 86400)
    token = server.token()
    code = ("import os\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\n"
            "for i in range(4):\n    open(os.path.join(out, f'f{i}'), 'wb').write(os.urandom(500000))\n"
            "print('x' * 2000000)\n")
    job = server.submit_ok(code)
    server.wait(job["job_id"])
    listing = server.get(f"/api/outputs/{job['job_id']}", token).json()
    results, archive = {}, {}

    def reader(into, path):
        into["head"], into["body"] = slow_get(server.url + path, token, per_read=0.1,
                                              piece=16384)
    t1 = threading.Thread(target=reader, args=(results, f"/api/results/{job['job_id']}"))
    t2 = threading.Thread(target=reader, args=(archive,
                                               f"/api/outputs/{job['job_id']}?archive=tar"))
    t1.start()
    t2.start()
    t1.join(120)
    t2.join(120)
    assert b" 200 " in results["head"].split(b"\r\n")[0], results["head"]
    assert json.loads(results["body"])["stdout"] == "x" * 2000000 + "\n"
    with tarfile.open(fileobj=io.BytesIO(archive["body"])) as tf:
        got = {m.name: hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in tf}
    assert got == {f["path"]: f["sha256"] for f in listing["files"]}
    wait_for(lambda: server.get(f"/api/status/{job['job_id']}", token).status_code == 404,
             "retention to remove the job once it is read", timeout=30)


# -- a slow webhook receiver --------------------------------------------------------


class Receiver:
    """A webhook receiver on loopback that waits ``delay`` seconds before it answers."""

    def __init__(self, delay):
        got = self.got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                got.append((time.time(), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_slow_receiver_delays_its_own_notices_alone(make_server, monkeypatch):
    """Notices to a receiver that takes 8 s an answer do not hold back those to another."""
    monkeypatch.setenv("GQ_TEST_HOOK_SECRET", "a-secret")
    slow, fast = Receiver(8), Receiver(0)
    try:
        server = make_server(nodes=2, webhooks={"secret_env": "GQ_TEST_HOOK_SECRET",
                                                "allow": [slow.url, fast.url]})
        for i in range(3):
            server.submit_ok("print(1)\n", config=job_config(notify=slow.url))
        time.sleep(1)
        jobs = [server.submit_ok("print(2)\n", config=job_config(notify=fast.url))["job_id"]
                for _ in range(3)]
        ended = max(time.time() for j in jobs if server.wait(j))
        wait_for(lambda: len(fast.got) == 3, "the fast receiver's notices", timeout=20)
        assert max(t for t, _ in fast.got) - ended < 4, (fast.got, ended)
        assert len(slow.got) < 3  # its own notices still go one by one
    finally:
        slow.stop()
        fast.stop()


# -- a spool disk that fills while jobs wait ----------------------------------------


def test_jobs_accepted_before_the_disk_filled_wait_and_then_complete(make_server, tmpfs,  # noqa: F811
                                                                     tmp_path):
    """Two nodes, jobs queued, then the spool's disk filled to the last byte: no job
    fails for want of room (they wait), and once room comes back every one of them
    completes with its output."""
    disk = tmpfs("disk", size="24m")
    server = make_server(nodes=[{"id": n, "host": "local", "workdir": str(tmp_path / f"w{n}")}
                                for n in (0, 1)],
                         spool=str(disk / "spool"), min_free_bytes=2 * 1024 * 1024)
    gate = tmp_path / "gate"
    first = [server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                              "    time.sleep(0.05)\nprint('first')\n", expected_time=120)
             for _ in range(2)]
    for f in first:
        server.wait(f["job_id"], ("running",))
    queued = [server.submit_ok(f"print('queued {i}')\n")["job_id"] for i in range(6)]
    fill(disk / "junk")
    gate.touch()
    time.sleep(6)  # the running jobs end, and the queued ones meet the full disk
    for job_id in queued:
        st = server.status(job_id)
        assert st["status"] in ("pending", "running"), st
    (disk / "junk").unlink()
    for f in first:
        assert server.wait(f["job_id"], timeout=60)["status"] == "completed"
    for i, job_id in enumerate(queued):
        st = server.wait(job_id, timeout=60)
        assert st["status"] == "completed", st
        assert server.results(job_id)["stdout"] == f"queued {i}\n"
    assert "internal error" not in server.log()


# -- clients that ask for much and read nothing ---------------------------------------


def test_clients_that_never_read_large_answers_hold_no_thread(make_server):
    """Eight clients each ask for a job's 30 MB of results, eight for a 20 MB file of
    it and eight for the tar of its files, and read none of it: status and the nodes
    still answer at once, the tars beyond the few sent at once get 503, and a client
    that does read gets the whole answer."""
    server = make_server(nodes=1, output_limit_bytes=16 * 1024 * 1024)
    token = server.token()
    job = server.submit_ok(
        "import os, sys\nsys.stdout.write('o' * 15000000)\nsys.stderr.write('e' * 15000000)\n"
        "open(os.path.join(os.environ['GPUQUEUE_OUTPUT_DIR'], 'big'), 'wb')"
        ".write(os.urandom(20000000))\n", expected_time=120)
    job_id = job["job_id"]
    server.wait(job_id, timeout=120)
    host, port = server.url.split("//")[1].split(":")
    stuck = []
    for path in ([f"/api/results/{job_id}"] * 8 + [f"/api/outputs/{job_id}/big"] * 8
                 + [f"/api/outputs/{job_id}?archive=tar"] * 8):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
                  .encode())
        stuck.append(s)
    try:
        time.sleep(2)
        for _ in range(10):
            for path in (f"/api/status/{job_id}", "/api/nodes"):
                t = time.monotonic()
                r = server.get(path, token)
                assert r.status_code == 200 and time.monotonic() - t < 2, (path, r.status_code)
        r = server.get(f"/api/results/{job_id}", token)
        assert r.status_code == 200 and len(r.json()["stdout"]) == 15000000
        tars = [s for s in stuck[16:]]
        refused = 0
        for s in tars:
            s.settimeout(0.5)
            try:
                head = s.recv(200)
            except OSError:
                continue
            refused += head.startswith(b"HTTP/1.1 503")
        assert refused >= 8 - 2, refused  # at most ARCHIVES are sent at once
    finally:
        for s in stuck:
            s.close()
