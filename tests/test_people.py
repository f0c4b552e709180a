"""gpuqueue as its people use it: a user with gpuqueue.py copied alone onto a bare
python3 (no packages at all), and an admin typing server commands from whatever
folder they are in.  Everything is a real subprocess against a real server on
127.0.0.1; every wait is for a condition, with a generous bound."""
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import GPUQUEUE, ROOT, job_config, wait_for

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402  (only __version__)

JOB_ID = r"[0-9a-f]{24}"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    """A user's laptop: a venv with no packages at all (not even pip) and a folder
    holding nothing but a copy of gpuqueue.py."""
    root = tmp_path_factory.mktemp("laptop")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    home = root / "home"
    home.mkdir()
    shutil.copy(GPUQUEUE, home / "gpuqueue.py")
    # Bare indeed: none of the server's packages can be imported by it.
    for package in ("yaml", "bottle", "waitress", "click", "filelock", "requests"):
        r = subprocess.run([str(python), "-s", "-c", f"import {package}"], capture_output=True,
                           timeout=60, env=_bare_env({}))
        assert r.returncode != 0, f"{package} is importable on the bare python"
    return python, home


def _bare_env(extra):
    """A user's environment: no PYTHONPATH, no user site-packages, no server config,
    and output buffered as python buffers it into a pipe (so that output the client
    does not flush would not be seen live)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "GPUQUEUE_CONFIG",
                        "GPUQUEUE_URL", "GPUQUEUE_TOKEN", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def user_env(server, token):
    return _bare_env({"GPUQUEUE_URL": server.url, "GPUQUEUE_TOKEN": token})


def on_laptop(laptop, server, *args, token=None, timeout=60):
    """Run ``python gpuqueue.py ARGS`` on the bare python, from the laptop's folder."""
    python, home = laptop
    token = server.token() if token is None else token
    return subprocess.run([str(python), "gpuqueue.py", *args], cwd=home,
                          env=user_env(server, token), capture_output=True, text=True,
                          timeout=timeout)


