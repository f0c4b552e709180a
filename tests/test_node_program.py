"""The node program as code: its pieces called directly, the shipped script driven
over a real pipe, and wrappers of other protocols met while re-attaching."""
import ast
import base64
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, alive, wait_for

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gpuqueue  # noqa: E402
from test_spool import dead_pid, mark_launching, prepared_server  # noqa: E402


# -- the pieces ------------------------------------------------------------------


def test_gpus_from_reading_tells_gpuqueues_own_from_what_is_outside_the_queue():
    reading = {"csv": "0, GPU-a, A100, 9000, 40960, 50\n1, GPU-b, A100, 3000, 40960, 1\n"
                      "2, GPU-c, A100, 9000, 40960, 0\n3, GPU-d, A100, [N/A], 40960, 0\n"
                      "4, GPU-e, A100, 0, 40960, 0\n",
               "apps": [{"gpu": "GPU-a", "pid": 10, "memory_mib": 8500, "user": "gq", "job": "j1"},
                        {"gpu": "GPU-b", "pid": 11, "memory_mib": 200, "user": "bob", "job": None},
                        "junk"]}
    # Node GPUs by index and by UUID, in the node's order; GPU 4 is not the node's.
    found = gpuqueue.gpus_from_reading(reading, ("GPU-c", "0", "1", "3"), 1024, held=set())
    assert [g["device"] for g in found] == ["GPU-c", "0", "1", "3"]
    c, a, b, d = found
    # A figure the board does not give is None; the GPU is still there, still watched.
    assert (d["memory_used_mib"], d["memory_total_mib"], d["foreign"]) == (None, 40960, None)
    assert a["foreign"] is None  # 9000 MiB, 8500 of them its own job's: 500 beyond
    assert a["processes"] == [{"pid": 10, "memory_mib": 8500, "user": "gq", "job": "j1"}]
    assert b["foreign"] == "used outside the queue by pid 11 of bob (200 MiB)"
    assert c["foreign"] == "9000 MiB in use outside the queue"  # nothing in sight uses it
    # ...unless a job of the queue holds that GPU: its figures may be a moment old.
    assert gpuqueue.gpus_from_reading(reading, ("GPU-c",), 1024, held={"GPU-c"})[0]["foreign"] is None
    assert gpuqueue.gpus_from_reading(None, ("0",), 1024, set()) == []


def test_exit_code_of_matches_the_kernels_wait_status():
    for code, expected in (("import sys; sys.exit(3)", 3), ("pass", 0),
                           ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9)):
        pid = subprocess.Popen([sys.executable, "-c", code]).pid
        _, status = os.waitpid(pid, 0)
        assert gpuqueue.exit_code_of(status) == expected == os.waitstatus_to_exitcode(status)


def test_describe_exit_is_the_one_wording_of_an_exit_code():
    assert gpuqueue.describe_exit(0) == ("completed", None)
    assert gpuqueue.describe_exit(2) == ("failed", "exit code 2")
    assert gpuqueue.describe_exit(-15) == ("failed", "killed by signal 15")


def test_kill_group_reaches_a_grandchild_that_ignores_sigterm(tmp_path):
    pids_file = tmp_path / "pids"
    job = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import signal, time\\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(300)'])\n"
        f"open({str(pids_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(300)\n")], start_new_session=True)
    grandchild = int(wait_for(lambda: pids_file.exists() and pids_file.read_text(),
                              what="the grandchild's pid"))
    assert gpuqueue.group_members(job.pid)
    began = time.monotonic()
    gpuqueue.kill_group(job.pid, grace=0.5)
    job.wait(10)
    assert not alive(grandchild) and gpuqueue.group_members(job.pid) == []
    assert time.monotonic() - began < 15  # SIGTERM, then SIGKILL after the grace


