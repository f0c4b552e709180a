"""SSH nodes through a jump host, against real OpenSSH sshd processes on loopback."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import GRANDCHILD, alive, job_config, job_pids, kill_processes_under, wait_for
from sshcluster import Cluster, node_addr, open_to_nodes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    c = Cluster(root).start()
    yield c
    c.stop()
    kill_processes_under(root)


@pytest.fixture
def ssh_server(make_server, cluster, tmp_path):
    """A server whose 8 nodes are the cluster's, reached through its jump host.  The
    nodes' user may write marker files into tmp_path."""
    open_to_nodes(tmp_path)

    def make(**settings):
        cfg = cluster.config(**settings)
        if "node_count" in settings:
            cfg["nodes"] = cfg["nodes"][:cfg.pop("node_count")]
        server = make_server(**cfg)
        wait_nodes(server, "online", [n["id"] for n in cfg["nodes"]])
        return server
    yield make
    for s in cluster.nodes + [cluster.jump]:  # a test may have stopped one
        if s.proc.poll() is not None:
            s.start()


def wait_nodes(server, state, ids, timeout=60):
    end = time.monotonic() + timeout
    while True:
        nodes = {n["id"]: n for n in server.get("/api/nodes").json()["nodes"]}
        if all(nodes[i]["state"] == state for i in ids):
            return nodes
        assert time.monotonic() < end, f"nodes not {state}: {nodes}\n{server.log()}"
        time.sleep(0.1)


