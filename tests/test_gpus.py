"""GPUs as teams have them: nodes with several GPUs, jobs that need several, and GPUs
used outside the queue, read from a stand-in nvidia-smi that a test drives through a
state file.  Jobs record the CUDA_VISIBLE_DEVICES they got and when they ran; no two
jobs that ran at the same time may share a GPU."""
import json
import os
import subprocess
import threading
import time

import pytest

from conftest import job_config, kill_processes_under, wait_for
from sshcluster import Cluster, open_to_nodes

FAKE_NVIDIA_SMI = r'''#!/usr/bin/python3
# Stands in for nvidia-smi: the GPUs and the processes on them come from a state file.
import json, os, sys
state = json.load(open(%r))
if state.get("fail"):
    sys.exit(9)
if any(a.startswith("--query-compute-apps") for a in sys.argv):
    apps = list(state["apps"])
    for name in os.listdir(state["apps_dir"]):  # jobs put themselves here: pid -> "uuid MiB"
        with open(os.path.join(state["apps_dir"], name)) as f:
            uuid, mib = f.read().split()
        apps.append([uuid, int(name), int(mib)])
    for uuid, pid, mib in apps:
        print("%%s, %%s, %%s" %% (uuid, pid, mib))
else:
    for g in state["gpus"]:
        print(", ".join(str(x) for x in g))
'''


class FakeGpus:
    """The stand-in nvidia-smi and its state: ``gpus`` rows (index, uuid, name, MiB
    used, MiB total, %) and ``apps`` rows (uuid, pid, MiB) besides what jobs add."""

    def __init__(self, root, count):
        root = made(root)
        self.bin = root / "fake-bin"
        self.bin.mkdir()
        self.state = root / "fake-gpus.json"
        self.apps_dir = root / "fake-apps"
        self.apps_dir.mkdir()
        os.chmod(self.apps_dir, 0o777)
        (self.bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI % str(self.state))
        os.chmod(self.bin / "nvidia-smi", 0o755)
        os.chmod(self.bin, 0o755)
        self.gpus = [[i, f"GPU-{i:04d}", "Fake A100", 0, 40960, 0] for i in range(count)]
        self.apps = []
        self.fail = False
        self.write()

    def write(self):
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": self.gpus, "apps": self.apps, "fail": self.fail,
                                   "apps_dir": str(self.apps_dir)}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.state)


def recording_job(folder, seconds, fake=None, gpu_mib=0):
    """A job that records the GPUs it got and when it ran into ``folder``; with a
    FakeGpus, it also shows itself to the stand-in nvidia-smi as a process using
    ``gpu_mib`` MiB of its first GPU."""
    shows = ""
    if fake is not None:
        shows = (f"open(os.path.join({str(fake.apps_dir)!r}, str(os.getpid())), 'w')"
                 f".write('GPU-%04d {gpu_mib}' % int(devices[0]))\n")
    return (f"import json, os, time\nstart = time.time()\n"
            f"devices = os.environ['CUDA_VISIBLE_DEVICES'].split(',')\n{shows}"
            f"print(','.join(devices))\ntime.sleep({seconds})\n"
            f"with open(os.path.join({str(folder)!r}, os.environ['GPUQUEUE_JOB_ID']), 'w') as f:\n"
            f"    json.dump({{'devices': devices, 'start': start, 'end': time.time()}}, f)\n")


def made(path):
    """A new folder the nodes' user may write into."""
    path.mkdir()
    return open_to_nodes(path)


def records(folder):
    return {p.name: json.loads(p.read_text()) for p in folder.iterdir()}


def assert_never_shared(found):
    """No two jobs that ran at the same time had a GPU in common; returns how many
    pairs ran at the same time."""
    overlapping = 0
    items = sorted(found.items())
    for i, (a, ra) in enumerate(items):
        for b, rb in items[i + 1:]:
            if ra["start"] < rb["end"] and rb["start"] < ra["end"]:
                overlapping += 1
                assert not set(ra["devices"]) & set(rb["devices"]), (a, ra, b, rb)
    return overlapping


def submit_gpus(server, code, gpus, user="alice", expected_time=30):
    return server.submit_ok(code, user=user,
                            config=job_config(user, expected_time, gpus=gpus))


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    def make(count=4):
        fake = FakeGpus(tmp_path / "gpus", count)
        monkeypatch.setenv("PATH", f"{fake.bin}:{os.environ['PATH']}")
        return fake
    return make


