"""7. Idle time between jobs, and a drain against task-spooler.

Idle gap: 8 nodes, 8 x ROUNDS short jobs submitted at once. Each job prints time.time()
on its first line and again on its last, so on each node the gap between one job's
last line and the next job's first line is the time the node sat idle between two
jobs: the server noticing the end, storing the result, claiming the next job and
starting its interpreter. A gap counts only while at least 8 jobs had not yet started
(so at least one was still waiting in the queue) and every submit had been accepted:
the tail of the run, and the start while the queue fills, do not count. Measured on 8
local nodes and on 8 SSH nodes (the loopback sshd cluster, through the jump host); the
SSH gap is the baseline. Target: the local gap <= the SSH gap.

Drain: 96 jobs of 0.5 s on 8 slots, from the first submit to the last job finished,
polled every 50 ms, through task-spooler (`tsp -S 8`, a private socket) and through
gpuqueue with 8 local nodes (polling the queue length and the nodes' running jobs).
Both run the jobs with the same Python interpreter.
Target: gpuqueue <= 1.1 x task-spooler. The same with 0.1 s jobs is reported too.
"""
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import requests

from common import (Cluster, Row, Server, all_jobs, job_config, kill_processes_under, median,
                    pct, workdir)

NODES = 8
ROUNDS = 12           # jobs per node in the idle-gap runs
GAP_SLEEP = 0.2
GAP_JOB = ("import time\nprint(time.time(), flush=True)\n"
           f"time.sleep({GAP_SLEEP})\nprint(time.time())\n")
DRAIN_JOBS = 96
POLL = 0.05
DEADLINE = 90         # seconds any one run may take before the benchmark gives up
FINAL = ("completed", "failed", "cancelled")


# -- idle gap --------------------------------------------------------------------------

def _wait_online(s, server):
    end = time.monotonic() + 60
    while not all(n["state"] == "online"
                  for n in s.get(server.url + "/api/nodes", timeout=10).json()["nodes"]):
        if time.monotonic() > end:
            raise RuntimeError(f"nodes did not come online\n{server.log()[-2000:]}")
        time.sleep(0.05)


def _wait_final(s, server, token, count):
    """Poll until ``count`` jobs are final; the jobs, and when that was seen. The poll
    asks for the queue length and the nodes' running jobs, a few hundred bytes; the
    job list, which grows with the jobs, is fetched only to confirm."""
    end = time.monotonic() + DEADLINE
    while True:
        # Jobs only move from the queue to running to done: an empty queue, then no
        # running job, means every job is done.
        if (not s.get(server.url + "/", timeout=10).json()["queue_length"]
                and not any(n.get("running_job") for n in
                            s.get(server.url + "/api/nodes", timeout=10).json()["nodes"])):
            seen = time.perf_counter()
            jobs = all_jobs(s, server, token)
            if len(jobs) >= count and all(j["status"] in FINAL for j in jobs):
                return jobs, seen
        if time.monotonic() > end:
            raise RuntimeError(f"jobs not finished after {DEADLINE} s\n{server.log()[-2000:]}")
        time.sleep(POLL)


def gaps(server, job=GAP_JOB, nodes=NODES, rounds=ROUNDS):
    """Idle gaps (ms) between consecutive jobs on the same node, on a started server
    with ``nodes`` nodes, ``rounds`` jobs each; ``job`` prints time.time() first and
    last."""
    token = server.token("alice")
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    _wait_online(s, server)
    cfg = job_config("alice", 10)
    for _ in range(nodes * rounds):
        r = s.post(server.url + "/api/submit", timeout=30,
                   files={"code": ("j.py", job), "config_file": ("c.yaml", cfg)})
        if r.status_code != 201:
            raise RuntimeError(f"submit refused: {r.status_code} {r.text}")
    submitted = time.time()
    jobs, _ = _wait_final(s, server, token, nodes * rounds)
    runs = []  # (node, first line, last line)
    for j in jobs:
        res = s.get(f"{server.url}/api/results/{j['job_id']}", timeout=30).json()
        lines = res["stdout"].split()
        if res["status"] != "completed" or len(lines) != 2:
            raise RuntimeError(f"job {j['job_id']} {res['status']}: {res}")
        runs.append((j["node_id"], float(lines[0]), float(lines[1])))
    firsts = [f for _, f, _ in runs]
    by_node = defaultdict(list)
    for node, first, last in runs:
        by_node[node].append((first, last))
    out = []
    for spans in by_node.values():
        spans.sort()
        for (_, last), (first, _) in zip(spans, spans[1:]):
            waiting = sum(1 for f in firsts if f > last)
            if last > submitted and waiting >= nodes:
                out.append((first - last) * 1000)
    return out, len(by_node)


def local_gaps(root):
    server = Server(root / "local", nodes=NODES, max_pending_per_user=10 ** 6).start()
    try:
        return gaps(server)
    finally:
        server.kill()
        kill_processes_under(root)


def ssh_gaps(root):
    (root / "c").mkdir()
    cluster = Cluster(root / "c", n=NODES).start()
    try:
        server = Server(root / "ssh", max_pending_per_user=10 ** 6, **cluster.config()).start()
        try:
            return gaps(server)
        finally:
            server.kill()
    finally:
        cluster.stop()
        kill_processes_under(root)