def group_members(pgid):
    """Processes in a process group, as `ps` shows them (zombies left out)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if int(line.split()[1]) == pgid and not line.split()[2].startswith("Z")]


def test_eight_jobs_run_on_eight_nodes_through_the_jump_host(ssh_server):
    server = ssh_server()
    code = ("import os, sys\nprint(os.environ['SSH_CONNECTION'].split()[2])\n"
            "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['GPUQUEUE_JOB_ID'])\n"
            "print('to stderr', file=sys.stderr)\nimport time; time.sleep(0.5)\nsys.exit(7)\n")
    subs = [server.submit_ok(code, expected_time=60) for _ in range(8)]
    assert sorted(s["node_id"] for s in subs) == list(range(8))
    for s in subs:
        st = server.wait(s["job_id"])
        assert st["status"] == "failed" and st["exit_code"] == 7
        res = server.results(s["job_id"])
        where, ids = res["stdout"].splitlines()
        assert where == node_addr(s["node_id"])  # it really ran on that node's sshd
        assert ids == f"0 {s['job_id']}"  # each node a machine of its own: its GPU 0
        assert res["stderr"] == "to stderr\n"


def test_remote_folders_are_removed_after_the_job(ssh_server, cluster):
    server = ssh_server()
    sub = server.submit_ok("print('hi')\n")
    assert server.wait(sub["job_id"])["status"] == "completed"
    workdir = cluster.root / "work" / f"node{sub['node_id']}"
    # Removed once the outcome is recorded, so that a crash between the two loses nothing.
    wait_for(lambda: not (workdir / sub["job_id"]).exists(), what="the job's folder removed")
    assert server.results(sub["job_id"])["stdout"] == "hi\n"


def test_cancel_pending_on_ssh_node(ssh_server, tmp_path):
    server = ssh_server(node_count=1)
    marker = tmp_path / "ran"
    first = server.submit_ok("import time\ntime.sleep(60)\n")
    second = server.submit_ok(f"open({str(marker)!r}, 'w').write('x')\n")
    server.wait(first["job_id"], ("running",))
    r = server.post(f"/api/cancel/{second['job_id']}", server.token())
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = server.post(f"/api/cancel/{first['job_id']}", server.token())
    assert r.json()["cancel_requested"]
    assert server.wait(first["job_id"])["status"] == "cancelled"
    assert not marker.exists()


def test_cancel_running_kills_the_remote_group(ssh_server, tmp_path):
    server = ssh_server(node_count=2)
    pids_file = tmp_path / "pids"
    sub = server.submit_ok(f"PIDS = {str(pids_file)!r}\n" + GRANDCHILD)
    job_pid, grandchild = job_pids(pids_file)
    assert group_members(job_pid)  # the job's own process group, grandchild included
    r = server.post(f"/api/cancel/{sub['job_id']}", server.token())
    assert r.status_code == 200 and r.json()["cancel_requested"]
    assert server.wait(sub["job_id"])["status"] == "cancelled"
    assert group_members(job_pid) == []
    assert not alive(job_pid) and not alive(grandchild)
    assert server.results(sub["job_id"])["stdout"] == "started\n"


def test_timeout_on_ssh_node(ssh_server, tmp_path):
    server = ssh_server(node_count=2)
    pids_file = tmp_path / "pids"
    sub = server.submit_ok(f"PIDS = {str(pids_file)!r}\n" + GRANDCHILD, expected_time=1)
    job_pid, grandchild = job_pids(pids_file)
    st = server.wait(sub["job_id"], timeout=60)
    assert st["status"] == "failed" and st["error"] == "timeout"
    assert group_members(job_pid) == [] and not alive(grandchild)


def test_output_over_the_cap_is_cut_on_the_node(ssh_server):
    server = ssh_server(node_count=1, output_limit_bytes=4096)
    sub = server.submit_ok("import sys\nprint('HEAD')\nsys.stdout.write('y' * 500000)\nprint()\n"
                           "print('TAIL')\nsys.stderr.write('e' * 10)\n")
    server.wait(sub["job_id"])
    res = server.results(sub["job_id"])
    assert res["stdout"].startswith("HEAD\n") and res["stdout"].endswith("TAIL\n")
    assert "[gpuqueue: output truncated" in res["stdout"] and len(res["stdout"]) < 4300
    assert res["stderr"] == "e" * 10


def test_node_down_mid_queue_moves_its_pending_jobs(ssh_server, cluster):
    server = ssh_server(node_count=2, unreachable_grace=3)
    # Fill node 1: one running job and two queued behind it.
    long = "import time\ntime.sleep(300)\n"
    blocker0 = server.submit_ok(long, expected_time=100)
    running1 = server.submit_ok(long, expected_time=5)
    assert (blocker0["node_id"], running1["node_id"]) == (0, 1)
    server.wait(running1["job_id"], ("running",))
    queued = [server.submit_ok("print('moved')\n", expected_time=5) for _ in range(2)]
    assert [q["node_id"] for q in queued] == [1, 1]  # node 1's running job ends sooner
    # The first in line is made ready on node 1, to start the moment its GPU frees.
    ready = wait_for(lambda: [q["job_id"] for q in queued if "ready on node 1" in (
        server.status(q["job_id"]).get("waiting") or "")], "a job made ready on node 1")
    other = next(q["job_id"] for q in queued if q["job_id"] not in ready)
    server.post(f"/api/cancel/{blocker0['job_id']}", server.token())

    cluster.nodes[1].stop()
    nodes = wait_nodes(server, "offline", [1])
    assert nodes[1]["error"] and nodes[0]["state"] == "online"
    st = server.wait(other)
    assert st["status"] == "completed" and st["node_id"] == 0, (st["error"], st["node_id"])
    assert server.results(other)["stdout"] == "moved\n"
    # The job that was running there died with its node: failed, with a clear reason.
    st = server.wait(running1["job_id"], timeout=90)
    assert st["status"] == "failed" and st["error"]
    # The one made ready there may have started (its node's agent starts it on its own):
    # it is run nowhere else until its node says it did not.
    st = server.status(ready[0])
    assert st["status"] == "pending" and "does not answer" in st["waiting"], st

    cluster.nodes[1].start()
    wait_nodes(server, "online", [1])
    st = server.wait(ready[0], timeout=90)
    assert st["status"] == "completed", st["error"]
    assert server.results(ready[0])["stdout"] == "moved\n"
    sub = server.submit_ok("print('back')\n", expected_time=1)
    assert server.wait(sub["job_id"])["status"] == "completed"


def test_jump_host_down_jobs_wait_then_run(ssh_server, cluster):
    server = ssh_server(node_count=3)
    cluster.jump.stop()
    subs = [server.submit_ok("print('after')\n", expected_time=5) for _ in range(3)]
    # The first submits wake the nodes, which then find the jump host gone.
    nodes = wait_nodes(server, "offline", [0, 1, 2])
    assert all(n["error"] for n in nodes.values())
    assert server.get("/").status_code == 200
    for s in subs:
        assert server.status(s["job_id"])["status"] in ("pending", "running")
    cluster.jump.start()
    wait_nodes(server, "online", [0, 1, 2])
    for s in subs:
        assert server.wait(s["job_id"])["status"] == "completed"
        assert server.results(s["job_id"])["stdout"] == "after\n"


def test_unknown_host_key_is_refused(ssh_server, cluster, tmp_path, make_server):
    partial = tmp_path / "known_hosts"
    # Node 0's key is missing: it must be refused, not silently trusted.
    lines = cluster.known_hosts.read_text().splitlines(keepends=True)
    partial.write_text("".join(l for l in lines if not l.startswith(f"[{node_addr(0)}]")))
    cfg = cluster.config(known_hosts=str(partial))
    cfg["nodes"] = cfg["nodes"][:2]
    server = make_server(**cfg)
    end = time.monotonic() + 60
    while "unknown host key" not in (wait_nodes(server, "offline", [0])[0]["error"] or ""):
        assert time.monotonic() < end, server.get("/api/nodes").text
        time.sleep(0.1)
    wait_nodes(server, "online", [1])
    sub = server.submit_ok("print(1)\n")
    assert sub["node_id"] == 1
    assert server.wait(sub["job_id"])["status"] == "completed"
    assert node_addr(0) not in partial.read_text()


def test_accept_new_host_keys_records_them(cluster, tmp_path, make_server):
    fresh = tmp_path / "known_hosts"
    cfg = cluster.config(known_hosts=str(fresh), accept_new_host_keys=True)
    cfg["nodes"] = cfg["nodes"][:1]
    server = make_server(**cfg)
    wait_nodes(server, "online", [0])
    text = fresh.read_text()
    assert f"[{node_addr(0)}]:{cluster.nodes[0].port}" in text
    assert f"[127.0.0.1]:{cluster.jump.port}" in text


def test_running_job_is_reattached_after_the_link_drops(ssh_server, cluster, tmp_path):
    server = ssh_server(node_count=1)
    runs = tmp_path / "runs"
    code = (f"import os, time\nopen({str(runs)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
            "print('before', flush=True)\ntime.sleep(4)\nprint('after')\n")
    sub = server.submit_ok(code, expected_time=60)
    server.wait(sub["job_id"], ("running",))
    time.sleep(0.5)
    cluster.jump.stop()  # the link drops; the job itself runs on
    wait_nodes(server, "offline", [0])
    assert server.status(sub["job_id"])["status"] == "running"
    cluster.jump.start()
    st = server.wait(sub["job_id"], timeout=60)
    assert st["status"] == "completed", st
    assert server.results(sub["job_id"])["stdout"] == "before\nafter\n"
    assert len(runs.read_text().splitlines()) == 1  # followed again, not started again


def test_node_setup_env_and_gpus_reach_the_job(cluster, make_server):
    cfg = cluster.config()
    cfg["nodes"] = [{**cfg["nodes"][0], "setup": "export FROM_SETUP='set up; ok'",
                     "env": {"FROM_ENV": "x y"}, "gpus": "2,3"}]
    server = make_server(**cfg)
    wait_nodes(server, "online", [0])
    sub = server.submit_ok("import os\nfor k in ('FROM_SETUP', 'FROM_ENV', 'CUDA_VISIBLE_DEVICES',"
                           " 'CUDA_DEVICE_ORDER'):\n print(os.environ[k])\n",
                           config=job_config("alice", 30, gpus=2))  # both of the node's GPUs
    assert server.wait(sub["job_id"])["status"] == "completed"
    assert server.results(sub["job_id"])["stdout"] == "set up; ok\nx y\n2,3\nPCI_BUS_ID\n"


def test_live_output_is_read_from_the_node_and_followed(ssh_server):
    server = ssh_server(node_count=1)
    code = ("import time\nprint('one', flush=True)\ntime.sleep(1.5)\nprint('two', flush=True)\n"
            "time.sleep(30)\n")
    sub = server.submit_ok(code, expected_time=60)
    token = server.token()
    path = f"/api/logs/{sub['job_id']}"
    end = time.monotonic() + 30
    while (part := server.get(path, token).json())["data"] != "one\n":
        assert time.monotonic() < end, part
        time.sleep(0.1)
    assert part["status"] == "running" and part["next_offset"] == 4
    r = requests.get(server.url + path + "?follow=1&offset=4", stream=True, timeout=60,
                     headers={"Authorization": f"Bearer {token}"})
    lines = r.iter_lines()
    assert json.loads(next(lines)) == {"stream": "stdout", "offset": 4, "data": "two\n"}
    server.post(f"/api/cancel/{sub['job_id']}", token)
    last = json.loads(next(lines))
    assert last["end"] and last["status"] == "cancelled"


def test_gpu_figures_come_over_the_nodes_connection(ssh_server, cluster, tmp_path):
    fake = tmp_path / "fakebin"
    fake.mkdir()
    # While it exists, a process outside the queue uses the GPU of the node whose workdir
    # (where its agent runs nvidia-smi) the file names.
    flag = tmp_path / "outsider"
    (fake / "nvidia-smi").write_text(
        "#!/bin/sh\ncase \"$1\" in\n"
        f"  --query-compute-apps*) [ \"$(cat {flag} 2>/dev/null)\" = \"$(basename \"$PWD\")\" ] "
        "&& echo 'GPU-aaaa, 999999, 700' ;;\n"
        "  *) echo '0, GPU-aaaa, NVIDIA H100 80GB HBM3, 512, 81559, 91' ;;\nesac\nexit 0\n")
    (fake / "nvidia-smi").chmod(0o755)
    defaults = {**cluster.config()["node_defaults"], "setup": f"export PATH={fake}:$PATH", "gpus": "0"}
    server = ssh_server(node_count=2, node_defaults=defaults)
    end = time.monotonic() + 30
    while "gpus" not in (node := server.get("/api/nodes").json()["nodes"][0]):
        assert time.monotonic() < end, node
        time.sleep(0.1)
    assert node["gpus"] == [{"index": 0, "device": "0", "name": "NVIDIA H100 80GB HBM3",
                             "memory_used_mib": 512, "memory_total_mib": 81559,
                             "utilization_pct": 91, "processes": [], "foreign": None}]
    # Jobs still run while the telemetry shares the agent's channel.
    sub = server.submit_ok("print('fine')\n")
    assert server.wait(sub["job_id"])["status"] == "completed"
    # Something outside the queue on node 0's GPU: the node's reading says so, and
    # jobs go to node 1 meanwhile.
    flag.write_text(Path(cluster.config()["nodes"][0]["workdir"]).name)
    end = time.monotonic() + 60
    while (node := server.get("/api/nodes").json()["nodes"][0])["gpu_slots"][0]["state"] != "foreign":
        assert time.monotonic() < end, node
        time.sleep(0.2)
    assert node["gpus"][0]["processes"] == [{"pid": 999999, "memory_mib": 700, "user": None,
                                             "job": None}]
    held = server.submit_ok("import time\ntime.sleep(30)\n", expected_time=60)
    assert server.wait(held["job_id"], ("running",))["node_id"] == 1  # node 0's GPU is taken
    waiting = server.submit_ok("print('later')\n")
    st = server.status(waiting["job_id"])
    assert st["status"] == "pending" and "used outside the queue by pid 999999" in st["waiting"]
    flag.unlink()
    assert server.wait(waiting["job_id"], timeout=60)["status"] == "completed"
    server.post(f"/api/cancel/{held['job_id']}", server.token())


def test_a_follow_broken_by_its_node_going_away_ends_with_an_error(ssh_server, cluster):
    server = ssh_server(node_count=1, node_timeout=6)
    sub = server.submit_ok("import time\nprint('up', flush=True)\ntime.sleep(300)\n", expected_time=30)
    token = server.token()
    r = requests.get(server.url + f"/api/logs/{sub['job_id']}?follow=1", stream=True, timeout=60,
                     headers={"Authorization": f"Bearer {token}"})
    lines = r.iter_lines()
    assert json.loads(next(lines)) == {"stream": "stdout", "offset": 0, "data": "up\n"}, \
        server.log()
    cluster.nodes[0].stop()
    stopped = time.monotonic()
    last = json.loads(next(lines))
    assert "error" in last and "end" not in last, last
    assert time.monotonic() - stopped >= 6  # it waited node_timeout for the node
    assert list(lines) == []  # and nothing after it


def test_a_follow_rides_out_its_node_reconnecting(ssh_server, cluster):
    server = ssh_server(node_count=1)
    flag = cluster.root / "follow-reconnect"
    sub = server.submit_ok(f"import os, time\nprint('before', flush=True)\n"
                           f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.05)\n"
                           "print('after')\n", expected_time=60)
    token = server.token()
    r = requests.get(server.url + f"/api/logs/{sub['job_id']}?follow=1", stream=True, timeout=60,
                     headers={"Authorization": f"Bearer {token}"})
    lines = r.iter_lines()
    assert json.loads(next(lines)) == {"stream": "stdout", "offset": 0, "data": "before\n"}, \
        server.log()
    # The jump host goes down and comes back: the link breaks, the job runs on, and
    # is followed again once the node answers; the follow waits meanwhile.
    cluster.jump.stop()
    wait_nodes(server, "offline", [0])
    cluster.jump.start()
    wait_nodes(server, "online", [0])
    flag.touch()
    rest = [json.loads(line) for line in lines if line.strip()]
    assert rest[0] == {"stream": "stdout", "offset": 7, "data": "after\n"}, rest
    assert rest[-1]["end"] and rest[-1]["status"] == "completed", rest
