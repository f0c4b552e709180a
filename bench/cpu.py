"""11. CPU per job: the server's, the node agent's and the wrapper's, submit to done.

300 jobs of `pass` on 8 local nodes, and on 8 SSH nodes (the loopback sshd cluster),
submitted by one client that never asks about a job (it looks at GET / and /api/nodes
twice a second until the queue is empty and no node runs anything). The server's CPU
(utime + stime, from /proc) over the run, less what it spends idle over as long
(measured just before), divided by the jobs. On local nodes also the agents' own CPU.
The baseline is the jobs' interpreter's own start and exit: what a job costs before any
runner does anything. Target: the server <= 2 ms per job.

The wrapper's CPU cannot be told from the jobs' own in that run (an interpreter's start
varies by more than a wrapper costs), so it is measured on the node program alone: its
agent, started here as a local node's is, given 200 starts one after another of a job
that runs /bin/true (1 ms), the agent's children's CPU less as many /bin/true runs.

The local run is made a second time with the whole server folder (spool, nodes' workdirs)
on tmpfs, where a file costs no disk and an fsync nothing: what the server spends there
is its own work, and the difference the filesystem's share of its CPU.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import ROOT, Cluster, Row, Server, job_config, kill_processes_under, workdir

sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402  (the interpreter local jobs run with)

JOBS = 300
NODES = 8
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    """(own, reaped children's) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK


def agents(server_pid):
    """The server's children that are node agents."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == server_pid:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def job_cpu(python, runs=30):
    """CPU seconds of one start and exit of ``python -c pass``, as a job's is."""
    before = os.times()
    for _ in range(runs):
        subprocess.run([python, "-c", "pass"], check=True)
    after = os.times()
    return ((after.children_user - before.children_user)
            + (after.children_system - before.children_system)) / runs


def drive(server):
    """Run JOBS jobs; the CPU the server (less its idle CPU over as long) and its agents
    spent on them, and that idle CPU per second (seconds)."""
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {server.token('alice')}"
    end = time.monotonic() + 60
    while not all(n["state"] == "online" for n in s.get(server.url + "/api/nodes").json()["nodes"]):
        assert time.monotonic() < end, server.log()[-2000:]
        time.sleep(0.1)
    files = {"code": ("j.py", "pass\n"), "config_file": ("c.yaml", job_config("alice", 5))}

    def run(n):
        for _ in range(n):
            r = s.post(server.url + "/api/submit", files=files)
            assert r.status_code == 201, r.text
        while s.get(server.url + "/").json()["queue_length"] or any(
                n["running_jobs"] or n.get("prepared_jobs")
                for n in s.get(server.url + "/api/nodes").json()["nodes"]):
            time.sleep(0.5)
        time.sleep(1)  # files brought back and folders removed: beside the scheduler
    run(16)  # warm up: every node's agent, interpreter and caches
    pid = server.proc.pid
    idle0, t0 = cpu(pid)[0], time.monotonic()
    time.sleep(5)
    idle = (cpu(pid)[0] - idle0) / (time.monotonic() - t0)
    kids = agents(pid)
    own0, ag0 = cpu(pid)[0], [cpu(a) for a in kids]
    t0 = time.monotonic()
    run(JOBS)
    took = time.monotonic() - t0
    own = cpu(pid)[0] - own0 - idle * took
    ag = [cpu(a) for a in kids]
    agent_own = sum(a[0] - b[0] for a, b in zip(ag, ag0))
    return own, agent_own, idle


def node_program_alone(root, python, runs=200):
    """(agent, wrapper) CPU seconds per job of the node program alone: ``runs`` starts,
    one after another, of a job running /bin/true, sent to a real agent."""
    name, source = gpuqueue.node_program()
    (root / name).write_text(source)
    agent = subprocess.Popen([python, name], cwd=root, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert json.loads(agent.stdout.readline())["op"] == "ready"

        def start(i):
            job_id = f"{i:024x}"
            (root / job_id).mkdir()
            agent.stdin.write(json.dumps({
                "op": "start", "id": job_id, "dir": job_id, "env": {}, "run_as": None,
                "limit": 60, "grace": 5, "output_limit": 1 << 20, "deadline": time.time() + 60,
                "inline": 65536, "launch": {"python": "/bin/true", "setup": None,
                                            "entry": "job.py", "archive": None}}).encode() + b"\n")
            agent.stdin.flush()
            while json.loads(agent.stdout.readline())["op"] != "exited":
                pass
        for i in range(5):  # warm up
            start(i)
        own0, kids0 = cpu(agent.pid)
        for i in range(5, 5 + runs):
            start(i)
        own1, kids1 = cpu(agent.pid)
    finally:
        agent.stdin.close()
        agent.wait(30)
    before = os.times()
    for _ in range(runs):
        subprocess.run(["/bin/true"], check=True)
    after = os.times()
    true = (after.children_user + after.children_system
            - before.children_user - before.children_system)
    return (own1 - own0) / runs, max(0.0, kids1 - kids0 - true) / runs


def local(root):
    """drive() on a server of NODES local nodes in ``root``."""
    server = Server(root, nodes=NODES, max_pending_per_user=10 ** 6).start()
    try:
        return drive(server)
    finally:
        server.kill()
        kill_processes_under(root)


def run():
    root = workdir("cpu")
    memory = Path(tempfile.mkdtemp(prefix="gpuqueue-bench-cpu-", dir="/dev/shm")) \
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    python = gpuqueue.system_python()
    try:
        bare = job_cpu(python)
        own, agent_own, idle = local(root / "local")
        in_memory = local(memory / "local")[0] if memory else None
        (root / "alone").mkdir()
        alone_agent, alone_wrapper = node_program_alone(root / "alone", python)
        (root / "c").mkdir()
        cluster = Cluster(root / "c", n=NODES).start()
        try:
            server = Server(root / "ssh", max_pending_per_user=10 ** 6, **cluster.config()).start()
            try:
                ssh_own, _, ssh_idle = drive(server)
            finally:
                server.kill()
        finally:
            cluster.stop()
    finally:
        kill_processes_under(root)
        if memory:
            kill_processes_under(memory)
            shutil.rmtree(memory, ignore_errors=True)
    per = 1000 / JOBS
    print(f"11. CPU per job ({JOBS} jobs of `pass`, {NODES} nodes; the jobs' interpreter "
          f"{python} costs {bare * 1000:.1f} ms CPU to start and exit; the server idles at "
          f"{idle * 1000:.1f} ms/s local, {ssh_idle * 1000:.1f} ms/s SSH)")
    rows = [
        Row("cpu", "server CPU per job, local nodes", bare * 1000, own * per, own * per / 1000 / bare,
            "<= 2 ms", "ms").show(),
        Row("cpu", "server CPU per job, SSH nodes", bare * 1000, ssh_own * per,
            ssh_own * per / 1000 / bare, "<= 2 ms", "ms").show(),
        Row("cpu", "agent CPU per job, local nodes", bare * 1000, agent_own * per,
            agent_own * per / 1000 / bare, "", "ms").show(),
        Row("cpu", "agent CPU per job, node alone", bare * 1000, alone_agent * 1000,
            alone_agent / bare, "", "ms").show(),
        Row("cpu", "wrapper CPU per job, node alone", bare * 1000,
            alone_wrapper * 1000, alone_wrapper / bare, "", "ms").show(),
    ]
    if in_memory is None:
        print("  (no writable /dev/shm: the server's own share was not measured)")
    else:
        rows.append(Row("cpu", "server CPU per job, local, on tmpfs", bare * 1000,
                        in_memory * per, in_memory * per / 1000 / bare, "", "ms").show())
    return rows


if __name__ == "__main__":
    run()