def run_mixed(server, folder, sizes, seconds=1.0):
    jobs = [(submit_gpus(server, recording_job(folder, seconds), g), g) for g in sizes]
    for sub, gpus in jobs:
        st = server.wait(sub["job_id"], timeout=120)
        assert st["status"] == "completed", st
        assert len(st["gpu_indices"]) == gpus and st["gpus"] == gpus
        assert server.results(sub["job_id"])["stdout"].strip() == ",".join(st["gpu_indices"])
    found = records(folder)
    assert len(found) == len(sizes)
    return found


# -- several GPUs per node, jobs of several GPUs ---------------------------------


def test_a_four_gpu_local_node_runs_jobs_side_by_side_never_sharing_a_gpu(make_server, tmp_path):
    folder = made(tmp_path / "records")
    server = make_server(nodes=[{"id": 0, "host": "local", "gpus": "0,1,2,3"}])
    found = run_mixed(server, folder, [1, 2, 1, 4, 1, 1, 2, 1, 3, 1])
    assert assert_never_shared(found) >= 3  # they really ran side by side
    assert {d for r in found.values() for d in r["devices"]} == {"0", "1", "2", "3"}


def test_ssh_nodes_with_two_gpus_each_never_share_one(make_server, tmp_path):
    root = tmp_path / "cluster"
    root.mkdir()
    cluster = Cluster(root, n=2).start()
    try:
        folder = made(tmp_path / "records")
        cfg = cluster.config()
        for n in cfg["nodes"]:
            n["gpus"] = [0, 1]
        server = make_server(**cfg)
        wait_for(lambda: all(n["state"] == "online"
                             for n in server.get("/api/nodes").json()["nodes"]), "nodes online")
        sizes = [1, 2, 1, 1, 2, 1, 1, 1]
        jobs = [(submit_gpus(server, recording_job(folder, 1), g), g) for g in sizes]
        nodes_of = {}
        for sub, gpus in jobs:
            st = server.wait(sub["job_id"], timeout=120)
            assert st["status"] == "completed" and len(st["gpu_indices"]) == gpus, st
            nodes_of[sub["job_id"]] = st["node_id"]
        found = records(folder)
        for node in (0, 1):  # the same GPU index on two machines is two GPUs
            assert_never_shared({j: r for j, r in found.items() if nodes_of[j] == node})
        assert set(nodes_of.values()) == {0, 1}
    finally:
        cluster.stop()
        kill_processes_under(root)


def test_config_and_submit_speak_of_gpus(make_server):
    server = make_server(nodes=[{"id": 0, "host": "local", "gpus": [0, 1, 2, 3]},
                                {"id": 1, "host": "local"}])
    r = server.submit("print(1)\n", config=job_config("alice", 5, gpus=5))
    assert r.status_code == 400 and "no node has more than 4" in r.json()["error"]
    r = server.submit("print(1)\n", config=job_config("alice", 5, gpus=0))
    assert r.status_code == 400 and "'gpus'" in r.json()["error"]
    # A 3-GPU job is planned where it fits, even when the other node is emptier.
    sub = submit_gpus(server, "print(1)\n", 3)
    assert sub["node_id"] == 0
    nodes = server.get("/api/nodes").json()["nodes"]
    assert [s["gpu"] for s in nodes[0]["gpu_slots"]] == ["0", "1", "2", "3"]
    assert [s["gpu"] for s in nodes[1]["gpu_slots"]] == ["1"]
    bad = make_server(nodes=[{"id": 0, "host": "local", "gpus": "0,0"}], start=False)
    r = bad.cli("serve", check=False)
    assert r.returncode == 1 and "names a GPU twice" in r.stderr


# -- no starvation: a big job is held for ----------------------------------------


def test_a_four_gpu_job_starts_within_its_bound_behind_a_stream_of_small_ones(make_server,
                                                                              tmp_path):
    folder = made(tmp_path / "records")
    # Small jobs expect 2 s and may run 4 (timeout_multiplier 2), plus 1 s of kill grace.
    server = make_server(nodes=[{"id": 0, "host": "local", "gpus": "0,1,2,3"}])
    small = recording_job(folder, 1.5)
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            server.submit_ok(small, user="bob", config=job_config("bob", 2))
            time.sleep(0.3)
    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        wait_for(lambda: len(server.get("/api/jobs?status=running",
                                        server.token("bob")).json()["jobs"]) == 4,
                 "the small jobs to fill the node")
        submitted = time.time()
        big = submit_gpus(server, recording_job(folder, 1), 4, expected_time=2)
        seen = wait_for(lambda: (st := server.status(big["job_id"]))["status"] != "pending"
                        or "keeps GPU" in st["waiting"] and st, "the GPUs held for it")
        if seen is not True:  # it waited, and said for what
            assert "starts by" in seen["waiting"], seen
        st = server.wait(big["job_id"], ("running", "completed"), timeout=60)
        started = time.time()
        # Bound: the running jobs' time limits (4 s) and kill grace (1 s), with slack.
        assert started - submitted < 15, (started - submitted, st)
        assert sorted(st["gpu_indices"]) == ["0", "1", "2", "3"]
    finally:
        stop.set()
        feeder.join()
    admin = server.token("root", admin=True)
    for job in server.get("/api/jobs?limit=1000", admin).json()["jobs"]:
        server.wait(job["job_id"], token=admin, timeout=120)
    assert_never_shared(records(folder))


