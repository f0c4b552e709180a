"""gpuqueue for a newcomer: every command it prints works as printed with the
machine's python3, the admin's commands find a `make run` server from any folder,
the client composes in shell scripts and survives any server, GPUs on SSH nodes
are found rather than guessed, run_as mistakes are said, and `make cluster` says
what it does.

Everything is a real subprocess against a real server (or a fake one this file
writes) on 127.0.0.1; SSH is a real loopback sshd cluster.  A "bare python3" is
the venv with no packages that test_people's ``laptop`` makes, run with no
PYTHONPATH and no user site-packages.  Every wait is for a condition, with a
generous bound."""
import concurrent.futures
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

from conftest import GPUQUEUE, ROOT, Server, job_config, kill_processes_under, wait_for
from sshcluster import Cluster, open_to_nodes
from test_people import Lines, _bare_env, laptop  # noqa: F401  (laptop: a fixture)
from test_run_as import JOB_USER, job_user  # noqa: F401  (job_user: a fixture)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402  (its Tokens, to make many tokens quickly)

JOB_ID = r"[0-9a-f]{24}"
NO_JOB = "0" * 24
#: Linux's fcntl to resize a pipe; the smallest size is a page.
F_SETPIPE_SZ = 1031
LOCAL_WARNING = "local nodes run jobs as this server's own user"
#: A line naming one of the server's packages (as requirements.txt or an import names it).
SERVER_PACKAGES = re.compile(r"['\"`]?\b(click|bottle|waitress|yaml|PyYAML|filelock|fabric)\b")


# -- helpers ---------------------------------------------------------------------------


def free_port():
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_env(python, **extra):
    """A user's shell: no PYTHONPATH, no user site-packages, no GPUQUEUE_* unless
    given, and ``python3`` on PATH is the bare one."""
    env = _bare_env({k: str(v) for k, v in extra.items()})
    env["PATH"] = f"{Path(python).parent}:/usr/bin:/bin"
    return env


def admin_env():
    """An admin's environment with no config named anywhere."""
    return {k: v for k, v in os.environ.items() if k not in ("GPUQUEUE_CONFIG", "GPUQUEUE_URL",
                                                             "GPUQUEUE_TOKEN")}


def gpuqueue_folder(path):
    """A folder holding a copy of gpuqueue.py and a `.venv` link to the project's venv,
    as a `make run` checkout has."""
    path.mkdir()
    shutil.copy(GPUQUEUE, path / "gpuqueue.py")
    (path / ".venv").symlink_to(ROOT / ".venv")
    return path


def no_traceback(r):
    assert "Traceback" not in r.stdout + r.stderr, (r.stdout, r.stderr)


def lines_of(text):
    return [line for line in text.splitlines() if line.strip()]


def exit_status_of(record):
    """The shell status that stands for a job's end, as the contract states it."""
    code = record["exit_code"]
    if code is None or record["status"] == "cancelled" or record.get("error") == "timeout":
        return 1
    return 128 - code if code < 0 else code


def through_head(cmd, env, cwd):
    """``cmd | head -1`` through a pipe of one page (4 KiB), so that an output of
    more than two pages meets a reader that has gone: head leaves after the page
    holding the first line, and the writer can put at most one more page into the
    pipe before it finds no reader.  Returns (the writer's status, what head
    printed, the writer's stderr)."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    head = subprocess.Popen(["head", "-1"], stdin=r, stdout=subprocess.PIPE, text=True)
    writer = subprocess.Popen(cmd, stdout=w, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    os.close(r)
    os.close(w)
    try:
        _, err = writer.communicate(timeout=60)
        first, _ = head.communicate(timeout=60)
    finally:
        for p in (writer, head):
            if p.poll() is None:
                p.kill()
                p.wait()
    return writer.returncode, first, err


def stop_process(proc):
    """SIGTERM, as systemd stops a server; SIGKILL when that is not enough."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def kill_naming(path):
    """Kill the processes whose command line names ``path`` (what a test started there)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(path).encode() in f.read() and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def start_server(folder, **kw):
    """A conftest Server, started, with the rest of its stdout collected."""
    s = Server(folder, **kw)
    s.start()
    s.out = Lines(s.proc.stdout)
    return s


def close_server(s):
    s.kill()
    kill_processes_under(s.dir)


# -- shared fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare(laptop):  # noqa: F811
    """The bare python3 (no packages at all)."""
    return laptop[0]


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    """A user's folder: a copy of gpuqueue.py (no .venv beside it), a job and its config."""
    d = tmp_path_factory.mktemp("desk")
    shutil.copy(GPUQUEUE, d / "gpuqueue.py")
    (d / "job.py").write_text("print('hello from the job')\n")
    (d / "config.yaml").write_text(job_config("alice", 30))
    return d


@pytest.fixture(scope="module")
def main_server(tmp_path_factory):
    """One server for the client's tests: three local nodes."""
    s = start_server(tmp_path_factory.mktemp("main") / "s", nodes=3)
    yield s
    close_server(s)


def client(bare, desk, server, *args, token=None, url=None, timeout=90, **env):
    """``python3 gpuqueue.py ARGS`` on the bare python, from the user's folder."""
    token = server.token() if token is None and server is not None else token
    env = bare_env(bare, GPUQUEUE_URL=url or server.url, GPUQUEUE_TOKEN=token or "", **env)
    return subprocess.run([str(bare), "gpuqueue.py", *args], cwd=desk, env=env,
                          capture_output=True, text=True, timeout=timeout)


