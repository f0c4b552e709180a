"""7. Idle time between jobs, and a drain against task-spooler.

Idle gap: with the queue backed up, the time from one job's last line to the next job's
first line on the same GPU (each job prints time.time() first and last). The baseline is
the least any runner could do between two jobs: a bare start and exit of the very
interpreter the jobs run with, on the same node, measured in the same run by a job
there (a median of 30 `python -c pass`). Measured on one node (gpuqueue's own cost,
nothing else running) and on 8 nodes at once (2 cores: the interpreters' own start-up
then competes for the CPU), local and SSH (the loopback sshd cluster, through the jump
host). A gap counts only while other jobs still waited. Targets: median <= 1.2 x the
bare start, p99 <= 3 x. On 8 nodes the ratio is given twice: against one bare start
alone, and against the bare starts of all 8 nodes at once (the same job on each, at
the same time: what an interpreter's start costs on these 2 cores when every node starts
one, as their gaps do).

Drain: 200 jobs of 0.1 s, and of 0.5 s, on 8 slots, from the first submit to the last
job finished, polled every 50 ms, through task-spooler (`tsp -S 8`, a private socket)
and through gpuqueue with 8 local nodes. Both run the jobs with the same interpreter,
the one gpuqueue's local nodes use (the machine's python3). Targets: <= 1.05 x
task-spooler for 0.1 s jobs, <= 1.0 x for 0.5 s jobs.
"""
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import requests

from common import (ROOT, Cluster, Row, Server, all_jobs, job_config, kill_processes_under,
                    median, pct, workdir)

sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402  (the interpreter local jobs run with)

NODES = 8
GAP_ROUNDS = {1: 24, NODES: 8}  # jobs per node, by the number of nodes
GAP_SLEEP = {1: 0.3, NODES: 1.0}  # long enough that 8 nodes do not saturate 2 cores
DRAIN_JOBS = 200
POLL = 0.05
DEADLINE = 180        # seconds any one run may take before the benchmark gives up
FINAL = ("completed", "failed", "cancelled")
BARE_JOB = ("import statistics, subprocess, sys, time\nruns = []\nfor _ in range(30):\n"
            "    t = time.perf_counter()\n    subprocess.run([sys.executable, '-c', 'pass'])\n"
            "    runs.append((time.perf_counter() - t) * 1000)\nprint(statistics.median(runs))\n")


def session(server):
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {server.token('alice')}"
    end = time.monotonic() + 60
    while not all(n["state"] == "online"
                  for n in s.get(server.url + "/api/nodes", timeout=10).json()["nodes"]):
        if time.monotonic() > end:
            raise RuntimeError(f"nodes did not come online\n{server.log()[-2000:]}")
        time.sleep(0.05)
    return s


def _submit(s, server, code, expected=10):
    r = s.post(server.url + "/api/submit", timeout=30,
               files={"code": ("j.py", code), "config_file": ("c.yaml",
                                                            job_config("alice", expected))})
    if r.status_code != 201:
        raise RuntimeError(f"submit refused: {r.status_code} {r.text}")
    return r.json()["job_id"]


def _wait_final(s, server, count):
    """Poll until ``count`` jobs are final; the jobs, and when that was seen. The poll
    asks for the queue length and the nodes' running jobs, a few hundred bytes; the
    job list, which grows with the jobs, is fetched only to confirm."""
    end = time.monotonic() + DEADLINE
    while True:
        if (not s.get(server.url + "/", timeout=10).json()["queue_length"]
                and not any(n.get("running_jobs") or n.get("prepared_jobs") for n in
                            s.get(server.url + "/api/nodes", timeout=10).json()["nodes"])):
            seen = time.perf_counter()
            jobs = all_jobs(s, server, s.headers["Authorization"].split()[1])
            if len(jobs) >= count and all(j["status"] in FINAL for j in jobs):
                return jobs, seen
        if time.monotonic() > end:
            raise RuntimeError(f"jobs not finished after {DEADLINE} s\n{server.log()[-2000:]}")
        time.sleep(POLL)


def bare_start(s, server, nodes=1):
    """Milliseconds of a bare start and exit of the jobs' interpreter, on node 0; or
    on ``nodes`` idle nodes at once (each takes one): the median of theirs."""
    ids = [_submit(s, server, BARE_JOB) for _ in range(nodes)]
    _wait_final(s, server, len(all_jobs(s, server, s.headers["Authorization"].split()[1])))
    return median([float(s.get(f"{server.url}/api/results/{job_id}", timeout=30).json()["stdout"])
                   for job_id in ids])


