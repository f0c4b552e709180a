"""3. Drain rate: 2,000 jobs of 10-100 ms across 8 SSH nodes (the loopback sshd cluster,
through the jump host). Completed jobs per second against the ideal, 8 / mean job time.
Target: >= 0.8 of ideal.

The jobs are queued while the jump host is down, then the nodes drain them; the rate
is taken from the moment all nodes are back online (or the 10th percentile of finish
times, if later) to the 90th percentile, so that the nodes coming back one by one and
the last stragglers do not count. On a machine with
few cores the nodes' job interpreters compete with the server for the CPU, which the
ideal does not account for: the report shows the core count, and a second baseline,
the same jobs run by 8 plain local loops with no queue and no SSH at all, shows what
this machine can do at best.
"""
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import requests

from common import Cluster, Row, Server, all_jobs, job_config, kill_processes_under, workdir

JOBS = 2000
NODES = 8


def run():
    rng = random.Random(42)
    sleeps = [rng.uniform(0.01, 0.1) for _ in range(JOBS)]
    ideal = NODES / (sum(sleeps) / JOBS)
    root = workdir("drain")
    (root / "c").mkdir()
    cluster = Cluster(root / "c", n=NODES).start()
    try:
        server = Server(root / "s", max_pending_per_user=10 ** 9, **cluster.config()).start()
        token = server.token("alice")
        s = requests.Session()
        auth = {"Authorization": f"Bearer {token}"}
        end = time.monotonic() + 60
        while not all(n["state"] == "online"
                      for n in s.get(server.url + "/api/nodes").json()["nodes"]):
            assert time.monotonic() < end, "nodes did not come online"
            time.sleep(0.1)
        # Queue everything first (jump host down, so nothing starts), then let the
        # nodes drain it: submitting does not compete with dispatching for the CPU.
        cluster.jump.stop()
        cfg = job_config("alice", 10)
        t0 = time.perf_counter()
        for d in sleeps:
            r = s.post(server.url + "/api/submit", headers=auth,
                       files={"code": ("j.py", f"import time\ntime.sleep({d:.4f})\n"),
                              "config_file": ("c.yaml", cfg)})
            assert r.status_code == 201, r.text
        submitted = time.perf_counter() - t0
        cluster.jump.start()
        t0 = time.perf_counter()
        while not all(n["state"] == "online"
                      for n in s.get(server.url + "/api/nodes").json()["nodes"]):
            time.sleep(0.05)
        all_online = time.time()
        cpu_before = _cpu_ticks()
        while s.get(server.url + "/").json()["queue_length"] or any(
                n["running_job"] for n in s.get(server.url + "/api/nodes").json()["nodes"]):
            time.sleep(0.5)
        total = time.perf_counter() - t0
        busy = _busy(cpu_before, _cpu_ticks())
        jobs = all_jobs(s, server, token)
        server.kill()
    finally:
        cluster.stop()
        kill_processes_under(root)
    failed = [j for j in jobs if j["status"] != "completed"]
    assert not failed, failed[:3]
    from datetime import datetime
    ends = sorted(datetime.fromisoformat(j["finished_at"].replace("Z", "+00:00")).timestamp()
                  for j in jobs)
    hi = ends[len(ends) * 9 // 10]
    lo = max(all_online, ends[len(ends) // 10])
    rate = sum(1 for e in ends if lo < e <= hi) / (hi - lo)
    print(f"3. drain rate ({JOBS} jobs of 10-100 ms on {NODES} SSH nodes; queued in "
          f"{submitted:.1f} s, drained {total:.1f} s after the jump host came back; "
          f"CPU busy {busy:.0%} of {os.cpu_count()} cores while draining)")
    ceiling = local_loops(sleeps)
    return [Row("drain", "completed jobs per second", ideal, rate, rate / ideal, ">= 0.8",
                "jobs/s").show(),
            Row("drain", "vs 8 local loops, no queue (this machine's best)", ceiling, rate,
                rate / ceiling, "", "jobs/s").show()]


def local_loops(sleeps):
    """Jobs per second when NODES threads each start the jobs' interpreters locally,
    one after another: no server, no SSH, no spool."""
    todo = list(sleeps)
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as d:
        def loop(i):
            path = os.path.join(d, f"j{i}.py")
            while True:
                with lock:
                    if not todo:
                        return
                    s = todo.pop()
                with open(path, "w") as f:
                    f.write(f"import time\ntime.sleep({s:.4f})\n")
                subprocess.run([sys.executable, path], check=True)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(NODES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(sleeps) / (time.perf_counter() - t0)


def _cpu_ticks():
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _busy(before, after):
    return (after[0] - before[0]) / max(1, after[1] - before[1])


if __name__ == "__main__":
    run()