def client_popen(bare, desk, server, *args):
    env = bare_env(bare, GPUQUEUE_URL=server.url, GPUQUEUE_TOKEN=server.token())
    return subprocess.Popen([str(bare), "gpuqueue.py", *args], cwd=desk, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def server_command(server, *args):
    """An admin's command on the server's machine (the project's python, its config)."""
    return subprocess.run([sys.executable, str(GPUQUEUE), "--config", str(server.config_path),
                           *args], cwd=server.dir, env=admin_env(), capture_output=True,
                          text=True, timeout=60)


# == A. Every command printed works as printed, with the machine's python3 ==================


def test_a_server_command_on_a_bare_python3_reruns_under_the_venv_beside_the_script(
        bare, tmp_path):
    """A person types `python3 gpuqueue.py tokens create bob` in a checkout whose
    .venv holds the server's packages, with a python3 that has none of them: it
    works exactly as `.venv/bin/python gpuqueue.py ...` would, also when the
    gpuqueue.py they run is a link to the checkout's."""
    d = gpuqueue_folder(tmp_path / "checkout")
    cfg = d / "gq.yaml"
    cfg.write_text(yaml.safe_dump({"spool": "spool", "tokens": "tokens.yaml",
                                   "nodes": [{"id": 0, "host": "local"}]}))
    env = bare_env(bare)
    r = subprocess.run([str(bare), "gpuqueue.py", "--config", str(cfg), "tokens", "create", "bob",
                        "--days", "5"], cwd=d, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    no_traceback(r)
    assert "token (shown only now): " in r.stdout, r.stdout
    token = r.stdout.strip().splitlines()[-1].split()[-1]
    assert gpuqueue.Tokens(d / "tokens.yaml").authenticate(token)["user"] == "bob"

    for args in (["--config", str(cfg), "tokens", "list"], ["--help"]):
        on_bare = subprocess.run([str(bare), "gpuqueue.py", *args], cwd=d, env=env,
                                 capture_output=True, text=True, timeout=60)
        on_venv = subprocess.run([str(d / ".venv" / "bin" / "python"), "gpuqueue.py", *args],
                                 cwd=d, env=env, capture_output=True, text=True, timeout=60)
        assert on_venv.returncode == 0, on_venv.stderr
        assert (on_bare.returncode, on_bare.stdout) == (0, on_venv.stdout), (args, on_bare.stderr)

    # Through a link: the venv is looked for beside the file the link leads to.
    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    (elsewhere / "gpuqueue.py").symlink_to(d / "gpuqueue.py")
    r = subprocess.run([str(bare), str(elsewhere / "gpuqueue.py"), "--config", str(cfg), "tokens",
                        "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "bob" in r.stdout


def test_without_a_venv_server_commands_name_the_missing_package_and_clients_work(
        bare, laptop, main_server, desk):  # noqa: F811
    """With gpuqueue.py alone on a bare python3, a server command ends with status 1
    and a line naming the package it lacks and saying to run `make run` (or install
    requirements.txt); the client commands still work there."""
    python, home = laptop
    for args in (["serve"], ["tokens", "list"], ["nodes", "list"], ["jobs", "list"],
                 ["tokens", "create", "bob", "--days", "5"]):
        r = subprocess.run([str(python), "gpuqueue.py", *args], cwd=home, env=bare_env(bare),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        no_traceback(r)
        said = [line for line in r.stderr.splitlines() if SERVER_PACKAGES.search(line)]
        assert said and ("make run" in said[0] or "requirements.txt" in said[0]), r.stderr
    assert not (home / "spool").exists() and not (home / "tokens.yaml").exists()
    r = client(bare, desk, main_server, "--version")
    assert (r.returncode, r.stdout) == (0, f"gpuqueue {gpuqueue.__version__}\n"), r.stderr
    r = client(bare, desk, main_server, "jobs")
    assert r.returncode == 0 and r.stdout.split()[:2] == ["JOB", "USER"], r.stderr


def test_help_on_a_bare_python3_is_help_not_a_complaint(bare, laptop):  # noqa: F811
    """`python3 gpuqueue.py --help` (and -h) on a bare python3 exits 0 and lists the
    client's and the server's commands, without complaining about a package."""
    python, home = laptop
    for flag in ("--help", "-h"):
        r = subprocess.run([str(python), "gpuqueue.py", flag], cwd=home, env=bare_env(bare),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (flag, r.stdout, r.stderr)
        no_traceback(r)
        for command in ("submit", "status", "logs", "serve", "tokens", "nodes"):
            assert command in r.stdout, (flag, command, r.stdout)
        complaints = [line for line in r.stderr.splitlines()
                      if SERVER_PACKAGES.search(line) or "package" in line]
        assert complaints == [], (flag, r.stderr)


# -- a `make run` server: no config at all, started in its own folder ----------------------


@pytest.fixture(scope="module")
def made_by_make_run(tmp_path_factory):
    """`python3 D/gpuqueue.py serve` in D with no config anywhere (the built-in default),
    and an empty folder E elsewhere."""
    root = tmp_path_factory.mktemp("make_run")
    d = gpuqueue_folder(root / "D")
    e = root / "E"
    e.mkdir()
    proc = subprocess.Popen([sys.executable, str(d / "gpuqueue.py"), "serve", "--host",
                             "127.0.0.1", "--port", "0"], cwd=d, env=admin_env(),
                            stdout=subprocess.PIPE, stderr=open(root / "server.log", "ab"),
                            text=True)
    out = Lines(proc.stdout)
    try:
        first = out.wait("listening on", timeout=60)
        assert out.lines[0] == first, out.text()
        url = first.split("listening on ")[1].split()[0]
        yield SimpleNamespace(d=d, e=e, proc=proc, out=out, url=url, log=root / "server.log")
    finally:
        stop_process(proc)
        kill_processes_under(d)


def test_admin_commands_from_any_folder_find_a_make_run_server(made_by_make_run):
    """An admin who started the server with `make run` (no config) types `nodes list`,
    `nodes drain 3`, `nodes resume 3` and `tokens create bob` from another folder,
    naming the script by its path: they act on that server's spool and tokens, beside
    gpuqueue.py, and leave nothing in the folder they were typed in."""
    m = made_by_make_run

    def admin(*args):
        r = subprocess.run([sys.executable, str(m.d / "gpuqueue.py"), *args], cwd=m.e,
                           env=admin_env(), capture_output=True, text=True, timeout=60)
        no_traceback(r)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def node(i):
        return {n["id"]: n for n in requests.get(m.url + "/api/nodes",
                                                 timeout=30).json()["nodes"]}[i]

    r = admin("nodes", "list")
    assert r.stdout.split()[:2] == ["NODE", "HOST"] and len(lines_of(r.stdout)) == 9, r.stdout
    admin("nodes", "drain", "3")
    assert node(3)["drained"] is True
    admin("nodes", "resume", "3")
    assert node(3)["drained"] is False
    r = admin("tokens", "create", "bob", "--days", "5")
    assert str(m.d / "tokens.yaml") in r.stdout, r.stdout
    token = r.stdout.strip().splitlines()[-1].split()[-1]
    assert requests.get(m.url + "/api/jobs", headers={"Authorization": f"Bearer {token}"},
                        timeout=30).status_code == 200
    assert (m.d / "spool" / "server.lock").is_file()
    assert os.listdir(m.e) == []


def test_admin_commands_from_any_folder_on_the_machines_python3(made_by_make_run, bare):
    """The same from another folder with the machine's python3 (bare, the checkout's
    .venv beside gpuqueue.py): `python3 D/gpuqueue.py nodes list` lists the running
    server's nodes, and `tokens list` its tokens file; nothing is left behind."""
    m = made_by_make_run
    for args in (["nodes", "list"], ["tokens", "list"]):
        r = subprocess.run(["sh", "-c", f'python3 "$0" {" ".join(args)}', str(m.d / "gpuqueue.py")],
                           cwd=m.e, env=bare_env(bare), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        no_traceback(r)
    assert os.listdir(m.e) == []


def test_the_banner_command_of_a_make_run_server_works_as_printed(made_by_make_run, bare):
    """The command the banner quotes ("no tokens yet: create one with '...'"), pasted
    into a shell in the server's folder with USER replaced and run by the machine's
    python3 (bare, the checkout's .venv beside gpuqueue.py), makes a working token."""
    m = made_by_make_run
    hint = m.out.wait("no tokens yet")
    quoted = re.search(r"'([^']*tokens create USER[^']*)'", hint)
    assert quoted, hint
    r = subprocess.run(["sh", "-c", quoted.group(1).replace("USER", "carol")], cwd=m.d,
                       env=bare_env(bare), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (quoted.group(1), r.stdout, r.stderr)
    no_traceback(r)
    token = r.stdout.strip().splitlines()[-1].split()[-1]
    assert requests.get(m.url + "/api/jobs", headers={"Authorization": f"Bearer {token}"},
                        timeout=30).status_code == 200


def test_the_banner_command_of_a_server_started_with_a_config_works_as_printed(main_server,
                                                                               bare):
    """A server started as `python /path/gpuqueue.py --config X serve` from its own
    folder: the command its banner quotes, pasted there and run by the machine's
    python3 (bare), makes a working token."""
    hint = main_server.out.wait("no tokens yet")
    quoted = re.search(r"'([^']*tokens create USER[^']*)'", hint)
    assert quoted, hint
    r = subprocess.run(["sh", "-c", quoted.group(1).replace("USER", "dora")],
                       cwd=main_server.dir, env=bare_env(bare), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, (quoted.group(1), r.stdout, r.stderr)
    no_traceback(r)
    token = r.stdout.strip().splitlines()[-1].split()[-1]
    assert main_server.get("/api/jobs", token).status_code == 200


# == C. A client that composes in shell scripts ============================================


def test_submit_prints_the_job_id_alone_for_a_shell_script(bare, desk, main_server):
    """`J=$(python3 gpuqueue.py submit job.py -c config.yaml)` gives J the job id: on a
    pipe, stdout is the id and a newline, nothing more; with --json it is JSON."""
    env = bare_env(bare, GPUQUEUE_URL=main_server.url, GPUQUEUE_TOKEN=main_server.token())
    r = subprocess.run(["sh", "-c", "python3 gpuqueue.py submit job.py -c config.yaml"],
                       cwd=desk, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"{JOB_ID}\n", r.stdout), r.stdout
    assert main_server.status(r.stdout.strip())["user_id"] == "alice"

    r = subprocess.run(["sh", "-c", 'J=$(python3 gpuqueue.py submit job.py -c config.yaml) '
                        '&& python3 gpuqueue.py status "$J" --json && echo "J=$J"'],
                       cwd=desk, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    record, said = r.stdout.rsplit("J=", 1)
    assert json.loads(record)["job_id"] == said.strip()

    r = subprocess.run(["sh", "-c", "python3 gpuqueue.py submit job.py -c config.yaml --json"],
                       cwd=desk, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(JOB_ID, json.loads(r.stdout)["job_id"])


def test_logs_follow_prints_both_streams_live_and_ends_with_the_jobs_status(bare, desk,
                                                                             main_server,
                                                                             tmp_path):
    """`logs JOB -f` on a running job: its stdout on stdout and its stderr on stderr
    as they are written; when the job ends with `exit 3`, the follow exits 3 and its
    last stderr line says the job failed with exit code 3."""
    gate = tmp_path / "gate"
    code = ("import os, sys, time\nprint('out one', flush=True)\n"
            "print('err one', file=sys.stderr, flush=True)\n"
            f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)\n"
            "print('out two', flush=True)\nprint('err two', file=sys.stderr, flush=True)\n"
            "sys.exit(3)\n")
    job_id = main_server.submit_ok(code, expected_time=120)["job_id"]
    main_server.wait(job_id, ("running",))
    follow = client_popen(bare, desk, main_server, "logs", job_id, "-f")
    try:
        out, err = Lines(follow.stdout), Lines(follow.stderr)
        assert out.wait("out one") == "out one\n"
        assert err.wait("err one", timeout=20) == "err one\n"
        assert main_server.status(job_id)["status"] == "running" and follow.poll() is None
        gate.write_text("go")
        assert follow.wait(60) == 3, (out.text(), err.ended())
        assert out.ended() == "out one\nout two\n"
        said = lines_of(err.ended())
        assert [line for line in said if not line.startswith("gpuqueue: ")] == [
            "err one", "err two"], said
        assert said[-1].startswith("gpuqueue: ") and job_id in said[-1], said
        assert "failed" in said[-1] and "exit code 3" in said[-1], said
        assert "Traceback" not in err.text()
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def test_logs_follow_of_an_ended_job_exits_with_its_status(bare, desk, main_server):
    """`logs JOB -f` of a job that has already ended prints its output and exits as the
    job did: 3 for `exit 3`, 128+9 for one killed by SIGKILL, 1 for one that timed out
    (it has no exit code of its own); its last stderr line says how the job ended."""
    subs = {
        "exit": main_server.submit_ok("import sys\nprint('out')\nprint('err', file=sys.stderr)\n"
                                      "sys.exit(3)\n"),
        "signal": main_server.submit_ok("import os, signal\nprint('before', flush=True)\n"
                                        "os.kill(os.getpid(), signal.SIGKILL)\n"),
        "timeout": main_server.submit_ok("import time\nprint('slow', flush=True)\n"
                                         "time.sleep(60)\n", expected_time=1),
    }
    records = {k: main_server.wait(s["job_id"], timeout=90) for k, s in subs.items()}
    assert records["exit"]["exit_code"] == 3 and records["signal"]["exit_code"] == -9, records
    assert records["timeout"]["error"] == "timeout", records
    want = {"exit": 3, "signal": 137, "timeout": 1}
    for kind, record in records.items():
        r = client(bare, desk, main_server, "logs", record["job_id"], "-f", timeout=60)
        no_traceback(r)
        assert r.returncode == want[kind] == exit_status_of(record), (kind, r.returncode,
                                                                      r.stderr)
        said = lines_of(r.stderr)
        assert said and said[-1].startswith("gpuqueue: "), (kind, said)
        assert record["job_id"] in said[-1] and record["status"] in said[-1], (kind, said)
    r = client(bare, desk, main_server, "logs", records["exit"]["job_id"], "-f", timeout=60)
    said = lines_of(r.stderr)
    assert r.stdout == "out\n", r.stdout
    assert [line for line in said if not line.startswith("gpuqueue: ")] == ["err"], said
    assert "exit code 3" in said[-1], said


def test_logs_follow_of_a_job_cancelled_meanwhile_exits_1(bare, desk, main_server):
    """Following a running job that someone cancels: the follow ends with status 1 and
    its last stderr line says the job was cancelled."""
    job_id = main_server.submit_ok("import time\nprint('started', flush=True)\ntime.sleep(120)\n",
                                   expected_time=300)["job_id"]
    follow = client_popen(bare, desk, main_server, "logs", job_id, "-f")
    try:
        out, err = Lines(follow.stdout), Lines(follow.stderr)
        out.wait("started")
        assert main_server.post(f"/api/cancel/{job_id}", main_server.token()).status_code == 200
        assert follow.wait(60) == 1, err.ended()
        said = lines_of(err.ended())
        assert said and job_id in said[-1] and "cancelled" in said[-1], said
        assert "Traceback" not in err.text()
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def test_jobs_json_is_the_apis_shape(bare, desk, main_server):
    """`jobs --json` prints what GET /api/jobs answers: an object with "jobs" (the
    status records) and "next_cursor"."""
    main_server.submit_ok("print(1)\n")
    r = client(bare, desk, main_server, "jobs", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert isinstance(got, dict) and set(got) == {"jobs", "next_cursor"}, r.stdout[:300]
    api = main_server.get("/api/jobs?limit=50", main_server.token()).json()
    assert [j["job_id"] for j in got["jobs"]] == [j["job_id"] for j in api["jobs"]]
    assert set(got["jobs"][0]) == set(api["jobs"][0])


def test_a_server_url_without_a_scheme_is_http(bare, desk, main_server):
    """GPUQUEUE_URL=127.0.0.1:PORT (no http://) works: http is assumed."""
    job_id = main_server.submit_ok("print(1)\n")["job_id"]
    bare_url = main_server.url.removeprefix("http://")
    r = client(bare, desk, main_server, "status", job_id, url=bare_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{job_id}  "), r.stdout
    r = client(bare, desk, main_server, "jobs", url=bare_url)
    assert r.returncode == 0 and job_id in r.stdout, r.stderr


def test_a_server_url_with_a_path_is_refused_in_one_line(bare, desk, main_server):
    """GPUQUEUE_URL=http://127.0.0.1:PORT/api: one stderr line saying the URL must be
    the server's root, naming the URL given; a non-zero exit, no traceback."""
    url = main_server.url + "/api"
    for args in (["jobs"], ["status", NO_JOB]):
        r = client(bare, desk, main_server, *args, url=url)
        assert r.returncode != 0, (args, r.stdout)
        no_traceback(r)
        said = lines_of(r.stderr)
        assert len(said) == 1, said
        assert "server's root" in said[0] or "root URL" in said[0], said
        assert url in said[0], said


@pytest.fixture(scope="module")
def crowded_server(tmp_path_factory):
    """A server with long listings: 150 pending jobs behind a running one on its one
    local node, 150 tokens, and 60 SSH nodes that cannot be reached (each row carries
    its error)."""
    root = tmp_path_factory.mktemp("crowded")
    known_hosts = root / "known_hosts"
    known_hosts.write_text("")
    nowhere = free_port()
    nodes = [{"id": 0, "host": "local"}] + [
        {"id": i, "host": "127.0.0.1", "port": nowhere, "user": "nobody"} for i in range(1, 61)]
    s = start_server(root / "s", nodes=nodes, known_hosts=str(known_hosts),
                     max_pending_per_user=1000)
    try:
        gate = root / "gate"
        first = s.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                            "    time.sleep(0.05)\n", expected_time=300)
        r = s.submit("print(1)\n", config=job_config("alice", 30, array=150))
        assert r.status_code == 201, r.text
        tokens = gpuqueue.Tokens(s.dir / "tokens.yaml")
        for i in range(150):
            tokens.create(f"user{i:03d}", None, 5, False)
        wait_for(lambda: sum(n["state"] == "offline" and bool(n["error"]) for n in
                             s.get("/api/nodes").json()["nodes"]) == 60,
                 "the unreachable nodes to show their errors", timeout=60)
        s.first_job = first["job_id"]
        yield s
        gate.write_text("go")
    finally:
        close_server(s)


def test_listings_piped_into_head_end_quietly(bare, desk, crowded_server):
    """`jobs | head -1`, `status ID | head -1`, `tokens list | head -1` and
    `nodes list | head -1`, with more rows than head reads: head prints the first
    line, and the command says nothing about a broken pipe and shows no traceback."""
    s = crowded_server
    user = bare_env(bare, GPUQUEUE_URL=s.url, GPUQUEUE_TOKEN=s.token())
    admin = admin_env()
    cases = [
        ([str(bare), "gpuqueue.py", "jobs"], user, desk, None),
        ([str(bare), "gpuqueue.py", "jobs", "--limit", "200"], user, desk, 8192),
        ([str(bare), "gpuqueue.py", "status", s.first_job], user, desk, None),
        ([sys.executable, str(GPUQUEUE), "--config", str(s.config_path), "tokens", "list"],
         admin, s.dir, 8192),
        ([sys.executable, str(GPUQUEUE), "--config", str(s.config_path), "nodes", "list"],
         admin, s.dir, 8192),
    ]
    for cmd, env, cwd, at_least in cases:
        whole = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                               timeout=60)
        assert whole.returncode == 0, (cmd, whole.stderr)
        if at_least:  # more than head and the pipe can take, or the test proves nothing
            assert len(whole.stdout) > at_least, (cmd, len(whole.stdout))
        status, first, err = through_head(cmd, env, cwd)
        assert first == whole.stdout.splitlines(keepends=True)[0], (cmd, first)
        assert "Traceback" not in err, (cmd, err)
        assert "brokenpipe" not in err.lower() and "broken pipe" not in err.lower(), (cmd, err)


def prefixed(r, *, usage=False):
    """The one-prefix rule: a non-zero exit, no traceback, and every stderr line that
    carries a message starts with "gpuqueue: " (with ``usage``, the usage text's own
    lines, "usage:"/"Usage:", indented ones and Click's "Try ... --help" hint, may
    come with it)."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    no_traceback(r)
    said = lines_of(r.stderr)
    assert any(line.startswith("gpuqueue: ") for line in said), r.stderr
    for line in said:
        if usage and (line.lower().startswith("usage:") or line[:1].isspace()
                      or line.startswith("Try ")):
            continue
        assert line.startswith("gpuqueue: "), (line, r.stderr)


def test_every_error_line_starts_with_gpuqueue(bare, desk, main_server):
    """Client errors (a bad token, an unknown job, a server that is down), a server
    command's error and usage errors on both halves: the line with the message starts
    with "gpuqueue: ", and there is never a traceback."""
    job_id = main_server.submit_ok("print(1)\n")["job_id"]
    prefixed(client(bare, desk, main_server, "status", job_id, token="x" * 30))
    prefixed(client(bare, desk, main_server, "status", NO_JOB))
    down = f"http://127.0.0.1:{free_port()}"
    prefixed(client(bare, desk, main_server, "jobs", url=down))
    # submit says so while it tries again, and when it gives up.
    prefixed(client(bare, desk, main_server, "submit", "job.py", "-c", "config.yaml", url=down))
    prefixed(server_command(main_server, "tokens", "revoke", "nonexistent"))
    for args in (["submit", "job.py"], ["logs"], ["jobs", "--status", "bogus"], ["frobnicate"]):
        prefixed(client(bare, desk, main_server, *args), usage=True)
    for args in (["frobnicate"], ["tokens", "frob"], ["tokens", "create"], ["nodes", "drain"]):
        prefixed(server_command(main_server, *args), usage=True)


# == D. The client survives any server =====================================================


def _http(status, ctype, body, extra=""):
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n").encode() + body


#: What each fake server answers to every request.
BAD_ANSWERS = {
    "html": _http("200 OK", "text/html; charset=utf-8",
                  b"<!doctype html><html><body><h1>Welcome to nginx!</h1></body></html>"),
    "not-http": b"\x16\x03\x01\x00\xa5 this is no HTTP at all \xff\xfe\r\n\r\n",
    "cut-short": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
                  b"Connection: close\r\n\r\n" + b'{"job_id":'),
    "json-other-shape": _http("200 OK", "application/json", b'{"foo": 1}'),
    "json-list": _http("200 OK", "application/json", b"[1, 2, 3]"),
}


class FakeServer:
    """A listening socket on 127.0.0.1 that answers every request one fixed bad way;
    ``kind`` "quiet-follow" answers a follow's headers and a few keep-alive spaces,
    then nothing, holding the connection open."""

    def __init__(self, kind):
        self.kind = kind
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(10)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            while m and len(body) < int(m.group(1)):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            if self.kind == "quiet-follow":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                for _ in range(3):
                    conn.sendall(b"1\r\n \r\n")
                    time.sleep(0.5)
                self.held.append(conn)  # and nothing more, ever
                return
            conn.sendall(BAD_ANSWERS[self.kind])
        except OSError:
            pass
        conn.close()

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


D_COMMANDS = {
    "status": ["status", NO_JOB],
    "submit": ["submit", "job.py", "-c", "config.yaml"],
    "logs -f": ["logs", "-f", NO_JOB],
    "jobs": ["jobs"],
}
D_KINDS = list(BAD_ANSWERS) + ["nothing-listens", "no-such-host"]


@pytest.fixture(scope="module")
def bad_servers(bare, desk):
    """Every client command against every bad server, all at once (submit's retries
    take seconds each); the results by (kind, command)."""
    fakes = {kind: FakeServer(kind) for kind in list(BAD_ANSWERS) + ["quiet-follow"]}
    urls = {kind: f.url for kind, f in fakes.items()}
    urls["nothing-listens"] = f"http://127.0.0.1:{free_port()}"
    urls["no-such-host"] = "http://no-such-host.invalid:8000"
    runs = {(kind, name): args for kind in D_KINDS for name, args in D_COMMANDS.items()}
    runs[("quiet-follow", "logs -f")] = D_COMMANDS["logs -f"]

    def run(key):
        env = bare_env(bare, GPUQUEUE_URL=urls[key[0]], GPUQUEUE_TOKEN="x" * 32)
        start = time.monotonic()
        try:
            r = subprocess.run([str(bare), "gpuqueue.py", *runs[key]], cwd=desk, env=env,
                               capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired as exc:
            return SimpleNamespace(timed_out=True, returncode=None, elapsed=60,
                                   stdout=str(exc.stdout or ""), stderr=str(exc.stderr or ""))
        return SimpleNamespace(timed_out=False, returncode=r.returncode, stdout=r.stdout,
                               stderr=r.stderr, elapsed=time.monotonic() - start)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(runs)) as pool:
            yield dict(zip(runs, pool.map(run, runs)))
    finally:
        for f in fakes.values():
            f.close()


@pytest.mark.parametrize("command", list(D_COMMANDS))
@pytest.mark.parametrize("kind", D_KINDS)
def test_the_client_survives_a_bad_server(bad_servers, kind, command):
    """Against a server that answers an HTML page, bytes that are not HTTP, an answer
    cut short, JSON of another shape, or against a URL with a typo (nothing listens
    there, or its host does not resolve): one or more stderr lines, the first starting
    with "gpuqueue: ", a non-zero exit, and no traceback anywhere."""
    r = bad_servers[(kind, command)]
    assert not r.timed_out, (kind, command, r.stderr)
    assert r.returncode != 0, (kind, command, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr, (kind, command, r.stderr)
    said = r.stderr.splitlines()
    assert said and said[0].startswith("gpuqueue: "), (kind, command, r.stderr)


def test_a_follow_that_goes_quiet_gives_up(bad_servers):
    """A server that starts a follow (200, NDJSON), sends a few keep-alive spaces and
    then nothing, holding the connection open: `logs -f` gives up within a minute,
    with a "gpuqueue: " line and a non-zero exit."""
    r = bad_servers[("quiet-follow", "logs -f")]
    assert not r.timed_out, f"still following after 60 s: {r.stderr!r}"
    assert r.returncode != 0 and r.elapsed < 60, (r.returncode, r.elapsed)
    no_traceback(r)
    said = r.stderr.splitlines()
    assert said and said[0].startswith("gpuqueue: "), r.stderr


def test_ctrl_c_during_submit_wait_leaves_the_job_running_and_says_how_to_reach_it(
        bare, desk, main_server, tmp_path):
    """Ctrl-C while `submit --wait` follows a long job: status 130, no traceback, the
    last stderr line names the job and how to follow it (`logs -f ID`) and cancel it
    (`cancel ID`); the job goes on running on the server."""
    (tmp_path / "long.py").write_text("import time\nprint('started', flush=True)\n"
                                      "time.sleep(120)\n")
    (tmp_path / "long.yaml").write_text(job_config("alice", 300))
    token = main_server.token()

    def running():
        return {j["job_id"] for j in main_server.get("/api/jobs?status=running",
                                                     token).json()["jobs"]}
    before = running()
    waiting = client_popen(bare, desk, main_server, "submit", str(tmp_path / "long.py"), "-c",
                           str(tmp_path / "long.yaml"), "--wait")
    job_id = None
    try:
        out, err = Lines(waiting.stdout), Lines(waiting.stderr)
        job_id = wait_for(lambda: next(iter(running() - before), None), "the job to run",
                          timeout=60)
        err.wait("running: ", timeout=60)  # the client waits for it
        assert main_server.status(job_id)["status"] == "running"
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(30) == 130
        said = lines_of(err.ended())
        assert "Traceback" not in err.text(), err.text()
        assert job_id in said[-1], said
        assert f"logs -f {job_id}" in said[-1] and f"cancel {job_id}" in said[-1], said
        assert main_server.status(job_id)["status"] == "running"
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        if job_id:
            main_server.post(f"/api/cancel/{job_id}", main_server.token())
            main_server.wait(job_id)


# == E. GPUs on SSH nodes are found, not guessed ============================================

#: A stand-in nvidia-smi with two GPUs and nothing running on them.
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu*)
    echo "0, GPU-8d3c0a1e-0000-4000-8000-000000000000, Fake A100, 0, 40960, 0"
    echo "1, GPU-8d3c0a1e-0001-4000-8000-000000000001, Fake A100, 0, 40960, 0" ;;
  *--query-compute-apps*) ;;
  *-L*)
    echo "GPU 0: Fake A100 (UUID: GPU-8d3c0a1e-0000-4000-8000-000000000000)"
    echo "GPU 1: Fake A100 (UUID: GPU-8d3c0a1e-0001-4000-8000-000000000001)" ;;
  *) echo "Fake nvidia-smi" ;;
esac
"""


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """A loopback sshd cluster and a server: SSH node 3 whose nvidia-smi lists two GPUs
    (put on its PATH by its `setup` line), SSH node 7 with no nvidia-smi, SSH node 4
    with `gpus: "0,1"`, none of them naming `gpus` otherwise, and local node 5.  Each
    node has an environment of its own (on3, on7, on4, on5), so a job can be sent
    to one node."""
    root = tmp_path_factory.mktemp("gpus")
    (root / "cluster").mkdir()
    cluster = Cluster(root / "cluster", n=3).start()
    server = None
    try:
        fake = root / "fake-bin"
        fake.mkdir()
        (fake / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
        os.chmod(fake / "nvidia-smi", 0o755)
        open_to_nodes(fake, writable=False)
        cfg = cluster.config()
        defaults = cfg.pop("node_defaults")
        nodes = [{**defaults, **n} for n in cfg.pop("nodes")]
        nodes[0].update(id=3, setup=f"export PATH={fake}:$PATH", environments=["on3"])
        nodes[1].update(id=7, environments=["on7"])
        nodes[2].update(id=4, gpus="0,1", environments=["on4"])
        nodes.append({"id": 5, "host": "local", "environments": ["on5"]})
        cfg["environments"] = {f"on{i}": {"python": "/usr/bin/python3"} for i in (3, 7, 4, 5)}
        server = start_server(root / "server", nodes=nodes, **cfg)

        def nodes_now():
            return {n["id"]: n for n in server.get("/api/nodes").json()["nodes"]}
        wait_for(lambda: all(n["state"] == "online" for n in nodes_now().values()),
                 "every node online", timeout=90)
        yield SimpleNamespace(server=server, nodes=nodes_now, root=root)
    finally:
        if server is not None:
            close_server(server)
        cluster.stop()
        kill_processes_under(root)


def _records_folder(root, name):
    folder = root / name
    folder.mkdir()
    return open_to_nodes(folder)


def test_an_ssh_nodes_gpus_come_from_its_nvidia_smi(gpu_cluster):
    """SSH node 3 names no `gpus`, and its nvidia-smi lists GPUs 0 and 1: it shows two
    GPU slots, "0" and "1", found by nvidia-smi, and two one-GPU jobs sent to it run
    at the same time with CUDA_VISIBLE_DEVICES 0 and 1."""
    # nvidia-smi is read while the node is online (every few seconds): wait for it.
    def read():
        found = gpu_cluster.nodes()[3]
        return found if found.get("gpus_from") == "nvidia-smi" else None
    try:
        node = wait_for(read, "node 3's GPUs read from its nvidia-smi", timeout=30)
    except AssertionError:
        node = gpu_cluster.nodes()[3]
    assert [s["gpu"] for s in node["gpu_slots"]] == ["0", "1"], node
    assert node.get("gpus_from") == "nvidia-smi", node
    folder = _records_folder(gpu_cluster.root, "together")
    code = (f"import os, sys, time\nfolder = {str(folder)!r}\n"
            "open(os.path.join(folder, os.environ['GPUQUEUE_JOB_ID']), 'w')"
            ".write(os.environ['CUDA_VISIBLE_DEVICES'])\n"
            "end = time.time() + 40\n"
            "while len(os.listdir(folder)) < 2:\n"
            "    if time.time() > end:\n"
            "        sys.exit('the other job did not run at the same time')\n"
            "    time.sleep(0.05)\n"
            "print(os.environ['CUDA_VISIBLE_DEVICES'])\n")
    server = gpu_cluster.server
    subs = [server.submit_ok(code, config=job_config("alice", 60, environment="on3"))
            for _ in range(2)]
    records = [server.wait(s["job_id"], timeout=120) for s in subs]
    assert [r["status"] for r in records] == ["completed", "completed"], records
    assert {r["node_id"] for r in records} == {3}
    seen = sorted(server.results(s["job_id"])["stdout"].strip() for s in subs)
    assert seen == ["0", "1"], seen


def test_an_ssh_node_without_nvidia_smi_has_gpu_0(gpu_cluster):
    """SSH node 7 names no `gpus` and has no nvidia-smi: one GPU, "0" (not its node
    id), by default; a job there sees CUDA_VISIBLE_DEVICES=0."""
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):  # what the test stands on
        assert not os.path.exists(os.path.join(folder, "nvidia-smi")), folder
    node = gpu_cluster.nodes()[7]
    assert [s["gpu"] for s in node["gpu_slots"]] == ["0"], node
    assert node.get("gpus_from") == "default", node
    server = gpu_cluster.server
    sub = server.submit_ok("import os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])\n",
                           config=job_config("alice", 30, environment="on7"))
    record = server.wait(sub["job_id"], timeout=120)
    assert record["status"] == "completed" and record["node_id"] == 7, record
    assert server.results(sub["job_id"])["stdout"] == "0\n"


def test_a_nodes_configured_gpus_say_they_come_from_the_config(gpu_cluster):
    """SSH node 4 has `gpus: "0,1"` in its config: two GPU slots, from the config."""
    node = gpu_cluster.nodes()[4]
    assert [s["gpu"] for s in node["gpu_slots"]] == ["0", "1"], node
    assert node.get("gpus_from") == "config", node


def test_a_local_node_keeps_its_id_as_its_gpu(gpu_cluster):
    """Local node 5 without `gpus` gives its job CUDA_VISIBLE_DEVICES=5, as before."""
    server = gpu_cluster.server
    sub = server.submit_ok("import os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])\n",
                           config=job_config("alice", 30, environment="on5"))
    record = server.wait(sub["job_id"], timeout=60)
    assert record["status"] == "completed" and record["node_id"] == 5, record
    assert server.results(sub["job_id"])["stdout"] == "5\n"


# == F. run_as mistakes are said, not hidden ===============================================


@pytest.fixture(scope="module")
def run_as_servers(tmp_path_factory, job_user):  # noqa: F811
    """Two servers whose every local node has run_as: "forgot" (node 0 names no
    `python`, node 1 names /usr/bin/python3) and "right" (its one node names it)."""
    root = tmp_path_factory.mktemp("run_as")
    open_to_nodes(root, writable=False)
    started = time.monotonic()
    forgot = start_server(root / "forgot", nodes=[
        {"id": 0, "host": "local", "run_as": JOB_USER},
        {"id": 1, "host": "local", "run_as": JOB_USER, "python": "/usr/bin/python3"}])
    forgot.started = started
    right = start_server(root / "right", nodes=[
        {"id": 0, "host": "local", "run_as": JOB_USER, "python": "/usr/bin/python3"}])
    yield SimpleNamespace(forgot=forgot, right=right)
    close_server(forgot)
    close_server(right)


UID_JOB = "import os\nprint(os.getuid())\n"
PYTHON_KEY = re.compile(r"['\"`]python['\"`]|\bpython:")


def test_a_run_as_node_whose_python_the_user_cannot_run_is_offline_and_says_why(
        run_as_servers, job_user):  # noqa: F811
    """A local node with run_as and no `python` key (its default interpreter lies where
    the job user cannot read): it shows offline with an error that names the
    interpreter problem and the `python` key to set, within 30 s of start, the log
    says so too, and jobs never fail there: they run on the node that works."""
    s = run_as_servers.forgot
    token = s.token()
    subs = [s.submit_ok(UID_JOB, token=token) for _ in range(4)]
    for sub in subs:
        record = s.wait(sub["job_id"], timeout=90)
        assert record["status"] == "completed", (record, s.results(sub["job_id"]))
        assert record["node_id"] == 1, record
        assert s.results(sub["job_id"])["stdout"] == f"{job_user.pw_uid}\n"
    left = max(1.0, 30 - (time.monotonic() - s.started))
    node = wait_for(lambda: (n := s.get("/api/nodes").json()["nodes"][0])["state"] == "offline"
                    and n, "node 0 offline", timeout=left)
    error = node["error"] or ""
    assert PYTHON_KEY.search(error), error
    assert "interpreter" in error.lower() or "python3" in error, error
    assert any("node 0" in line and PYTHON_KEY.search(line) for line in s.log().splitlines()), \
        s.log()
    assert "wrapper ended without a result" not in s.log()


def test_a_run_as_node_with_a_python_it_can_run_runs_jobs_as_that_user(run_as_servers,
                                                                        job_user):  # noqa: F811
    """The same node with `python: /usr/bin/python3` is online and runs a job as the
    run_as user."""
    s = run_as_servers.right
    node = wait_for(lambda: (n := s.get("/api/nodes").json()["nodes"][0])["state"] == "online"
                    and n, "node 0 online", timeout=30)
    assert node["error"] is None, node
    sub = s.submit_ok(UID_JOB)
    record = s.wait(sub["job_id"], timeout=60)
    assert record["status"] == "completed", (record, s.results(sub["job_id"]))
    assert s.results(sub["job_id"])["stdout"] == f"{job_user.pw_uid}\n"


def test_the_local_nodes_warning_is_given_only_where_it_is_true(main_server, run_as_servers):
    """"local nodes run jobs as this server's own user" is in the log of a server whose
    local nodes lack run_as, and not in that of one whose every local node has it."""
    wait_for(lambda: LOCAL_WARNING in main_server.log(), "the warning", timeout=30)
    right = run_as_servers.right
    # One job through it: the server is well past its start-up messages.
    right.wait(right.submit_ok("print(1)\n")["job_id"], timeout=60)
    assert LOCAL_WARNING not in right.log(), right.log()
    assert LOCAL_WARNING not in run_as_servers.forgot.log()


# == G. Messages ============================================================================


def test_a_submit_for_someone_else_names_both_users(main_server):
    """bob (not an admin) submits a config naming user_id mallory: 403, and the error
    names bob, the token's user, and mallory."""
    r = main_server.submit("print(1)\n", config=job_config("mallory"),
                           token=main_server.token("bob"))
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert "bob" in error and "mallory" in error, error


# == H. make cluster =========================================================================


def test_make_cluster_says_how_to_serve_it_and_what_it_does(tmp_path):
    """`make cluster` (tests/sshcluster.py FOLDER) prints a serve command whose port is
    not 8000, says that it stays in the foreground, and that it creates the
    unprivileged user gqnode."""
    folder = tmp_path / "cluster"
    proc = subprocess.Popen([sys.executable, "tests/sshcluster.py", str(folder)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(proc.stdout)
    try:
        def serve_line():
            found = next((line for line in out.text().splitlines()
                          if "gpuqueue.py" in line and re.search(r"\bserve\b", line)), None)
            if found is None and proc.poll() is not None:
                pytest.fail(f"sshcluster.py ended without a serve command: {out.text()}")
            return found
        serve = wait_for(serve_line, "the serve command", timeout=120)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        said = out.ended(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_naming(folder)
    assert "gpuqueue.py" in serve, serve
    port = re.search(r"--port[ =](\d+)", serve)
    if port is None:
        config = re.search(r"--config[ =](\S+)", serve)
        assert config, serve
        port = yaml.safe_load((ROOT / config.group(1)).read_text()).get("port")
        assert port is not None, f"no --port in {serve!r} and no port in its config"
    else:
        port = int(port.group(1))
    assert int(port) != 8000, serve
    assert "foreground" in said.lower(), said
    assert any("gqnode" in line and "user" in line.lower() for line in said.splitlines()), said
