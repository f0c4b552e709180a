"""What every benchmark shares: a real server, the loopback sshd cluster, timing helpers.

Benchmarks measure; they assert nothing. Each prints the baseline it measured in the same
run, gpuqueue's figure and their ratio, and returns rows for bench/RESULTS.md.
"""
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server, job_config, kill_processes_under  # noqa: E402
from sshcluster import Cluster  # noqa: E402

__all__ = ["Server", "Cluster", "job_config", "kill_processes_under", "workdir", "pct",
           "median", "timed", "machine", "Row"]


def workdir(name):
    return Path(tempfile.mkdtemp(prefix=f"gpuqueue-bench-{name}-"))


def pct(values, p):
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def timed(fn, n):
    """Milliseconds each of ``n`` calls of ``fn`` took."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def median(values):
    return statistics.median(values)


def machine():
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


class Row(dict):
    """One line of the results table: benchmark, metric, baseline, gpuqueue, ratio, target."""

    def __init__(self, bench, metric, baseline, value, ratio=None, target="", unit=""):
        super().__init__(bench=bench, metric=metric, baseline=baseline, value=value,
                         ratio=ratio, target=target, unit=unit)

    def show(self):
        def fmt(v):
            return "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        print(f"  {self['metric']:<38} baseline {fmt(self['baseline']):>9} {self['unit']:<6}"
              f" gpuqueue {fmt(self['value']):>9} {self['unit']:<6} ratio {fmt(self['ratio']):>6}"
              f"  {self['target']}", flush=True)
        return self


def closed_port():
    """A loopback port nothing listens on: SSH nodes there stay offline, so queued jobs
    stay queued and no job competes with the server for the CPU."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_nodes(n=8):
    port = closed_port()
    return [{"id": i, "host": "127.0.0.1", "port": port} for i in range(n)]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def all_jobs(session, server, token):
    jobs, cursor = [], None
    while True:
        q = "/api/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else "")
        page = session.get(server.url + q, headers={"Authorization": f"Bearer {token}"}).json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return jobs


def submit_sleeper(session, server, token, seconds, expected, **job):
    """Submit a job that sleeps ``seconds`` and says it expects ``expected``."""
    r = session.post(server.url + "/api/submit", headers={"Authorization": f"Bearer {token}"},
                     files={"code": ("j.py", f"import time\ntime.sleep({seconds:.3f})\n"),
                            "config_file": ("c.yaml", job_config("alice", round(expected, 3),
                                                                 **job))})
    assert r.status_code == 201, r.text


def drained_jobs(session, server, token):
    """Every job, once the queue is empty and no node runs one (the benchmarks that
    measure a whole workload end here)."""
    while session.get(server.url + "/").json()["queue_length"] or any(
            n["running_jobs"] for n in session.get(server.url + "/api/nodes").json()["nodes"]):
        time.sleep(0.1)
    return all_jobs(session, server, token)
