"""11. What a 1,000-job array costs, against 1,000 single submits.

A server with 8 offline SSH nodes (a closed port), so every job stays pending and no
job competes with the server for the CPU. Baseline: 1,000 single submits of the same
job, one after another from one client. Then one submit of `array: 1000`. Measured:
the seconds until every job is queued; the median of 200 status reads of one job
(a single one, an array's); and the median of 20 reads of a 100-job page of the list
(GET /api/jobs, against GET /api/jobs?array=ID). Target: the array's submit <= 0.2 x
the single submits; status and list within 1.5 x.
"""
import time

import requests

from common import (Row, Server, idle_nodes, job_config, kill_processes_under, median, timed,
                    workdir)

N = 1000
CODE = "print('hello')\n" + "# a training script of some size\n" * 400


def run():
    root = workdir("arrays")
    rows = []
    try:
        figures = {}
        for name in ("single", "array"):
            server = Server(root / name, nodes=idle_nodes(), max_pending_per_user=10 ** 6).start()
            try:
                s = requests.Session()
                s.headers["Authorization"] = f"Bearer {server.token('alice')}"
                t = time.perf_counter()
                if name == "single":
                    ids = []
                    for _ in range(N):
                        r = s.post(server.url + "/api/submit", timeout=30, files={
                            "code": ("j.py", CODE), "config_file": ("c.yaml", job_config())})
                        ids.append(r.json()["job_id"])
                    page = "/api/jobs?limit=100"
                else:
                    r = s.post(server.url + "/api/submit", timeout=120, files={
                        "code": ("j.py", CODE),
                        "config_file": ("c.yaml", job_config(array=N))})
                    ids = r.json()["job_ids"]
                    page = f"/api/jobs?limit=100&array={r.json()['array_id']}"
                submit = time.perf_counter() - t
                assert len(ids) == N, len(ids)
                status = median(timed(
                    lambda: s.get(f"{server.url}/api/status/{ids[N // 2]}").json(), 200))
                listing = median(timed(lambda: s.get(server.url + page).json(), 20))
                figures[name] = (submit, status, listing)
            finally:
                server.kill()
                kill_processes_under(root)
        for i, (metric, unit, target) in enumerate((
                ("submit 1,000 jobs: one array vs single submits", "s", "<= 0.2"),
                ("status of one job, median: array's vs single", "ms", "<= 1.5"),
                ("a 100-job page of the list, median: ?array= vs all", "ms", "<= 1.5"))):
            base, value = figures["single"][i], figures["array"][i]
            row = Row("arrays", metric, base, value, value / base, target, unit)
            row.show()
            rows.append(row)
    finally:
        kill_processes_under(root)
    return rows


if __name__ == "__main__":
    run()
