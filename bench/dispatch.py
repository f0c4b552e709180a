"""1. Dispatch overhead: a trivial job through the jump host.

Interleaved, N times each: gpuqueue submit -> results; a fresh `ssh -J jump node python
job.py` (what a user does without a queue); `python job.py` run locally (the job's own
cost). Overhead = time - the local run's median. Target: gpuqueue's overhead <= 0.2 x the
ssh -J overhead.
"""
import subprocess
import sys
import time

import requests

from common import Cluster, Row, Server, job_config, kill_processes_under, median, pct, workdir
from sshcluster import open_to_nodes

N = 30
JOB = "print('hello')\n"


def run():
    root = workdir("dispatch")
    (root / "c").mkdir()
    cluster = Cluster(root / "c", n=1).start()
    try:
        cfg = cluster.config()
        server = Server(root / "s", **cfg).start()
        token = server.token("alice")
        job = root / "job.py"
        job.write_text(JOB)
        ssh_cfg = root / "ssh_config"
        ssh_cfg.write_text(f"Host *\n  IdentityFile {cluster.client_key}\n"
                           f"  UserKnownHostsFile {cluster.known_hosts}\n"
                           "  StrictHostKeyChecking yes\n  BatchMode yes\n")
        jump, node = cluster.jump, cluster.nodes[0]
        # As gpuqueue's nodes do: the nodes' user and python (NODE_PYTHON when the
        # cluster has a node user of its own).
        user, python = cfg["node_defaults"]["user"], cfg["node_defaults"]["python"]
        open_to_nodes(root, writable=False)
        ssh = ["ssh", "-F", str(ssh_cfg), "-J", f"{_user()}@{jump.addr}:{jump.port}",
               "-p", str(node.port), f"{user}@{node.addr}", f"{python} {job}"]
        session = requests.Session()
        auth = {"Authorization": f"Bearer {token}"}
        _wait_online(session, server)

        def via_gpuqueue():
            r = session.post(server.url + "/api/submit", headers=auth,
                             files={"code": ("job.py", JOB),
                                    "config_file": ("c.yaml", job_config("alice", 10))})
            job_id = r.json()["job_id"]
            while True:
                r = session.get(f"{server.url}/api/results/{job_id}", headers=auth)
                if r.status_code == 200:
                    assert r.json()["stdout"] == "hello\n", r.text
                    return
                time.sleep(0.001)

        def via_ssh():
            out = subprocess.run(ssh, capture_output=True, text=True, timeout=30)
            assert out.stdout == "hello\n", out.stderr

        def local():
            subprocess.run([sys.executable, str(job)], capture_output=True, check=True)

        times = {"gpuqueue": [], "ssh -J": [], "local": []}
        for i in range(N):
            order = [("gpuqueue", via_gpuqueue), ("ssh -J", via_ssh), ("local", local)]
            for name, fn in order[i % 3:] + order[:i % 3]:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000)
        server.kill()
    finally:
        cluster.stop()
        kill_processes_under(root)
    base = median(times["local"])
    over = {k: [t - base for t in v] for k, v in times.items() if k != "local"}
    print(f"1. dispatch overhead (N={N}, local python job.py median {base:.1f} ms)")
    rows = [
        Row("dispatch", "end-to-end median", median(times["ssh -J"]), median(times["gpuqueue"]),
            median(times["gpuqueue"]) / median(times["ssh -J"]), unit="ms").show(),
        Row("dispatch", "overhead median", median(over["ssh -J"]), median(over["gpuqueue"]),
            median(over["gpuqueue"]) / median(over["ssh -J"]), "<= 0.2", "ms").show(),
        Row("dispatch", "overhead p95", pct(over["ssh -J"], 95), pct(over["gpuqueue"], 95),
            pct(over["gpuqueue"], 95) / pct(over["ssh -J"], 95), unit="ms").show(),
        Row("dispatch", "local run (the job's own cost)", None, base, unit="ms").show(),
    ]
    return rows


def _user():
    import pwd
    import os
    return pwd.getpwuid(os.getuid()).pw_name


def _wait_online(session, server):
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if all(n["state"] == "online" for n in session.get(server.url + "/api/nodes").json()["nodes"]):
            return
        time.sleep(0.05)
    raise RuntimeError("nodes did not come online")


if __name__ == "__main__":
    run()
