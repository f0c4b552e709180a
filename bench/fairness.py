"""6. Fair share: user A submits 200 jobs, then user B submits 5, on 8 local nodes.
B's last job must finish within 2 x (B's work / nodes + one job) of B's first submit.

The baseline, from the same run, is what a first-come-first-served queue would have
made B wait: until A's last job finished (B's work queued behind all of A's).
"""
import time
from datetime import datetime

import requests

from common import Row, Server, all_jobs, job_config, kill_processes_under, workdir

NODES = 8
A_JOBS = 200
B_JOBS = 5
SECONDS = 0.5  # every job's run time, and its expected_time


def finished(job):
    return datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")).timestamp()


def run():
    root = workdir("fairness")
    server = Server(root / "s", nodes=NODES, max_pending_per_user=1000).start()
    try:
        s = requests.Session()
        tokens = {u: server.token(u) for u in ("a", "b")}

        def submit(user):
            r = s.post(server.url + "/api/submit",
                       headers={"Authorization": f"Bearer {tokens[user]}"},
                       files={"code": ("j.py", f"import time\ntime.sleep({SECONDS})\n"),
                              "config_file": ("c.yaml", job_config(user, SECONDS))})
            assert r.status_code == 201, r.text

        for _ in range(A_JOBS):
            submit("a")
        b_start = time.time()
        for _ in range(B_JOBS):
            submit("b")
        while s.get(server.url + "/").json()["queue_length"] or any(
                n["running_job"] for n in s.get(server.url + "/api/nodes").json()["nodes"]):
            time.sleep(0.1)
        jobs = {u: all_jobs(s, server, t) for u, t in tokens.items()}
    finally:
        server.kill()
        kill_processes_under(root)
    assert all(j["status"] == "completed" for js in jobs.values() for j in js)
    b_wait = max(finished(j) for j in jobs["b"]) - b_start
    fifo_wait = max(finished(j) for j in jobs["a"]) - b_start + B_JOBS * SECONDS / NODES
    bound = 2 * (B_JOBS * SECONDS / NODES + SECONDS)
    print(f"6. fair share (A: {A_JOBS} jobs, then B: {B_JOBS}; {SECONDS} s each; {NODES} local "
          f"nodes; bound for B {bound:.2f} s)")
    return [Row("fairness", "B's wait for its last job vs first-come-first-served", fifo_wait,
                b_wait, b_wait / fifo_wait, "", "s").show(),
            Row("fairness", "B's wait vs 2 x (B's work / nodes + one job)", bound, b_wait,
                b_wait / bound, "<= 1", "s").show()]


if __name__ == "__main__":
    run()