def test_read_capped_counts_stored_bytes_and_keeps_head_and_tail(tmp_path):
    path = tmp_path / "out"
    data = "é" * 3000  # two bytes each
    path.write_text(data)
    text = gpuqueue.read_capped(path, 1024).decode()
    head, note, tail = text.split("\n", 2)[0], text.split("\n")[1], text.rsplit("\n", 1)[1]
    assert head.startswith("é" * 256) and tail.endswith("é" * 256)
    assert "output truncated, 4976 of 6000 bytes cut here" in note
    assert gpuqueue.read_capped(tmp_path / "missing", 1024) == b""
    path.write_text("short")
    assert gpuqueue.read_capped(path, 1024) == b"short"
    path.write_bytes(b"\xff" * 3000)  # bytes as stored, whatever they decode to
    assert len(gpuqueue.read_capped(path, 1024)) <= 1024 + gpuqueue.CUT_NOTE_ROOM


def test_what_is_no_regular_file_is_named_never_read(tmp_path):
    """A FIFO (which would block an open), a link (to a secret) and a folder planted
    where a job's output goes are named in a note, at once; nothing is followed."""
    secret = tmp_path / "secret"
    secret.write_text("the tokens")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(secret, tmp_path / "link")
    os.mkdir(tmp_path / "folder")
    for name, what in (("fifo", "a FIFO"), ("link", "a symbolic link"),
                       ("folder", "a folder")):
        note = gpuqueue.read_capped(tmp_path / name, 1024)
        assert what.encode() in note and b"not a regular file" in note, note
        assert b"the tokens" not in note
        piece = gpuqueue.read_piece(str(tmp_path / name), 0, 100)
        assert piece == {"kind": what, "size": 0}, piece
    assert gpuqueue.read_piece(str(tmp_path / "missing"), 0, 10)["kind"] == "missing"
    piece = gpuqueue.read_piece(str(secret), 4, 3)
    assert piece["kind"] == "file" and piece["size"] == 10
    assert base64.b64decode(piece["data"]) == b"tok"


def test_is_wrapper_of_tells_a_reused_pid(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path)
    try:
        assert gpuqueue.is_wrapper_of(proc.pid, str(tmp_path))
        assert not gpuqueue.is_wrapper_of(proc.pid, str(ROOT))
        assert not gpuqueue.is_wrapper_of(dead_pid(), str(tmp_path))
    finally:
        proc.kill()
        proc.wait()


# -- the shipped script --------------------------------------------------------------


def test_shipped_program_is_standard_library_only_and_named_by_its_hash():
    name, source = gpuqueue.node_program()
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in getattr(node, "names", [])}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert f"PROTOCOL = {gpuqueue.PROTOCOL}" in source
    assert "class Spool" not in source and "class Agent:" in source
    assert name.startswith("gq_node-") and name.endswith(".py")
    assert name == gpuqueue.node_program()[0]


class Agent:
    """The shipped program run as an agent on a pipe, as a local node runs it."""

    def __init__(self, workdir, env=None):
        name, source = gpuqueue.node_program()
        (workdir / name).write_text(source)
        # -I: no site packages, no user paths: what a bare node's python3 has.
        self.proc = subprocess.Popen([sys.executable, "-I", name], cwd=workdir, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, **cmd):
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def read(self):
        line = self.proc.stdout.readline()
        assert line, "the agent ended"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0  # it ends when the server goes away


#: What each start here runs: the folder's code.py, with this interpreter.
LAUNCH = {"python": sys.executable, "setup": None, "entry": "code.py", "archive": None}


def job_folder(workdir, code):
    job_id = gpuqueue.new_job_id()
    (workdir / job_id).mkdir()
    (workdir / job_id / "code.py").write_text(code)
    return job_id