# -- drain against task-spooler --------------------------------------------------------

def find_tsp():
    """task-spooler's command: `tsp` on Debian, `ts` elsewhere (moreutils also has a
    `ts`, which is something else: check the version line)."""
    for name in ("tsp", "ts"):
        path = shutil.which(name)
        if not path:
            continue
        try:
            out = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=5,
                                 stdin=subprocess.DEVNULL, env=_tsp_env("/nonexistent"))
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "spooler" in (out.stdout + out.stderr).lower():
            return path
    return None


def _tsp_env(folder):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TS_")}  # no mail, hooks or saved lists from outside
    env.update(TS_SOCKET=os.path.join(folder, "tsp.sock"), TMPDIR=str(folder),
               TS_MAXFINISHED="100000", TS_SLOTS=str(NODES))
    return env


def tsp_drain(tsp, root, sleep):
    """Seconds from the first `tsp` submit until `tsp -l` shows every job finished."""
    folder = root / f"tsp-{sleep}"
    folder.mkdir()
    env = _tsp_env(folder)

    def call(*args):
        return subprocess.run([tsp, *args], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)

    try:
        call("-S", str(NODES))  # starts the server with 8 slots, before the clock
        code = f"import time; time.sleep({sleep})"
        t0 = time.perf_counter()
        for _ in range(DRAIN_JOBS):
            call(sys.executable, "-c", code)
        end = time.monotonic() + DEADLINE
        while True:
            states = [line.split()[1] for line in call("-l").stdout.splitlines()[1:]
                      if line.strip()]
            if len(states) >= DRAIN_JOBS and all(st in ("finished", "skipped") for st in states):
                total = time.perf_counter() - t0
                break
            if time.monotonic() > end:
                raise RuntimeError(f"tsp: jobs not finished after {DEADLINE} s: {states}")
            time.sleep(POLL)
        failed = [line for line in call("-l").stdout.splitlines()[1:]
                  if line.split()[1:2] == ["finished"] and line.split()[3] != "0"]
        if failed:
            raise RuntimeError(f"tsp: jobs failed: {failed[:3]}")
        return total
    finally:
        try:
            call("-K")
        except (OSError, subprocess.TimeoutExpired):
            pass
        kill_processes_under(folder)


def gpuqueue_drain(server, sleep):
    """Seconds from the first submit until every job is seen final (see _wait_final)."""
    token = server.token("alice")
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    _wait_online(s, server)
    before = len(all_jobs(s, server, token))
    cfg = job_config("alice", 10)
    code = f"import time\ntime.sleep({sleep})\n"
    t0 = time.perf_counter()
    for _ in range(DRAIN_JOBS):
        r = s.post(server.url + "/api/submit", timeout=30,
                   files={"code": ("j.py", code), "config_file": ("c.yaml", cfg)})
        if r.status_code != 201:
            raise RuntimeError(f"submit refused: {r.status_code} {r.text}")
    jobs, done = _wait_final(s, server, token, before + DRAIN_JOBS)
    bad = [j for j in jobs if j["status"] != "completed"]
    if bad:
        raise RuntimeError(f"jobs did not complete: {bad[:3]}")
    return done - t0


# -- run -------------------------------------------------------------------------------

def run():
    root = workdir("idle")
    try:
        local, local_nodes = local_gaps(root)
        ssh, ssh_nodes = ssh_gaps(root)
        tsp = find_tsp()
        if not tsp:
            print("   task-spooler (tsp) is missing: its baseline is left out "
                  "(`make tsp` installs it)")
        drains = {}
        server = Server(root / "drain", nodes=NODES, max_pending_per_user=10 ** 6).start()
        try:
            for sleep in (0.5, 0.1):
                base = tsp_drain(tsp, root, sleep) if tsp else None
                drains[sleep] = (base, gpuqueue_drain(server, sleep))
        finally:
            server.kill()
    finally:
        kill_processes_under(root)
    print(f"7. idle gap between jobs ({NODES} nodes x {ROUNDS} jobs of {GAP_SLEEP} s; gaps "
          f"counted while work waited: {len(local)} local on {local_nodes} nodes, {len(ssh)} "
          f"SSH on {ssh_nodes} nodes), and a drain of {DRAIN_JOBS} jobs on {NODES} slots "
          f"against task-spooler")
    rows = [
        Row("idle", "idle gap, local nodes (median)", median(ssh), median(local),
            median(local) / median(ssh), "≤ 1", "ms").show(),
        Row("idle", "idle gap, local nodes (p90)", pct(ssh, 90), pct(local, 90),
            pct(local, 90) / pct(ssh, 90), "", "ms").show(),
    ]
    for sleep, target in ((0.5, "≤ 1.1"), (0.1, "")):
        base, ours = drains[sleep]
        rows.append(Row("idle", f"drain {DRAIN_JOBS}×{sleep} s on {NODES} slots", base, ours,
                        ours / base if base else None, target, "s").show())
    return rows


if __name__ == "__main__":
    run()
