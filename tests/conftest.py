"""Fixtures that drive a real gpuqueue server: a subprocess on 127.0.0.1 speaking real HTTP."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
GPUQUEUE = ROOT / "gpuqueue.py"
FINAL = ("completed", "failed", "cancelled")

# A suite started in the background by a script (``cmd &``) inherits SIGINT
# ignored, and so would every server, agent, job and client it starts: the tests that
# press Ctrl-C would find it pressed in vain.  A handler here is reset to the default
# in each program the suite starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def job_config(user="alice", expected_time=30, **extra):
    cfg = {"competition_id": "comp123", "project_id": "proj456", "user_id": user,
           "expected_time": expected_time, **extra}
    return yaml.safe_dump(cfg)


class Server:
    """A gpuqueue server process with its own spool, tokens file and config."""

    def __init__(self, tmp, nodes=8, **settings):
        self.dir = Path(tmp)
        self.dir.mkdir()
        self.config_path = self.dir / "gpuqueue.yaml"
        cfg = {"host": "127.0.0.1", "port": 0, "spool": "spool", "tokens": "tokens.yaml",
               "kill_grace": 1, "timeout_multiplier": 2, "min_free_bytes": 0,
               # The suites try many bad tokens on purpose; the throttle has tests of its own.
               "auth_failures_per_minute": 100000,
               "nodes": nodes if isinstance(nodes, list) else [{"id": i, "host": "local"} for i in range(nodes)],
               **settings}
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.proc = None
        self.url = None
        self._tokens = {}

    # -- process -------------------------------------------------------------

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(GPUQUEUE), "--config", str(self.config_path), "serve"],
            cwd=self.dir, stdout=subprocess.PIPE, stderr=open(self.dir / "server.log", "ab"),
            text=True)
        line = self.proc.stdout.readline()
        assert "listening on" in line, f"server did not start: {line!r}\n{self.log()}"
        self.url = line.split("listening on ")[1].split()[0]
        return self

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def log(self):
        try:
            return (self.dir / "server.log").read_text()
        except OSError:
            return ""

    def cli(self, *args, check=True):
        r = subprocess.run([sys.executable, str(GPUQUEUE), "--config", str(self.config_path), *args],
                           cwd=self.dir, capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    # -- tokens --------------------------------------------------------------

    def token(self, user="alice", admin=False):
        """A fresh token for ``user``, made with the real CLI (cached per user)."""
        key = (user, admin)
        if key not in self._tokens:
            args = ["tokens", "create", user, "--days", "5"] + (["--admin"] if admin else [])
            out = self.cli(*args).stdout
            self._tokens[key] = out.strip().splitlines()[-1].split()[-1]
        return self._tokens[key]

    # -- HTTP ----------------------------------------------------------------

    def get(self, path, token=None, **kw):
        return requests.get(self.url + path, headers=_auth(token), timeout=30, **kw)

    def post(self, path, token=None, **kw):
        return requests.post(self.url + path, headers=_auth(token), timeout=60, **kw)

    def submit(self, code, config=None, token=None, user="alice", expected_time=30):
        """Submit a job; ``token`` defaults to a fresh token of ``user``, sent as Bearer."""
        if token is None:
            token = self.token(user)
        config = config if config is not None else job_config(user, expected_time)
        return self.post("/api/submit", token,
                         files={"code": ("job.py", code), "config_file": ("config.yaml", config)})

    def submit_ok(self, code, **kw):
        r = self.submit(code, **kw)
        assert r.status_code == 201, r.text
        return r.json()

    def status(self, job_id, token=None, user="alice"):
        r = self.get(f"/api/status/{job_id}", token or self.token(user))
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id, states=FINAL, timeout=60, user="alice", token=None):
        """Poll a job's status until it is in ``states`` (a generous bound, not a timing test);
        a finished job also until its files are back (the spool is still then)."""
        end = time.monotonic() + timeout
        while True:
            st = self.status(job_id, token=token, user=user)
            if st["status"] in states and not (st["status"] in FINAL
                                               and st.get("outputs") == "collecting"):
                return st
            assert time.monotonic() < end, f"job {job_id} stuck in {st}\n{self.log()}"
            time.sleep(0.05)

    def results(self, job_id, user="alice"):
        r = self.get(f"/api/results/{job_id}", self.token(user))
        assert r.status_code == 200, r.text
        return r.json()

    def spool_files(self):
        """Every path under the spool, for 'nothing written' checks; lock and pid files
        and local nodes' workdirs (which the agents and jobs write) are left out."""
        root = self.dir / "spool"
        skip = {"server.lock", "server.pid"}
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.name not in skip and "work" not in p.relative_to(root).parts[2:3])


def _auth(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


def kill_processes_under(path):
    """Kill job processes whose working folder is under ``path`` (they outlive the server)."""
    path = str(path)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(path):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


#: A job that forks a grandchild which ignores SIGTERM, and writes both pids to PIDS
#: (prepend "PIDS = '...'"), to prove a kill reaches the whole process group.
GRANDCHILD = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(300)"])
with open(PIDS, "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
print("started", flush=True)
time.sleep(300)
"""


def wait_for(predicate, what="a condition", timeout=30):
    """Poll ``predicate`` until it is truthy, and return it (a generous bound, not a
    timing test)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def job_pids(path):
    """The pids a GRANDCHILD job wrote, once it has written them."""
    end = time.monotonic() + 30
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < end
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


def agent_pids(workdir):
    """Pids of node agents working in ``workdir``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if any(b"gq_node-" in c for c in cmd) and os.readlink(f"/proc/{pid}/cwd") == str(workdir):
                found.append(int(pid))
        except OSError:
            pass
    return found


def alive(pid):
    """True if ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(nodes=8, start=True, **settings):
        s = Server(tmp_path / f"s{len(servers)}", nodes=nodes, **settings)
        servers.append(s)
        return s.start() if start else s

    yield make
    for s in servers:
        s.kill()
    kill_processes_under(tmp_path)


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (tests/browser.py), closed after the test."""
    from browser import Browser
    b = Browser(tmp_path / "chromium-profile")
    yield b
    b.close()