def test_agent_reports_ready_answers_ping_and_runs_a_job(tmp_path):
    agent = Agent(tmp_path)
    try:
        assert agent.read() == {"op": "ready", "protocol": gpuqueue.PROTOCOL,
                                "python": sys.version.split()[0]}
        agent.send(op="ping")
        assert agent.read() == {"op": "pong"}
        job_id = job_folder(tmp_path, "import os, sys\nprint(os.environ['X'])\n"
                                      "print('e', file=sys.stderr)\nsys.exit(4)\n")
        agent.send(op="start", id=job_id, dir=job_id, env={"X": "from env"}, limit=30,
                   grace=1, inline=65536,
                   launch=LAUNCH)
        started = agent.read()
        assert started["op"] == "started" and started["id"] == job_id
        exited = agent.read()
        assert exited["op"] == "exited" and exited["result"] == {"exit_code": 4, "reason": None}
        assert base64.b64decode(exited["stdout"]) == b"from env\n"
        pids = json.loads((tmp_path / job_id / "pids").read_text())
        assert pids["protocol"] == gpuqueue.PROTOCOL and pids["wrapper"] == started["wrapper"]
        # A second start of the same folder is refused by the launch claim.
        agent.send(op="start", id=job_id, dir=job_id, env={}, limit=30, grace=1, inline=0, launch=LAUNCH)
        assert agent.read()["op"] == "started"
        assert agent.read() == {"op": "exited", "id": job_id}  # no second result
        assert json.loads((tmp_path / job_id / "result.json").read_text())["exit_code"] == 4
    finally:
        agent.close()


def test_a_folder_of_many_files_goes_beside_the_loop_which_goes_on_answering(tmp_path):
    """A job may leave a huge tree behind: its folder is renamed out of the way at once
    and removed by a thread, so a ping sent after the remove is answered while its
    files are still going (inline, 30,000 of them held the loop for a good part of a
    second); and what an agent that ended left half removed goes at the next start."""
    def gone():
        return [n for n in os.listdir(tmp_path) if n.startswith(gpuqueue.GONE)]
    leftover = tmp_path / f"{gpuqueue.GONE}1.1.{gpuqueue.new_job_id()}"
    leftover.mkdir()
    (leftover / "x").write_text("half removed by an agent that ended")
    job_id = gpuqueue.new_job_id()
    (tmp_path / job_id / "outputs").mkdir(parents=True)
    for i in range(30_000):
        os.close(os.open(tmp_path / job_id / "outputs" / str(i), os.O_CREAT | os.O_WRONLY))
    agent = Agent(tmp_path)
    try:
        assert agent.read()["op"] == "ready"
        wait_for(lambda: not leftover.exists(), "the leftover to be removed")
        # Both in one write: the agent obeys the ping straight after the remove.
        agent.proc.stdin.write(f'{{"op": "remove", "dir": "{job_id}"}}\n{{"op": "ping"}}\n'
                               .encode())
        agent.proc.stdin.flush()
        assert agent.read() == {"op": "pong"}
        assert not (tmp_path / job_id).exists() and gone(), "removed before the ping's answer"
        wait_for(lambda: not gone(), "the folder to be removed")
    finally:
        agent.close()