def gaps(s, server, nodes, rounds=None, job=None):
    """Idle gaps (ms) between consecutive jobs on the same node; ``job`` prints
    time.time() first and last (by default it sleeps GAP_SLEEP in between)."""
    rounds = rounds or GAP_ROUNDS[nodes]
    if job is None:
        job = (f"import time\nprint(time.time(), flush=True)\ntime.sleep({GAP_SLEEP[nodes]})\n"
               "print(time.time())\n")
    before = len(all_jobs(s, server, s.headers["Authorization"].split()[1]))
    ids = {_submit(s, server, job, expected=2) for _ in range(nodes * rounds)}
    submitted = time.time()
    jobs, _ = _wait_final(s, server, before + nodes * rounds)
    runs = []  # (node, first line, last line)
    for j in jobs:
        if j["job_id"] not in ids:
            continue
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
            if last > submitted and sum(1 for f in firsts if f > last) >= nodes:
                out.append((first - last) * 1000)
    return out


def local_run(root, nodes):
    server = Server(root / f"local{nodes}", nodes=nodes, max_pending_per_user=10 ** 6).start()
    try:
        s = session(server)
        return bare_start(s, server), bare_start(s, server, nodes), gaps(s, server, nodes)
    finally:
        server.kill()
        kill_processes_under(root)


def ssh_run(root, nodes):
    (root / f"c{nodes}").mkdir()
    cluster = Cluster(root / f"c{nodes}", n=nodes).start()
    try:
        server = Server(root / f"ssh{nodes}", max_pending_per_user=10 ** 6,
                        **cluster.config()).start()
        try:
            s = session(server)
            return bare_start(s, server), bare_start(s, server, nodes), gaps(s, server, nodes)
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


def tsp_drain(tsp, root, sleep, python):
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
            call(python, "-c", code)
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
    s = session(server)
    before = len(all_jobs(s, server, s.headers["Authorization"].split()[1]))
    code = f"import time\ntime.sleep({sleep})\n"
    t0 = time.perf_counter()
    for _ in range(DRAIN_JOBS):
        _submit(s, server, code, expected=10)
    jobs, done = _wait_final(s, server, before + DRAIN_JOBS)
    bad = [j for j in jobs if j["status"] != "completed"]
    if bad:
        raise RuntimeError(f"jobs did not complete: {bad[:3]}")
    return done - t0


# -- run -------------------------------------------------------------------------------

def run():
    root = workdir("idle")
    rows = []
    try:
        for kind, measure in (("local", local_run), ("SSH", ssh_run)):
            for nodes in (1, NODES):
                bare, together, found = measure(root, nodes)
                where = "one node" if nodes == 1 else f"{nodes} nodes at once"
                print(f"7. idle gap, {kind}, {where}: {len(found)} gaps; the jobs' interpreter "
                      f"starts and exits bare in {bare:.1f} ms there"
                      + (f", {together:.1f} ms while every node starts one" if nodes > 1 else ""))
                rows += [Row("idle", f"idle gap, {kind}, {where} (median)", bare,
                             median(found), median(found) / bare, "<= 1.2", "ms").show(),
                         Row("idle", f"idle gap, {kind}, {where} (p99)", bare,
                             pct(found, 99), pct(found, 99) / bare, "<= 3", "ms").show()]
                if nodes > 1:
                    rows += [Row("idle", f"idle gap, {kind}, {where} (median), vs {nodes} bare "
                                 "starts at once", together, median(found),
                                 median(found) / together, "<= 1.2", "ms").show(),
                             Row("idle", f"idle gap, {kind}, {where} (p99), vs {nodes} bare "
                                 "starts at once", together, pct(found, 99),
                                 pct(found, 99) / together, "<= 3", "ms").show()]
        tsp = find_tsp()
        if not tsp:
            print("   task-spooler (tsp) is missing: its baseline is left out "
                  "(`make tsp` installs it)")
        python = gpuqueue.system_python()
        server = Server(root / "drain", nodes=NODES, max_pending_per_user=10 ** 6).start()
        try:
            for sleep, target in ((0.1, "<= 1.05"), (0.5, "<= 1.0")):
                base = tsp_drain(tsp, root, sleep, python) if tsp else None
                ours = gpuqueue_drain(server, sleep)
                rows.append(Row("idle", f"drain {DRAIN_JOBS}×{sleep} s on {NODES} slots, "
                                "task-spooler vs gpuqueue", base, ours,
                                ours / base if base else None, target, "s").show())
        finally:
            server.kill()
    finally:
        kill_processes_under(root)
    return rows


if __name__ == "__main__":
    run()
