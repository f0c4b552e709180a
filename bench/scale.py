"""4. Scale: a spool with 1,000,000 finished and 10,000 pending jobs.

Status p50/p99, a jobs-list page p50/p99, submit p50, server start-up time and RSS, at
10k, 100k and 1M finished jobs (a tenth as many pending, at most 10k). The baseline is
the 10k spool measured in the same run; ratios show how each figure grows. Targets at
1M: status p99 < 5 ms, list page p99 < 50 ms, start-up < 5 s, RSS < 300 MB, and nothing
on the submit or status path that grows with the number of finished jobs.

The spool is written by hand as the server leaves it, its done.index included (a
finished job's folder holds its job.json and result.json; its output files, which
no measured request reads, are left out to spare the disk). At 100k the start-up is
measured once more with the index removed: what a restart costs when it must be
made again.
"""
import json
import os
import random
import secrets
import time

import requests

from common import Row, Server, idle_nodes, job_config, median, pct, rss_mb, timed, workdir

SIZES = (10_000, 100_000, 1_000_000)
REBUILT = 100_000  # where start-up without done.index is measured too
NODES = 8


def fill(spool, finished, pending):
    """Write a spool by hand, as gpuqueue lays it out (no fsync: this is set-up)."""
    rng = random.Random(finished)
    t0 = time.time() - finished - pending
    ids = [f"{int((t0 + i) * 1e6):014x}{secrets.token_hex(5)}" for i in range(finished + pending)]
    meta = {"user_id": "alice", "competition_id": "c", "project_id": "p", "expected_time": 10.0}

    def write(folder, files):
        os.makedirs(folder)
        for name, data in files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(data)
    index = []
    for i, job_id in enumerate(ids[:finished]):
        node = rng.randrange(NODES)
        write(f"{spool}/done/{job_id}", {
            "job.json": json.dumps({"id": job_id, "submitted_at": t0 + i, **meta}),
            "result.json": json.dumps({"status": "completed", "exit_code": 0, "error": None,
                                       "node_id": node, "started_at": t0 + i,
                                       "finished_at": t0 + i + 1,
                                       "outputs": {"state": "complete"}})})
        index.append(f"+ {job_id} {node} completed -\n")
    with open(f"{spool}/done.index", "w") as f:
        f.writelines(index)
    for i, job_id in enumerate(ids[finished:]):
        write(f"{spool}/nodes/{i % NODES}/pending/{job_id}", {
            "job.json": json.dumps({"id": job_id, "submitted_at": t0 + finished + i, **meta}),
            "code.py": "print('hello')\n", "config.yaml": job_config("alice", 10)})
    return ids[:finished], ids[finished:]


def measure(finished):
    pending = min(finished // 10, 10_000)
    root = workdir(f"scale{finished}")
    server = Server(root / "s", nodes=idle_nodes(NODES), max_pending_per_user=10 ** 9)
    t0 = time.perf_counter()
    done_ids, pending_ids = fill(root / "s" / "spool", finished, pending)
    print(f"   {finished} finished jobs written in {time.perf_counter() - t0:.0f} s", flush=True)
    token = server.token("alice")
    rebuilt = None
    if finished == REBUILT:
        os.unlink(root / "s" / "spool" / "done.index")
        t0 = time.perf_counter()
        server.start()
        rebuilt = time.perf_counter() - t0
        server.kill()
    t0 = time.perf_counter()
    server.start()
    startup = time.perf_counter() - t0
    s = requests.Session()
    auth = {"Authorization": f"Bearer {token}"}
    rng = random.Random(7)

    def status():
        job_id = rng.choice(done_ids) if rng.random() < 0.9 else rng.choice(pending_ids)
        assert s.get(f"{server.url}/api/status/{job_id}", headers=auth).status_code == 200

    def page():
        r = s.get(f"{server.url}/api/jobs?limit=100", headers=auth)
        assert r.status_code == 200 and len(r.json()["jobs"]) == 100

    files = {"code": ("j.py", "print(1)\n"), "config_file": ("c.yaml", job_config("alice", 10))}

    def submit():
        assert s.post(f"{server.url}/api/submit", headers=auth, files=files).status_code == 201
    timed(status, 50)  # warm up
    st, pg, sb = timed(status, 1000), timed(page, 200), timed(submit, 200)
    rss = rss_mb(server.proc.pid)
    server.kill()
    os.system(f"rm -rf {root}")
    return {"status_p50": median(st), "status_p99": pct(st, 99), "page_p50": median(pg),
            "page_p99": pct(pg, 99), "submit_p50": median(sb), "startup": startup, "rss": rss,
            "rebuilt": rebuilt}


def run():
    figures = {}
    for n in SIZES:
        t = time.perf_counter()
        figures[n] = measure(n)
        print(f"   {n} finished jobs measured in {time.perf_counter() - t:.0f} s: {figures[n]}",
              flush=True)
    base, big = figures[SIZES[0]], figures[SIZES[-1]]
    mid = figures[SIZES[1]]
    print(f"4. scale (baseline: the {SIZES[0]}-job spool; gpuqueue: the {SIZES[-1]}-job spool; "
          f"100k figures: status p99 {mid['status_p99']:.2f} ms, page p99 {mid['page_p99']:.1f} ms, "
          f"start-up {mid['startup']:.2f} s, RSS {mid['rss']:.0f} MB)")
    spec = [("status p50", "status_p50", "ms", ""), ("status p99", "status_p99", "ms", "< 5 ms"),
            ("list page p50", "page_p50", "ms", ""), ("list page p99", "page_p99", "ms", "< 50 ms"),
            ("submit p50", "submit_p50", "ms", "flat"), ("start-up", "startup", "s", "< 5 s"),
            ("RSS", "rss", "MB", "< 300 MB")]
    rows = [Row("scale", f"{label} ({SIZES[0]} -> {SIZES[-1]})", base[k], big[k],
                big[k] / base[k], target, unit).show() for label, k, unit, target in spec]
    rows += [Row("scale", f"start-up at {SIZES[1]}, then at {SIZES[-1]}", mid["startup"],
                 big["startup"], big["startup"] / mid["startup"], "", "s").show(),
             Row("scale", f"start-up at {REBUILT}: done.index missing (vs present)",
                 figures[REBUILT]["rebuilt"], figures[REBUILT]["startup"],
                 figures[REBUILT]["startup"] / figures[REBUILT]["rebuilt"], "", "s").show()]
    return rows


if __name__ == "__main__":
    run()