def test_agent_makes_a_jobs_folder_afresh_and_refuses_any_other(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    agent = Agent(work)
    try:
        assert agent.read()["op"] == "ready"
        job_id = gpuqueue.new_job_id()
        (work / job_id).mkdir()
        (work / job_id / "left").write_text("by an attempt that never launched")
        code = "print('made')\n".encode()
        lease = time.time() + 60
        agent.send(op="make", id="1", dir=job_id, files={"code.py": base64.b64encode(code).decode()},
                   deadline=lease)
        assert agent.read() == {"op": "made", "id": "1"}
        assert sorted(os.listdir(work / job_id)) == ["code.py"]
        assert (work / job_id / "code.py").read_bytes() == code
        # It then runs as a job made over SFTP would.
        agent.send(op="start", id=job_id, dir=job_id, env={}, limit=30, grace=1, inline=65536,
                   launch=LAUNCH)
        assert agent.read()["op"] == "started"
        assert base64.b64decode(agent.read()["stdout"]) == b"made\n"
        # Only a job's folder, directly in the workdir, and only plain names in it.
        for n, (folder, files) in enumerate(((".", {}), ("../x", {}),
                                             (gpuqueue.new_job_id(), {"../x": ""}),
                                             (gpuqueue.new_job_id(), {".hidden": ""}))):
            agent.send(op="make", id=f"r{n}", dir=folder, files=files, deadline=lease)
            made = agent.read()
            assert made["op"] == "made" and made["id"] == f"r{n}"
            assert made["errno"] == errno.EINVAL and made["error"]
        assert not (tmp_path / "x").exists()
        # Past its lease it touches nothing: the server may have made the folder again.
        agent.send(op="make", id="3", dir=job_id, files={}, deadline=time.time() - 1)
        assert agent.read() == {"op": "made", "id": "3", "errno": errno.ETIMEDOUT,
                                "error": "its lease is over"}
        assert (work / job_id / "code.py").read_bytes() == code
        # A workdir removed under it (a job can): ENOENT, which the server heals.
        shutil.rmtree(work)
        agent.send(op="make", id="2", dir=gpuqueue.new_job_id(), files={}, deadline=lease)
        assert agent.read()["errno"] == errno.ENOENT
    finally:
        agent.close()


def test_agent_times_out_and_cancels_whole_jobs(tmp_path):
    agent = Agent(tmp_path)
    try:
        agent.read()
        slow = job_folder(tmp_path, "import time\ntime.sleep(60)\n")
        agent.send(op="start", id=slow, dir=slow, env={}, limit=0.5, grace=0.5, inline=0, launch=LAUNCH)
        agent.read()
        exited = agent.read()
        assert exited["op"] == "exited" and exited["id"] == slow
        assert exited["result"] == {"exit_code": -signal.SIGTERM, "reason": "timeout"}

        other = job_folder(tmp_path, "import time\ntime.sleep(60)\n")
        agent.send(op="start", id=other, dir=other, env={}, limit=60, grace=0.5, inline=0, launch=LAUNCH)
        wrapper = agent.read()["wrapper"]
        wait_for(lambda: (tmp_path / other / "pids").exists(), what="the job to start")
        agent.send(op="cancel", wrapper=wrapper)
        exited = agent.read()
        assert exited["id"] == other and exited["result"]["reason"] == "cancelled"
        # Paths that are not a job folder directly in the workdir are ignored.
        agent.send(op="remove", dir="..")
        agent.send(op="ping")
        assert agent.read() == {"op": "pong"} and tmp_path.exists()
    finally:
        agent.close()


def test_a_prepared_start_follows_its_job_at_once_and_a_dropped_one_never_starts(tmp_path):
    """A job prepared to follow a running one starts when that one's process ends,
    before the wrapper of the first has even published its result; one dropped, or
    whose lease is over by then, never starts (nor claims its launch)."""
    agent = Agent(tmp_path)
    try:
        agent.read()
        stamp = ("import time\nprint(time.time(), flush=True)\ntime.sleep({})\n"
                 "print(time.time(), flush=True)\n")
        first = job_folder(tmp_path, stamp.format(0.5))
        agent.send(op="start", id=first, dir=first, env={}, limit=30, grace=1, inline=65536,
                   launch=LAUNCH)
        assert agent.read()["op"] == "started"
        second = job_folder(tmp_path, stamp.format(0))
        agent.send(op="prepare", id=second, dir=second, env={}, limit=30, grace=1,
                   inline=65536, launch=LAUNCH, deadline=time.time() + 30, after=first)
        assert agent.read()["op"] == "prepared"
        assert not (tmp_path / second / "launched").exists()  # ready, not started
        reports = [agent.read(), agent.read(), agent.read()]
        ops = [(r["op"], r["id"]) for r in reports]
        assert ops.index(("started", second)) < ops.index(("exited", second)), ops
        assert ("exited", first) in ops
        end_first = float(base64.b64decode(next(r for r in reports if r["op"] == "exited"
                                                and r["id"] == first)["stdout"]).split()[1])
        start_second = float(base64.b64decode(next(
            r for r in reports if r["op"] == "exited" and r["id"] == second)["stdout"]).split()[0])
        assert start_second > end_first  # one after the other, never side by side

        # Dropped: it ends without a launch claim; a lapsed lease: the same when due.
        third = job_folder(tmp_path, stamp.format(2))
        agent.send(op="start", id=third, dir=third, env={}, limit=30, grace=1, inline=0,
                   launch=LAUNCH)
        assert agent.read()["op"] == "started"
        dropped = job_folder(tmp_path, "print('never')\n")
        agent.send(op="prepare", id=dropped, dir=dropped, env={}, limit=30, grace=1, inline=0,
                   launch=LAUNCH, deadline=time.time() + 30, after=third)
        assert agent.read()["op"] == "prepared"
        agent.send(op="drop", id=dropped)
        assert agent.read() == {"op": "dropped", "id": dropped}
        lapsed = job_folder(tmp_path, "print('never')\n")
        agent.send(op="prepare", id=lapsed, dir=lapsed, env={}, limit=30, grace=1, inline=0,
                   launch=LAUNCH, deadline=time.time() + 0.5, after=third)
        assert agent.read()["op"] == "prepared"
        reports = [agent.read(), agent.read()]
        assert {"op": "dropped", "id": lapsed} in reports
        assert any(r["op"] == "exited" and r["id"] == third for r in reports), reports
        for never in (dropped, lapsed):
            assert not (tmp_path / never / "launched").exists()
            assert not (tmp_path / never / "result.json").exists()
    finally:
        agent.close()


def test_gpu_readings_beside_a_running_job_never_end_the_agent(tmp_path):
    # nvidia-smi is the agent's child too, and ends while the main loop waits for
    # its wrappers: each must be reaped by its own waiter, or the agent dies.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho '0, GPU-aaaa, Fake, 1, 80000, 0'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    agent = Agent(work, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        agent.read()
        jobs = [job_folder(work, "import time\ntime.sleep(60)\n") for _ in range(2)]
        wrappers = []
        for job_id in jobs:
            agent.send(op="start", id=job_id, dir=job_id, env={}, limit=60, grace=0.5, inline=0, launch=LAUNCH)
            wrappers.append(agent.read()["wrapper"])
        for _ in range(100):
            agent.send(op="gpus")
            reading = agent.read()
            assert reading["op"] == "gpus" and reading["reading"]["csv"].startswith("0, GPU-aaaa")
        agent.send(op="ping")
        assert agent.read() == {"op": "pong"}
        for wrapper in wrappers:  # and the wrappers' own ends are still reported
            agent.send(op="cancel", wrapper=wrapper)
        assert {agent.read()["id"] for _ in jobs} == set(jobs)
    finally:
        agent.close()


# -- wrappers of other protocols, met while re-attaching ---------------------------


def fake_wrapper(cwd, code="import time; time.sleep(60)"):
    """A process standing in for a wrapper of another release, working in ``cwd``."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, start_new_session=True)


def test_a_protocol_1_wrapper_is_followed_to_its_end(make_server, tmp_path):
    server, job, folder = prepared_server(make_server, "print('never run here')\n")
    work = server.dir / "spool" / "nodes" / "0" / "work" / job.id
    work.mkdir(parents=True)
    mark_launching(folder, work)
    (work / "launched").touch()
    (work / "stdout").write_text("from the old wrapper\n")
    (work / "stderr").write_text("")
    old = fake_wrapper(work, "import json, time\ntime.sleep(2)\n"
                             "open('result.json', 'w').write(json.dumps("
                             "{'exit_code': 0, 'reason': None}))\n")
    (work / "pids").write_text(json.dumps({"wrapper": old.pid, "job": old.pid}))  # no protocol
    server.start()
    assert server.status(job.id)["status"] == "running"
    st = server.wait(job.id)
    old.wait(10)
    assert st["status"] == "completed" and st["exit_code"] == 0, st
    assert server.results(job.id)["stdout"] == "from the old wrapper\n"


def test_a_wrapper_of_an_unknown_protocol_is_stopped_and_its_job_failed(make_server, tmp_path):
    server, job, folder = prepared_server(make_server, "print('never run here')\n")
    work = server.dir / "spool" / "nodes" / "0" / "work" / job.id
    work.mkdir(parents=True)
    mark_launching(folder, work)
    (work / "launched").touch()
    newer = fake_wrapper(work)
    (work / "pids").write_text(json.dumps({"wrapper": newer.pid, "job": newer.pid,
                                           "protocol": 99}))
    server.start()
    st = server.wait(job.id)
    assert st["status"] == "failed" and "node protocol 99" in st["error"], st
    assert newer.wait(10) == -signal.SIGTERM
    assert server.proc.poll() is None


def old_claim(folder):
    """The claim's record as releases before 0.3 wrote it, when they claimed."""
    (folder / "start.json").write_text(json.dumps({"started_at": time.time(), "node_id": 0}))


def test_a_local_job_of_a_release_before_protocol_2_is_stopped_with_a_reason(make_server):
    server, job, folder = prepared_server(make_server, "print('never run here')\n")
    old_claim(folder)
    work = folder / "work"  # where releases before protocol 2 ran local jobs
    work.mkdir()
    (work / "launched").touch()
    (work / "stdout").write_text("half\n")
    old = fake_wrapper(work)
    (work / "pids").write_text(json.dumps({"wrapper": old.pid, "job": old.pid}))
    server.start()
    st = server.wait(job.id)
    assert st["status"] == "failed" and "older gpuqueue release" in st["error"], st
    assert server.results(job.id)["stdout"] == "half\n"
    assert old.wait(10) == -signal.SIGTERM
    wait_for(lambda: not (server.dir / "spool" / "done" / job.id / "work").exists(),
             what="the old work folder removed, after the outcome is recorded")


def test_a_finished_local_job_of_a_release_before_protocol_2_is_collected(make_server):
    server, job, folder = prepared_server(make_server, "print('never run here')\n")
    old_claim(folder)
    work = folder / "work"
    work.mkdir()
    (work / "launched").touch()
    (work / "stdout").write_text("done before the upgrade\n")
    (work / "result.json").write_text(json.dumps({"exit_code": 0, "reason": None}))
    server.start()
    st = server.wait(job.id)
    assert st["status"] == "completed", st
    assert server.results(job.id)["stdout"] == "done before the upgrade\n"


@pytest.mark.parametrize("field,value", [("expected_time", "30"), ("id", None), ("priority", 1.5)])
def test_a_job_json_of_wrong_types_is_quarantined_not_fatal(make_server, field, value):
    server, job, folder = prepared_server(make_server, "print(1)\n", claim=False)
    pending = server.dir / "spool" / "nodes" / "0" / "pending" / job.id
    meta = json.loads((pending / "job.json").read_text())
    meta[field] = value
    (pending / "job.json").write_text(json.dumps(meta))
    server.start()
    corrupt = server.dir / "spool" / "corrupt"
    reasons = [p.read_text() for p in corrupt.glob("*.REASON")]
    assert len(reasons) == 1 and field in reasons[0], reasons
    assert server.get("/api/nodes").json()["nodes"][0]["queued_jobs"] == 0


def test_a_server_started_in_the_background_gives_jobs_their_signals_at_the_defaults(make_server):
    """A script's 'nohup gpuqueue.py serve &' starts the server with SIGINT, SIGQUIT
    and SIGHUP ignored; its local jobs get them at their defaults all the same, as
    over SSH."""
    server = make_server(nodes=1, start=False)
    before = {s: signal.signal(s, signal.SIG_IGN)
              for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)}
    try:
        server.start()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    sub = server.submit_ok("import signal\n"
                           "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,\n"
                           "      signal.getsignal(signal.SIGQUIT) is signal.SIG_DFL,\n"
                           "      signal.getsignal(signal.SIGHUP) is signal.SIG_DFL)\n")
    assert server.wait(sub["job_id"])["status"] == "completed"
    assert server.results(sub["job_id"])["stdout"] == "True True True\n"