def laptop_popen(laptop, server, *args, token=None):
    python, home = laptop
    token = server.token() if token is None else token
    return subprocess.Popen([str(python), "gpuqueue.py", *args], cwd=home,
                            env=user_env(server, token), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def admin(*args, cwd, config=None, timeout=60):
    """An admin's server command (the project's python, with its packages), run from
    ``cwd``; ``config`` goes in GPUQUEUE_CONFIG, never --config."""
    env = {k: v for k, v in os.environ.items() if k != "GPUQUEUE_CONFIG"}
    if config is not None:
        env["GPUQUEUE_CONFIG"] = str(config)
    return subprocess.run([sys.executable, str(GPUQUEUE), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class Lines:
    """Collects a pipe's lines on a thread, so a test can wait for one without
    blocking on a process that says nothing more."""

    def __init__(self, pipe):
        self.lines = []
        self._q = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe):
        for line in pipe:
            self._q.put(line)
        self._q.put(None)

    def _drain(self, block_for=0.0):
        try:
            item = self._q.get(timeout=block_for) if block_for else self._q.get_nowait()
        except queue.Empty:
            return False
        while True:
            if item is None:
                self.lines.append(None)
            else:
                self.lines.append(item)
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return True

    def text(self):
        self._drain()
        return "".join(x for x in self.lines if x is not None)

    def wait(self, needle, timeout=30):
        """The first line holding ``needle``."""
        end = time.monotonic() + timeout
        while True:
            self._drain()
            for line in self.lines:
                if line is not None and needle in line:
                    return line
            assert None not in self.lines, f"the stream ended without {needle!r}: {self.text()!r}"
            assert time.monotonic() < end, f"no line with {needle!r} in {self.text()!r}"
            self._drain(0.05)

    def ended(self, timeout=30):
        end = time.monotonic() + timeout
        while None not in self.lines:
            assert time.monotonic() < end, "the stream did not end"
            self._drain(0.05)
        return self.text()


def start(server):
    """Start (or restart) ``server`` (conftest's start reads its first line); the rest
    of its stdout."""
    server.start()
    return Lines(server.proc.stdout)


def stop(server, out):
    """SIGTERM, as systemd stops it; what it printed on its way out."""
    server.proc.send_signal(signal.SIGTERM)
    line = out.wait("gpuqueue stopped:")
    assert server.proc.wait(30) == 0, server.log()
    return line


def gate_job(tmp_path, name):
    """A job that prints, waits for the test's gate file, then prints again."""
    gate = tmp_path / f"{name}.gate"
    return gate, (f"import os, time\nprint('{name} started', flush=True)\n"
                  f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)\n"
                  f"print('{name} done')\n")


def files(tmp_path, name, code, user="alice", expected_time=30):
    (tmp_path / f"{name}.py").write_text(code)
    (tmp_path / f"{name}.yaml").write_text(job_config(user, expected_time))
    return str(tmp_path / f"{name}.py"), str(tmp_path / f"{name}.yaml")


# -- the client on a bare python3 -----------------------------------------------------------


def test_client_commands_run_on_a_bare_python(make_server, laptop, tmp_path):
    server = make_server(nodes=1)
    r = on_laptop(laptop, server, "--version")
    assert (r.returncode, r.stdout) == (0, f"gpuqueue {gpuqueue.__version__}\n"), r.stderr

    # submit, into a pipe (as in J=$(...)): the id alone on stdout; where it stands,
    # counted from 1, on stderr.
    script, config = files(tmp_path, "hello", "import sys\nprint('hello out')\n"
                           "print('hello err', file=sys.stderr)\nsys.exit(3)\n")
    r = on_laptop(laptop, server, "submit", script, "-c", config)
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(rf"({JOB_ID})\n", r.stdout)
    assert m, r.stdout
    human = m.group(1)
    assert f"job {human} pending on node 0, next in line, estimated start " in r.stderr
    assert server.wait(human)["status"] == "failed"

    # submit --json, for scripts.
    script2, config2 = files(tmp_path, "json", "print('json job')\n")
    r = on_laptop(laptop, server, "submit", script2, "-c", config2, "--json")
    assert r.returncode == 0, r.stderr
    sub = json.loads(r.stdout)
    assert set(sub) == {"job_id", "node_id", "status", "queue_position", "estimated_start"}
    assert sub["status"] == "pending" and re.fullmatch(JOB_ID, sub["job_id"])
    assert server.wait(sub["job_id"])["status"] == "completed"

    # status: people's and scripts'.
    r = on_laptop(laptop, server, "status", human)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{human}  failed  node 0  user alice\n")
    assert "exit code 3" in r.stdout and "finished" in r.stdout
    r = on_laptop(laptop, server, "status", sub["job_id"], "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == server.status(sub["job_id"])

    # results: the job's stdout on stdout, its stderr on stderr.
    r = on_laptop(laptop, server, "results", human)
    assert (r.returncode, r.stdout) == (0, "hello out\n")
    assert r.stderr.startswith("hello err\n")
    r = on_laptop(laptop, server, "results", sub["job_id"], "--json")
    assert json.loads(r.stdout)["stdout"] == "json job\n"

    # jobs: a table of one's own, newest first.
    r = on_laptop(laptop, server, "jobs")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert rows[0].split() == ["JOB", "USER", "STATUS", "NODE", "SUBMITTED", "EXIT"]
    assert [row.split()[:3] for row in rows[1:]] == [[sub["job_id"], "alice", "completed"],
                                                     [human, "alice", "failed"]]
    assert [row.split()[-1] for row in rows[1:]] == ["0", "3"]
    r = on_laptop(laptop, server, "jobs", "--status", "failed", "--json")
    assert [j["job_id"] for j in json.loads(r.stdout)["jobs"]] == [human]

    # Mistakes end in one line and a non-zero status, never a traceback.
    for args, token, says in ((("status", "0" * 24), None, "no such job (HTTP 404)"),
                              (("status", human), "x" * 30, "HTTP 401"),
                              (("results", human), "", "no token"),
                              (("submit", str(tmp_path / "nope.py"), "-c", config), None,
                               "nope.py")):
        r = on_laptop(laptop, server, *args, token=token)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert on_laptop(laptop, server, "results", human, token=server.token("bob")).returncode == 1


def test_logs_follow_and_cancel_on_a_bare_python(make_server, laptop, tmp_path):
    server = make_server(nodes=1)
    gate, code = gate_job(tmp_path, "followed")
    script, config = files(tmp_path, "followed", code)
    job_id = json.loads(on_laptop(laptop, server, "submit", script, "-c", config, "--json").stdout)[
        "job_id"]
    follow = laptop_popen(laptop, server, "logs", "-f", job_id)
    try:
        out = Lines(follow.stdout)
        # The first line comes while the job runs: it is followed live, not read at the end.
        assert out.wait("followed started") == "followed started\n"
        assert server.status(job_id)["status"] == "running"
        assert follow.poll() is None
        gate.write_text("go")
        assert out.ended() == "followed started\nfollowed done\n"
        assert follow.wait(30) == 0, follow.stderr.read()
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()

    # cancel, of a running job: it answers at once and the node stops the job.
    _, code = gate_job(tmp_path, "never")
    script, config = files(tmp_path, "never", code, expected_time=120)
    job_id = json.loads(on_laptop(laptop, server, "submit", script, "-c", config, "--json").stdout)[
        "job_id"]
    server.wait(job_id, ("running",))
    r = on_laptop(laptop, server, "cancel", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{job_id}  ") and ("cancel requested" in r.stdout
                                                   or "cancelled" in r.stdout), r.stdout
    assert server.wait(job_id)["status"] == "cancelled"
    r = on_laptop(laptop, server, "cancel", job_id)
    assert r.returncode == 1 and "HTTP 409" in r.stderr and "Traceback" not in r.stderr


def test_server_commands_on_a_bare_python_name_the_missing_package(laptop, tmp_path):
    python, home = laptop
    for args in (["serve"], ["--config", str(tmp_path / "x.yaml"), "serve"], ["tokens", "list"],
                 ["nodes", "drain", "0"], ["jobs", "list"]):
        r = subprocess.run([str(python), "gpuqueue.py", *args], cwd=home, env=_bare_env({}),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "'click'" in lines[0] and "package" in lines[0], lines[0]
        assert r.stdout == ""
    assert sorted(os.listdir(home)) == ["gpuqueue.py"]  # no spool, no tokens file


def test_submit_wait_shows_the_job_running_and_ctrl_c_leaves_it_running(make_server, laptop,
                                                                        tmp_path):
    server = make_server(nodes=1)
    script, config = files(tmp_path, "slow", "import time\nprint('first line', flush=True)\n"
                           "time.sleep(20)\nprint('never seen')\n", expected_time=60)
    client = laptop_popen(laptop, server, "submit", script, "-c", config, "--wait")
    try:
        out, err = Lines(client.stdout), Lines(client.stderr)
        queued = err.wait("queued on node 0")
        job_id = re.search(rf"job ({JOB_ID}) queued", queued).group(1)
        assert f"logs -f {job_id}" in queued  # where its output is, as it comes
        # One request held open tells it when the job runs, with its time and limit.
        assert "60 s expected, killed after 2 min" in err.wait("killed after")
        assert server.status(job_id)["status"] == "running"
        assert client.poll() is None

        client.send_signal(signal.SIGINT)  # Ctrl-C
        assert client.wait(30) == 130
        said = err.ended()
        assert "Traceback" not in said, said
        assert f"job {job_id} keeps running" in said, said
        assert f"logs -f {job_id}" in said and f"cancel {job_id}" in said, said
        assert out.ended() == ""  # the output comes with the results, at the end
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    # The job goes on, on the server, until someone cancels it.
    assert server.status(job_id)["status"] == "running"
    assert server.post(f"/api/cancel/{job_id}", server.token()).status_code == 200
    assert server.wait(job_id)["status"] == "cancelled"


def test_queue_positions_are_counted_from_one_for_people(make_server, laptop, tmp_path):
    server = make_server(nodes=1)
    gate, code = gate_job(tmp_path, "long")
    first = server.submit_ok(code, expected_time=120)
    server.wait(first["job_id"], ("running",))
    second = server.submit_ok("print('second')\n")
    assert second["queue_position"] == 0  # the API counts from 0
    script, config = files(tmp_path, "third", "print('third')\n")
    r = on_laptop(laptop, server, "submit", script, "-c", config)
    assert r.returncode == 0, r.stderr
    assert ", number 2 in line, " in r.stderr, r.stderr
    third = r.stdout.split()[0]
    assert server.status(third)["queue_position"] == 1

    r = on_laptop(laptop, server, "status", second["job_id"])
    assert r.returncode == 0 and "\n  next in line, estimated start " in r.stdout, r.stdout
    r = on_laptop(laptop, server, "status", third)
    assert "\n  number 2 in line, estimated start " in r.stdout, r.stdout
    r = on_laptop(laptop, server, "status", first["job_id"])
    assert "in line" not in r.stdout and "  running  " in r.stdout, r.stdout
    gate.write_text("go")
    assert server.wait(third)["status"] == "completed"


# -- the admin's commands, from wherever the admin is ---------------------------------------


def test_admin_commands_from_another_folder_need_the_config(make_server, tmp_path):
    """A server started with a config file elsewhere is not the built-in default's (whose
    spool and tokens file are beside gpuqueue.py): from another folder, without naming
    the config, an admin command says where it looked and how to name it, and changes
    nothing anywhere."""
    server = make_server(nodes=2)
    install = tmp_path / "install"  # a copy of gpuqueue.py alone, no server ever used here
    install.mkdir()
    shutil.copy(GPUQUEUE, install / "gpuqueue.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (["nodes", "drain", "0"], ["tokens", "create", "bob"], ["jobs", "list"]):
        r = subprocess.run([sys.executable, str(install / "gpuqueue.py"), *args], cwd=elsewhere,
                           capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "GPUQUEUE_CONFIG"})
        assert r.returncode != 0, (args, r.stdout)
        assert "Traceback" not in r.stderr, r.stderr
        assert str(install / "spool") in r.stderr, r.stderr  # where it looked
        assert "--config" in r.stderr and "GPUQUEUE_CONFIG" in r.stderr, r.stderr
        assert "token (shown only now)" not in r.stdout
        assert os.listdir(elsewhere) == [], (args, os.listdir(elsewhere))
        assert sorted(os.listdir(install)) == ["gpuqueue.py"], os.listdir(install)
    assert not server.get("/api/nodes").json()["nodes"][0]["drained"]

    # Named through the environment, the same commands act on the running server.
    r = admin("nodes", "drain", "0", cwd=elsewhere, config=server.config_path)
    assert r.returncode == 0, r.stderr
    nodes = {n["id"]: n for n in server.get("/api/nodes").json()["nodes"]}
    assert nodes[0]["drained"] is True and nodes[1]["drained"] is False
    r = admin("tokens", "create", "bob", cwd=elsewhere, config=server.config_path)
    assert r.returncode == 0, r.stderr
    tokens_file = (server.dir / "tokens.yaml").resolve()
    assert str(tokens_file) in r.stdout, r.stdout
    bob = r.stdout.strip().splitlines()[-1].split()[-1]
    assert server.get("/api/jobs", bob).status_code == 200
    r = admin("jobs", "list", cwd=elsewhere, config=server.config_path)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["JOB", "USER"], r.stderr
    assert os.listdir(elsewhere) == []
    r = admin("nodes", "resume", "0", cwd=elsewhere, config=server.config_path)
    assert r.returncode == 0, r.stderr
    assert server.get("/api/nodes").json()["nodes"][0]["drained"] is False


def test_chosen_tokens_short_ones_warned_too_short_ones_refused(make_server, tmp_path):
    server = make_server(nodes=1)
    r = server.cli("tokens", "create", "carol", "my-secret-token")
    assert len("my-secret-token") == 15
    assert "warning" in r.stderr and "easy to guess" in r.stderr, r.stderr
    assert "created token" in r.stdout and "carol" in r.stdout
    assert "my-secret-token" not in r.stdout  # a chosen token is not echoed back
    assert server.get("/api/jobs", "my-secret-token").status_code == 200
    assert server.get("/api/jobs", "my-secret-tokeN").status_code == 401

    r = server.cli("tokens", "create", "dave", "abcdefg", check=False)
    assert r.returncode == 1, r.stdout
    assert "at least 8" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert server.get("/api/jobs", "abcdefg").status_code == 401
    assert "dave" not in server.cli("tokens", "list").stdout

    r = server.cli("tokens", "create", "erin", "a-long-enough-token-of-its-own")
    assert r.stderr == "" and server.get("/api/jobs", "a-long-enough-token-of-its-own").ok


def test_version_on_both_halves(laptop, tmp_path):
    want = f"gpuqueue {gpuqueue.__version__}\n"
    for args in (["--version"], ["-V"]):
        r = admin(*args, cwd=tmp_path)
        assert (r.returncode, r.stdout) == (0, want), (args, r.stdout, r.stderr)
    python, home = laptop
    r = subprocess.run([str(python), "gpuqueue.py", "--version"], cwd=home, env=_bare_env({}),
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, want)


def test_version_of_the_server_cli_with_its_config(make_server, tmp_path):
    """The server's Click group answers --version after --config (or with
    GPUQUEUE_CONFIG set) in the same words as the plain --version."""
    server = make_server(nodes=1, start=False)
    want = f"gpuqueue {gpuqueue.__version__}\n"
    for args, config in ((["--version"], server.config_path),
                         (["--config", str(server.config_path), "--version"], None),
                         ([f"--config={server.config_path}", "--version"], None)):
        r = admin(*args, cwd=tmp_path, config=config)
        assert (r.returncode, r.stdout) == (0, want), (args, config, r.stdout, r.stderr)


# -- the server's own words ----------------------------------------------------------------


def test_banner_says_where_it_listens_and_hints_at_tokens_until_one_exists(make_server):
    server = make_server(nodes=1, start=False)
    out = start(server)
    banner = out.wait("dashboard")
    # conftest's start read the first line; it said where to go, and it is so.
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url), server.url
    assert requests.get(server.url + "/", timeout=30).json()["name"] == "gpuqueue"
    assert banner == f"dashboard {server.url}/ui  API docs {server.url}/docs\n"
    hint = out.wait("no tokens yet")
    assert f"--config {server.config_path}" in hint and "tokens create USER" in hint, hint
    stopped = stop(server, out)
    assert stopped.startswith("gpuqueue stopped: 0 running job(s)"), stopped

    token = server.token()
    out = start(server)
    out.wait("dashboard")
    assert server.get("/api/jobs", token).status_code == 200
    stop(server, out)
    assert "no tokens yet" not in out.text(), out.text()


def test_banner_first_line(make_server):
    """Server.start read it; here it is whole, from a server started by hand."""
    server = make_server(nodes=3, start=False)
    proc = subprocess.Popen([sys.executable, str(GPUQUEUE), "--config", str(server.config_path),
                             "serve"], cwd=server.dir, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    server.proc = proc  # the fixture stops it
    out = Lines(proc.stdout)
    line = out.wait("listening on")
    assert out.lines[0] == line  # the first thing it says
    m = re.fullmatch(rf"gpuqueue {re.escape(gpuqueue.__version__)} listening on "
                     r"http://127\.0\.0\.1:(\d+) with 3 node\(s\); spool (\S+)\n", line)
    assert m, line
    assert m.group(2) == str((server.dir / "spool").resolve())
    assert requests.get(f"http://127.0.0.1:{m.group(1)}/api/nodes", timeout=30).status_code == 200


def test_sigterm_leaves_a_running_job_running_and_a_restart_reattaches_it(make_server, tmp_path):
    server = make_server(nodes=1, start=False)
    out = start(server)
    gate, code = gate_job(tmp_path, "survivor")
    job = server.submit_ok(code, expected_time=120)
    server.wait(job["job_id"], ("running",))
    wait_for(lambda: "survivor started" in server.get(f"/api/logs/{job['job_id']}",
                                                       server.token()).json()["data"],
             "the job's first line")
    stopped = stop(server, out)
    assert stopped.startswith("gpuqueue stopped: 1 running job(s) go on running"), stopped

    out = start(server)
    assert server.status(job["job_id"])["status"] == "running"  # re-attached, not lost
    gate.write_text("go")
    done = server.wait(job["job_id"])
    assert done["status"] == "completed" and done["exit_code"] == 0, done
    assert server.results(job["job_id"])["stdout"] == "survivor started\nsurvivor done\n"
    stop(server, out)