# -- GPUs used outside the queue ------------------------------------------------


def test_a_gpu_used_outside_the_queue_takes_no_new_job_until_it_is_free(make_server, tmp_path,
                                                                        fake_gpus):
    fake = fake_gpus(3)
    outsider = subprocess.Popen(["sleep", "300"])
    try:
        fake.apps = [["GPU-0001", outsider.pid, 3000]]  # a colleague's process on GPU 1
        fake.gpus[2][3] = 5000  # GPU 2: memory in use by something out of sight
        fake.write()
        folder = made(tmp_path / "records")
        server = make_server(nodes=[{"id": 0, "host": "local", "gpus": "0,1,2"}],
                             foreign_memory_mib=1024)
        slots = wait_for(lambda: (n := server.get("/api/nodes").json()["nodes"][0])
                         and [s["state"] for s in n["gpu_slots"]] == ["free", "foreign", "foreign"]
                         and n, "the reading")
        gpu1 = next(g for g in slots["gpus"] if g["device"] == "1")
        assert gpu1["processes"] == [{"pid": outsider.pid, "memory_mib": 3000, "user": "root",
                                      "job": None}]
        assert f"pid {outsider.pid} of root (3000 MiB)" in gpu1["foreign"]
        assert "5000 MiB in use outside the queue" in slots["gpus"][2]["foreign"]
        # Three jobs, one free GPU: one runs, the others wait, saying why.
        subs = [submit_gpus(server, recording_job(folder, 60, fake, 2000), 1, expected_time=60) for _ in range(3)]
        first = server.wait(subs[0]["job_id"], ("running",))
        assert first["gpu_indices"] == ["0"]
        st = server.status(subs[1]["job_id"])
        assert st["status"] == "pending" and f"GPU 1 is used outside the queue by pid " \
            f"{outsider.pid}" in st["waiting"], st
        # The running job shows itself on GPU 0 and is seen as gpuqueue's own.
        n = wait_for(lambda: (n := server.get("/api/nodes").json()["nodes"][0]) and any(
            p["job"] == subs[0]["job_id"] for p in n["gpus"][0]["processes"]) and n,
            "the job's process on GPU 0")
        assert n["gpus"][0]["foreign"] is None and n["gpu_slots"][0]["state"] == "busy"
        # Something outside the queue joins GPU 0 too: the running job is left alone.
        fake.apps.append(["GPU-0000", outsider.pid, 100])
        # The colleague leaves GPU 1: a waiting job takes it (a reading every 5 s).
        fake.apps = [a for a in fake.apps if a[0] != "GPU-0001"]
        fake.write()
        second = server.wait(subs[1]["job_id"], ("running",), timeout=30)
        assert second["gpu_indices"] == ["1"], (second, server.status(subs[0]["job_id"]),
                                                server.get("/api/nodes").json())
        assert server.status(subs[0]["job_id"])["status"] == "running"
        assert server.status(subs[2]["job_id"])["status"] == "pending"
        for sub in subs:
            server.post(f"/api/cancel/{sub['job_id']}", server.token())
    finally:
        outsider.kill()
        outsider.wait()


def test_a_failing_nvidia_smi_shows_no_figures_and_stops_nothing(make_server, fake_gpus):
    fake = fake_gpus(2)
    fake.fail = True
    fake.write()
    server = make_server(nodes=[{"id": 0, "host": "local", "gpus": "0,1"}])
    sub = server.submit_ok("print('ran')\n")
    assert server.wait(sub["job_id"])["status"] == "completed"
    node = server.get("/api/nodes").json()["nodes"][0]
    assert "gpus" not in node and node["error"] is None
    assert [s["state"] for s in node["gpu_slots"]] == ["free", "free"]
    metrics = server.get("/metrics").text
    assert 'gpuqueue_gpu_state{node="0",gpu="1",state="free"} 1' in metrics
