"""Round 3: what a job (or a careless admin, or a racing client) does must not stall,
jam or break the server.  Real servers, real run_as users, real sshd on loopback."""
import json
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import FINAL, GPUQUEUE, Server, job_config, kill_processes_under, wait_for
from sshcluster import Cluster, open_to_nodes
from test_run_as import JOB_USER, job_user  # noqa: F401  (the run_as user fixture)

SMALL_LIMIT = 65536
RUN_AS_NODE = {"id": 0, "host": "local", "run_as": JOB_USER, "python": "/usr/bin/python3"}


# -- helpers ------------------------------------------------------------------------


class Poller:
    """Polls GET paths from a thread; each must answer 200 within 2 s (no stall)."""

    def __init__(self, server, token, paths):
        self.server, self.token, self.paths = server, token, list(paths)
        self.problems, self.count = [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for path in list(self.paths):
                began = time.monotonic()
                try:
                    r = requests.get(self.server.url + path, timeout=2,
                                     headers={"Authorization": f"Bearer {self.token}"})
                    took = time.monotonic() - began
                    if r.status_code != 200 or took > 2:
                        self.problems.append(f"{path}: {r.status_code} in {took:.1f} s")
                except requests.RequestException as exc:
                    self.problems.append(f"{path}: {type(exc).__name__}")
                self.count += 1
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def get(server, path, token, timeout=10, **headers):
    return requests.get(server.url + path, timeout=timeout,
                        headers={"Authorization": f"Bearer {token}", **headers})


def wait_final(server, job_id, token, timeout=60):
    """The job's status once final (files back); None if it is not final in time."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            r = get(server, f"/api/status/{job_id}", token, timeout=5)
        except requests.RequestException:
            r = None
        if r is not None and r.status_code == 200:
            st = r.json()
            if st["status"] in FINAL and st.get("outputs") != "collecting":
                return st
        time.sleep(0.1)
    return None


def no_traceback(server):
    log = server.log()
    assert "Traceback" not in log, log[-4000:]


def stream_ok(res, name):
    return len(res[name].encode()) <= SMALL_LIMIT + 1024


def ordinary_job_runs(server, token):
    """A plain job afterwards completes with its own stdout: the node still works."""
    word = secrets.token_hex(4)
    sub = server.submit_ok(f"print('next {word}')\n", token=token)
    st = wait_final(server, sub["job_id"], token)
    assert st is not None, f"the next job never ended\n{server.log()[-3000:]}"
    assert st["status"] == "completed", ("the next job", st["status"], st.get("error"))
    assert server.results(sub["job_id"])["stdout"] == f"next {word}\n"


def attack_code(name, how, target, sleep, mark):
    """A job that swaps one of its folder's files (``name``) for something hostile,
    touches ``mark``, maybe sleeps, and exits 0."""
    return f"""import os, sys, time
name, how, target = {name!r}, {how!r}, {target!r}
end = time.time() + 30
if name == "pids":  # the wrapper writes it once the job runs: wait for it
    while not os.path.exists(name) and time.time() < end:
        time.sleep(0.02)
if os.path.lexists(name):
    os.remove(name)
if how == "fifo":
    os.mkfifo(name)
elif how == "link":
    os.symlink(target, name)
elif how == "sparse":
    open(name, "wb").close()
    os.truncate(name, 2 * 1024 ** 3)
elif how == "hardlink":
    try:
        os.link(target, name)
    except OSError as exc:
        print("link refused:", type(exc).__name__)
open({mark!r}, "w").write("swapped")
print("swapped", flush=True)
time.sleep({sleep})
print("attacker done")
"""


def run_attack(server, token, marks, file, how, target=None, sleep=0.0):
    """Run one attack with the status and nodes endpoints polled throughout, then an
    ordinary job; assert what holds for every attack and return (status, results)."""
    mark = str(marks / f"{file}-{how}-{secrets.token_hex(3)}")
    sub = server.submit_ok(attack_code(file, how, target, sleep, mark), token=token)
    job_id = sub["job_id"]
    logs = None
    with Poller(server, token, [f"/api/status/{job_id}", "/api/nodes"]) as poller:
        if file == "stdout" and how == "fifo" and sleep:
            wait_for(lambda: os.path.exists(mark), "the job to plant its FIFO", timeout=60)
            began = time.monotonic()
            try:
                r = requests.get(server.url + f"/api/logs/{job_id}?stream=stdout", timeout=2,
                                 headers={"Authorization": f"Bearer {token}"})
                logs = (r.status_code, r.headers.get("Content-Type", ""),
                        time.monotonic() - began, r.text[:300])
            except requests.RequestException as exc:
                logs = ("no answer", type(exc).__name__, time.monotonic() - began, "")
        st = wait_final(server, job_id, token)
        assert st is not None, f"the attacked job never ended\n{server.log()[-3000:]}"
        r = server.get(f"/api/results/{job_id}", token)
        assert r.status_code == 200, r.text
        res = r.json()
        ordinary_job_runs(server, token)
    assert poller.count > 0 and not poller.problems, poller.problems[:10]
    if logs is not None:
        code, ctype, took, text = logs
        assert isinstance(code, int) and took <= 2, logs
        assert code == 200 or (400 <= code < 500 or code == 503) and "json" in ctype, logs
    streams = res["stdout"] + res["stderr"]
    assert "sha256" not in streams and "root:" not in streams, streams[:500]
    assert stream_ok(res, "stdout") and stream_ok(res, "stderr"), \
        (len(res["stdout"]), len(res["stderr"]))
    if file in ("stdout", "stderr") and how in ("fifo", "link"):
        assert "not a regular file" in res[file], res
    if file == "result.json":  # the wrapper's own record replaces what the job put there
        assert st["status"] == "completed" or st["status"] == "failed" and st.get("error"), st
    no_traceback(server)
    return st, res


# -- A. what a job leaves in its folder, local run_as node ---------------------------


@pytest.fixture
def run_as_server(make_server, tmp_path, job_user):
    open_to_nodes(tmp_path, writable=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    os.chmod(marks, 0o777)
    server = make_server(nodes=[dict(RUN_AS_NODE)], output_limit_bytes=SMALL_LIMIT)
    return server, server.token("alice"), marks


@pytest.mark.parametrize("file, how, target, sleep", [
    ("stdout", "fifo", None, 0),
    ("stdout", "fifo", None, 3),
    ("stderr", "fifo", None, 0),
    ("stdout", "link", "TOKENS", 0),
    ("stderr", "link", "/etc/shadow", 3),
    ("stdout", "sparse", None, 0),
    ("stderr", "sparse", None, 3),
    ("stdout", "hardlink", "TOKENS", 0),
    ("result.json", "fifo", None, 0),
    ("result.json", "link", "TOKENS", 0),
    ("pids", "fifo", None, 3),
], ids=lambda v: str(v))
def test_a_run_as_job_that_swaps_a_file_of_its_folder_breaks_nothing(run_as_server, file, how,
                                                                     target, sleep):
    """FIFOs, links, sparse and hard-linked files planted by the job: no stall, no
    leak, a clear word in the stream, and the node goes on."""
    server, token, marks = run_as_server
    if target == "TOKENS":
        target = str(server.dir / "tokens.yaml")
    run_attack(server, token, marks, file, how, target, sleep)


# -- A. the same on an SSH node ---------------------------------------------------------


@pytest.fixture(scope="module")
def one_node_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("r3cluster")
    c = Cluster(root, n=1).start()
    yield c
    c.stop()
    kill_processes_under(root)


@pytest.mark.parametrize("file, how, sleep", [
    ("stdout", "fifo", 3),
    ("stderr", "fifo", 0),
    ("result.json", "fifo", 0),
    ("pids", "fifo", 3),
], ids=lambda v: str(v))
def test_an_ssh_job_that_plants_a_fifo_in_its_folder_breaks_nothing(one_node_cluster, make_server,
                                                                    tmp_path, file, how, sleep):
    """On an SSH node the agent reads the job's files: a FIFO must not hang it."""
    open_to_nodes(tmp_path, writable=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    os.chmod(marks, 0o777)
    server = make_server(**one_node_cluster.config(output_limit_bytes=SMALL_LIMIT))
    wait_for(lambda: server.get("/api/nodes").json()["nodes"][0]["state"] == "online",
             "the SSH node to come online", timeout=60)
    run_attack(server, server.token("alice"), marks, file, how, None, sleep)


# -- B. no lock a job can take ------------------------------------------------------------

LOCK_PROBE = r"""
import fcntl, json, os, time
report, held = {}, []
for name, path in (("tokens lock", TOKENS_LOCK), ("server lock", SERVER_LOCK)):
    try:
        held.append(open(path))
        report[name] = "allowed"
    except OSError as exc:
        report[name] = type(exc).__name__
print(json.dumps(report), flush=True)
got = set()
while not os.path.exists(GO):  # hold whatever lock it can get, as long as it can
    for f in held:
        if f.name not in got:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got.add(f.name)
            except OSError:
                pass
    time.sleep(0.05)
print("done")
"""


def test_a_run_as_job_can_take_no_lock_of_the_server(make_server, tmp_path, job_user):
    """Even with the server's folder and spool opened to all, a job can neither open
    the lock files nor so block token changes or a restart."""
    open_to_nodes(tmp_path, writable=False)
    server = make_server(nodes=[dict(RUN_AS_NODE)])
    token = server.token("alice")
    os.chmod(server.dir, 0o755)  # a careless admin
    os.chmod(server.dir / "spool", 0o755)
    go = tmp_path / "go"
    code = (f"TOKENS_LOCK = {str(server.dir / 'tokens.yaml.lock')!r}\n"
            f"SERVER_LOCK = {str(server.dir / 'spool' / 'server.lock')!r}\n"
            f"GO = {str(go)!r}\n" + LOCK_PROBE)
    job_id = server.submit_ok(code, config=job_config(expected_time=120), token=token)["job_id"]

    def report():
        r = server.get(f"/api/logs/{job_id}?stream=stdout", token)
        return r.status_code == 200 and r.json().get("data", "").strip() and r.json()["data"]
    out = wait_for(report, "the job's report", timeout=60)
    problems = []
    found = json.loads(out.splitlines()[0])
    if found != {"tokens lock": "PermissionError", "server lock": "PermissionError"}:
        problems.append(f"the job could open: {found}")

    began = time.monotonic()
    try:
        r = subprocess.run([sys.executable, str(GPUQUEUE), "--config", str(server.config_path),
                            "tokens", "create", "bob"], cwd=server.dir, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            problems.append(f"tokens create bob failed: {r.stderr}")
    except subprocess.TimeoutExpired:
        problems.append("tokens create bob did not finish within 30 s")
    took = time.monotonic() - began

    server.kill()
    started = {}

    def start():
        try:
            server.start()
            started["ok"] = True
        except BaseException as exc:  # noqa: BLE001 - reported below
            started["error"] = exc
    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(60)
    if not started.get("ok"):
        problems.append(f"no restart after kill -9 while the job ran: {started.get('error')}")
        server.kill()
    go.touch()
    assert not problems, (problems, took)
    st = wait_final(server, job_id, token)
    assert st is not None and st["status"] == "completed", st
    assert server.results(job_id)["stdout"].endswith("done\n")


# -- C. admin control cannot be jammed ----------------------------------------------------


def test_junk_in_control_is_quarantined_and_admin_commands_still_work(make_server, job_user):
    """Huge, deep, FIFO, linked and foreign requests each end in corrupt/ with a
    reason, and drain/resume and jobs go on meanwhile."""
    server = make_server(nodes=1)
    token = server.token("alice")
    control, corrupt = server.dir / "spool" / "control", server.dir / "spool" / "corrupt"
    staging = server.dir / "staging"
    staging.mkdir()
    names = {kind: f"{secrets.token_hex(12)}.request.json"
             for kind in ("huge", "deep", "fifo", "link", "foreign")}

    def plant(kind, data):
        tmp = staging / names[kind]
        tmp.write_bytes(data)
        if kind == "foreign":
            os.chown(tmp, job_user.pw_uid, job_user.pw_gid)
        os.rename(tmp, control / names[kind])
    plant("huge", b'{"op": "nodes", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}')
    plant("deep", b"[" * 100000 + b"]" * 100000)
    os.mkfifo(control / names["fifo"])
    os.symlink("/etc/passwd", control / names["link"])
    plant("foreign", b'{"op": "drain", "node": 0}')
    planted = time.monotonic()

    problems = []
    for verb in ("drain", "resume"):
        try:
            r = server.cli("nodes", verb, "0", check=False)
            if r.returncode != 0:
                problems.append(f"nodes {verb} 0: {r.stderr.strip()}")
        except subprocess.TimeoutExpired:
            problems.append(f"nodes {verb} 0 hung")
    sub = server.submit_ok("print('served')\n", token=token)
    st = wait_final(server, sub["job_id"], token, timeout=30)
    if st is None or st["status"] != "completed":
        problems.append(f"a job after the junk: {st}")

    def gone():
        return not any(os.path.lexists(control / n) for n in names.values())
    while not gone() and time.monotonic() - planted < 15:
        time.sleep(0.1)
    left = [k for k, n in names.items() if os.path.lexists(control / n)]
    if left:
        problems.append(f"still in control/ after 15 s: {left}")
    entries = os.listdir(corrupt)
    for kind, name in names.items():
        found = [e for e in entries if e.startswith(name) and not e.endswith(".REASON")]
        reasons = [e for e in found if (corrupt / f"{e}.REASON").is_file()
                   and (corrupt / f"{e}.REASON").read_text().strip()]
        if not reasons:
            problems.append(f"{kind}: nothing in corrupt/ with a reason ({found})")
    assert not problems, (problems, sorted(entries))


# -- D, F, G: one shared server -----------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server with 3 local nodes and a 1 MiB output cap, for the tests below."""
    root = tmp_path_factory.mktemp("r3shared")
    server = Server(root / "s", nodes=3, output_limit_bytes=1048576).start()
    yield server
    server.kill()
    kill_processes_under(root)


@pytest.mark.parametrize("byte", [b"\xff", b"\x01"], ids=["invalid-utf8", "control-chars"])
def test_the_output_cap_counts_the_bytes_sent(shared, byte):
    """30 MB of bytes that grow when decoded or JSON-escaped: the answer stays within
    twice the cap, and says the output was cut."""
    token = shared.token("dora")
    code = f"import sys\nfor _ in range(30):\n    sys.stdout.buffer.write({byte * 1000000!r})\n"
    sub = shared.submit_ok(code, token=token, config=job_config("dora", 60))
    st = wait_final(shared, sub["job_id"], token, timeout=120)
    assert st is not None and st["status"] == "completed", st
    r = shared.get(f"/api/results/{sub['job_id']}", token)
    assert r.status_code == 200
    assert len(r.content) <= 2 * 1048576 + 65536, len(r.content)
    assert "truncated" in r.json()["stdout"]


OK_BYTES = b"0123456789abcdef"


def test_odd_files_left_in_outputs_are_skipped_and_ranges_never_fail(shared):
    """A FIFO and links left in the outputs folder stall nothing and leak nothing;
    odd Range headers get 200, 206 or 416, never 500."""
    token = shared.token("erin")
    tokens = shared.dir / "tokens.yaml"
    code = ("import os\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\n"
            "os.mkfifo(os.path.join(out, 'pipe'))\n"
            f"os.symlink({str(tokens)!r}, os.path.join(out, 'tokens'))\n"
            f"os.symlink({str(shared.dir)!r}, os.path.join(out, 'folder'))\n"
            f"open(os.path.join(out, 'ok.txt'), 'wb').write({OK_BYTES!r})\n")
    sub = shared.submit_ok(code, token=token, config=job_config("erin"))
    job_id = sub["job_id"]
    with Poller(shared, token, [f"/api/status/{job_id}"]) as poller:
        st = wait_final(shared, job_id, token)
        assert st is not None, shared.log()[-3000:]
        r = get(shared, f"/api/outputs/{job_id}", token)
    assert poller.count > 0 and not poller.problems, poller.problems[:10]
    assert r.status_code == 200, r.text
    paths = [f["path"] for f in r.json()["files"]]
    assert "ok.txt" in paths, r.json()
    assert not [p for p in paths if p.split("/")[0] in ("pipe", "tokens", "folder")], paths
    secret = tokens.read_text()
    assert secret[:40] not in r.text
    f = shared.get(f"/api/outputs/{job_id}/ok.txt", token)
    assert f.status_code == 200 and f.content == OK_BYTES
    for spec in ("bytes=5-2", "bytes=-0", "bytes=99999999-", "bytes=0-1,3-4", "items=0-1",
                 "bytes=abc"):
        r = requests.get(shared.url + f"/api/outputs/{job_id}/ok.txt", timeout=10,
                         headers={"Authorization": f"Bearer {token}", "Range": spec})
        assert r.status_code in (200, 206, 416), (spec, r.status_code, r.text[:300])
        if r.status_code == 200:
            assert r.content == OK_BYTES, spec
        elif r.status_code == 416 and r.content:
            assert "error" in r.json(), (spec, r.text)
        elif r.status_code == 206 and "multipart" not in r.headers.get("Content-Type", ""):
            first, last = map(int, r.headers["Content-Range"].split()[1].split("/")[0].split("-"))
            assert r.content == OK_BYTES[first:last + 1], (spec, r.headers, r.content)
    no_traceback(shared)


def _race(server, token, bodies):
    """POST every body at once with Idempotency-Key k1; the answers."""
    barrier = threading.Barrier(len(bodies))
    answers = [None] * len(bodies)

    def post(i):
        barrier.wait()
        answers[i] = requests.post(server.url + "/api/submit", files=bodies[i], timeout=60,
                                   headers={"Authorization": f"Bearer {token}",
                                            "Idempotency-Key": "k1"})
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return answers


def _listed(server, token):
    return [j["job_id"] for j in server.get("/api/jobs", token).json()["jobs"]]


def test_one_idempotency_key_raced_makes_one_job(shared):
    """Eight clients racing one key and one body get one job between them; with eight
    bodies, one wins and the rest are told the key was used for another."""
    token = shared.token("gina")
    body = {"code": ("j.py", "print('once')\n"), "config_file": ("c.yaml", job_config("gina"))}
    answers = _race(shared, token, [body] * 8)
    assert all(a is not None and a.status_code in (200, 201) for a in answers), \
        [(a.status_code, a.text[:200]) if a is not None else None for a in answers]
    ids = {a.json()["job_id"] for a in answers}
    assert len(ids) == 1, ids
    assert _listed(shared, token) == list(ids)

    token = shared.token("hank")
    bodies = [{"code": ("j.py", f"print({i})\n"), "config_file": ("c.yaml", job_config("hank"))}
              for i in range(8)]
    answers = _race(shared, token, bodies)
    codes = sorted(a.status_code for a in answers)
    won = [a for a in answers if a.status_code in (200, 201)]
    assert len(won) == 1 and codes.count(422) == 7, [(a.status_code, a.text[:200]) for a in answers]
    assert _listed(shared, token) == [won[0].json()["job_id"]]


# -- E. a job that deletes its node's workdir -------------------------------------------


def test_a_job_that_removes_its_nodes_workdir_fails_alone(make_server):
    """The parent of its own folder is the node's workdir: the next job still runs."""
    server = make_server(nodes=[{"id": 0, "host": "local"}])
    token = server.token("alice")
    bad = server.submit_ok("import os, shutil\n"
                           "shutil.rmtree(os.path.dirname(os.getcwd()), ignore_errors=True)\n"
                           "print('wrecked')\n", token=token)
    st = wait_final(server, bad["job_id"], token)
    assert st is not None and st["status"] in ("failed", "completed"), \
        (st, server.log()[-3000:])
    ordinary_job_runs(server, token)


# -- H. an array across kill -9 ---------------------------------------------------------


def test_an_array_submitted_just_before_a_kill_9_runs_whole_once(make_server, tmp_path):
    """Kill -9 right after an array of 50 is accepted: after the restart it lists 50
    jobs, each once, and each runs to completion once."""
    server = make_server(nodes=8)
    token = server.token("alice")
    runs = tmp_path / "runs"
    runs.mkdir()
    code = ("import os\ni = os.environ['GPUQUEUE_ARRAY_INDEX']\n"
            f"open(os.path.join({str(runs)!r}, i), 'a').write('x')\nprint(i)\n")
    r = server.submit(code, config=job_config(array=50), token=token)
    assert r.status_code == 201, r.text
    server.kill()
    server.start()
    arr = r.json()
    assert len(set(arr["job_ids"])) == 50
    info = server.get(f"/api/arrays/{arr['array_id']}", token)
    assert info.status_code == 200, info.text
    listed = info.json()["job_ids"]
    assert len(listed) == 50 and set(listed) == set(arr["job_ids"]), listed
    jobs = server.get(f"/api/jobs?array={arr['array_id']}&limit=100", token).json()["jobs"]
    assert sorted(j["job_id"] for j in jobs) == sorted(arr["job_ids"])
    for job_id in arr["job_ids"]:
        st = wait_final(server, job_id, token, timeout=120)
        assert st is not None and st["status"] == "completed", st
        assert server.results(job_id)["stdout"] == f"{st['array_index']}\n"
    assert sorted(os.listdir(runs), key=int) == [str(i) for i in range(50)]
    assert all((runs / str(i)).read_text() == "x" for i in range(50))
