"""The slurm node kind against a real Slurm (slurmctld + slurmd + munged from Debian's
packages, on 127.0.0.1), reached through the loopback sshd jump host like any node.

The Slurm node has 2 fake GPUs (gres), so jobs asking for gpu:1 run two at a time and
a third waits in Slurm as PENDING. Slurm checks time limits only every ~30 s, so the
time-limit test takes a minute or more. Nothing here skips: no Slurm is a failure.
"""
import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import alive, job_config, kill_processes_under, wait_for
from sshcluster import NODE_HOME, Cluster, open_to_nodes
from slurmcluster import SlurmCluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    # Slurm forgets a finished job after MinJobAge seconds (60 here, its purge runs about
    # once a minute): long enough for every check below, short enough to test forgetting.
    cluster = SlurmCluster(open_to_nodes(tmp_path_factory.mktemp("slurm"), writable=False),
                           min_job_age=60).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def ssh(tmp_path_factory):
    root = tmp_path_factory.mktemp("sshcluster")
    c = Cluster(root, n=1).start()  # Slurm runs the jobs as the login user: the node user
    yield c
    c.stop()
    kill_processes_under(root)


@pytest.fixture
def slurm_server(make_server, ssh, slurm, tmp_path):
    """A server whose one node is the Slurm cluster, its login host reached through the
    jump host; ``gres`` and the like go into the node's settings."""
    open_to_nodes(tmp_path)

    def make(start=True, **node):
        cfg = ssh.config()
        cfg["nodes"] = [{**cfg["nodes"][0], "kind": "slurm", "env": slurm.env(),
                         "workdir": str(tmp_path / "slurm-work"), "partition": "debug",
                         "max_jobs": 20, **node}]
        server = make_server(start=start, **cfg)
        if start:
            wait_online(server)
        return server
    yield make
    # Whatever a test left in Slurm goes, so that the next one starts with a free cluster.
    ids = slurm.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if ids:
        slurm.run("scancel", *ids, check=False)


def wait_online(server, timeout=60):
    end = time.monotonic() + timeout
    while (node := server.get("/api/nodes").json()["nodes"][0])["state"] != "online":
        assert time.monotonic() < end, f"slurm node not online: {node}\n{server.log()}"
        time.sleep(0.1)
    return node


def wait_slurm_state(server, job_id, state, timeout=60):
    """Poll status until Slurm's state is ``state``.  gpuqueue looks every 2 s, so a
    RUNNING state a test waits for must last well beyond that (the jobs sleep 8 s)."""
    end = time.monotonic() + timeout
    while (st := server.status(job_id)).get("slurm_state") != state:
        assert time.monotonic() < end, st
        time.sleep(0.2)
    return st


def in_slurm(slurm, job_id):
    """Slurm's (id, state) of every Slurm job named after gpuqueue's job."""
    out = slurm.run("squeue", "-h", "-t", "all", f"--name=gq-{job_id}", "-o", "%i %T").stdout
    return [tuple(line.split()) for line in out.splitlines()]


def test_a_job_runs_in_slurm_and_its_output_comes_back(slurm_server, slurm, ssh, tmp_path):
    # A workdir under the login user's home, written with ~, as most configs have it:
    # Slurm gets absolute paths all the same.
    home_dir = (NODE_HOME if ssh.node_user else Path.home()) / f"gq-slurm-test-{tmp_path.name}"
    server = slurm_server(gres="gpu:1", workdir=f"~/{home_dir.name}")
    sub = server.submit_ok("import os\nprint('hello from slurm', os.environ['CUDA_VISIBLE_DEVICES'],"
                           " os.environ['GPUQUEUE_JOB_ID'])\n", expected_time=60)
    st = server.wait(sub["job_id"], timeout=90)
    assert st["status"] == "completed" and st["exit_code"] == 0 and st["error"] is None
    assert st["slurm_state"] == "COMPLETED" and st["slurm_job_id"].isdigit()
    res = server.results(sub["job_id"])
    assert res["stdout"] == f"hello from slurm 0 {sub['job_id']}\n"  # Slurm gave it GPU 0
    assert in_slurm(slurm, sub["job_id"]) == [(st["slurm_job_id"], "COMPLETED")]
    info = slurm.job(st["slurm_job_id"])
    assert info["Partition"] == "debug" and "gpu:1" in info.get("TresPerNode", info.get("Gres", ""))
    # The time limit Slurm got is timeout_multiplier x expected_time: 2 x 60 s.
    assert info["TimeLimit"] == "00:02:00"
    assert info["WorkDir"] == str(home_dir / sub["job_id"])
    # Removed once the job and its files were recorded; beside it, the node program
    # (a project's unpacker) stays in the workdir.
    wait_for(lambda: not (home_dir / sub["job_id"]).exists(), "the job's folder removed")
    left = [p.name for p in home_dir.iterdir()]  # (an earlier release's too, if one ran here)
    assert left and all(n.startswith("gq_node-") and n.endswith(".py") for n in left), left
    shutil.rmtree(home_dir)


def test_a_failing_job_reports_its_exit_code_and_stderr(slurm_server):
    server = slurm_server()
    sub = server.submit_ok("import sys\nprint('bad things', file=sys.stderr)\nsys.exit(3)\n")
    st = server.wait(sub["job_id"], timeout=90)
    assert st["status"] == "failed" and st["exit_code"] == 3 and st["error"] == "exit code 3"
    assert st["slurm_state"] == "FAILED"
    assert server.results(sub["job_id"])["stderr"] == "bad things\n"


def test_cancel_pending_and_running_leaves_nothing(slurm_server, slurm, tmp_path):
    server = slurm_server(gres="gpu:1")
    pids = tmp_path / "pids"
    code = (f"import os, time\nopen({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
            "time.sleep(300)\n")
    subs = [server.submit_ok(code, expected_time=600) for _ in range(3)]
    running = [wait_slurm_state(server, s["job_id"], "RUNNING") for s in subs[:2]]
    # Two GPUs: the third waits in Slurm, and shows as pending.
    waiting = wait_slurm_state(server, subs[2]["job_id"], "PENDING")
    assert waiting["status"] == "pending" and waiting["started_at"] is None
    assert server.get("/api/nodes").json()["nodes"][0]["slurm"] == {"pending": 1, "running": 2}

    token = server.token()
    for sub in (subs[2], subs[0]):
        r = server.post(f"/api/cancel/{sub['job_id']}", token)
        assert r.status_code == 200, r.text
        st = server.wait(sub["job_id"], timeout=60)
        assert st["status"] == "cancelled" and st["slurm_state"] == "CANCELLED"
    # The cancelled running job's process is gone; the pending one never started.
    end = time.monotonic() + 30
    while True:
        started = [int(p) for p in pids.read_text().split()]
        if len(started) == 2 and sum(alive(p) for p in started) == 1:
            break
        assert time.monotonic() < end, started
        time.sleep(0.2)
    assert [s for _, s in in_slurm(slurm, subs[2]["job_id"])] == ["CANCELLED"]
    server.post(f"/api/cancel/{running[1]['job_id']}", token)
    assert server.wait(running[1]["job_id"], timeout=60)["status"] == "cancelled"


def test_many_jobs_at_once(slurm_server):
    server = slurm_server(max_jobs=16)
    code = "import time\nstart = time.time()\ntime.sleep(2)\nprint(start, time.time())\n"
    subs = [server.submit_ok(code, expected_time=60) for _ in range(12)]
    spans = []
    for sub in subs:
        assert server.wait(sub["job_id"], timeout=120)["status"] == "completed"
        spans.append([float(x) for x in server.results(sub["job_id"])["stdout"].split()])
    # Slurm ran several at once: at the busiest moment, more than two overlapped.
    busiest = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert busiest > 2, spans


def test_sbatch_refusal_fails_the_job_with_slurms_words(slurm_server):
    server = slurm_server(partition="no-such-partition")
    sub = server.submit_ok("print(1)\n")
    st = server.wait(sub["job_id"], timeout=60)
    assert st["status"] == "failed" and st["error"].startswith("sbatch refused the job:")
    assert "partition" in st["error"].lower()


def test_time_limit_ends_as_timeout(slurm_server):
    server = slurm_server(gres="gpu:1")
    sub = server.submit_ok("import time\nprint('start', flush=True)\ntime.sleep(600)\n",
                           expected_time=5)  # a 10 s limit; Slurm enforces it within ~30-60 s
    st = server.wait(sub["job_id"], timeout=180)
    assert st["status"] == "failed" and st["error"] == "timeout" and st["slurm_state"] == "TIMEOUT"
    assert server.results(sub["job_id"])["stdout"] == "start\n"


def test_kill_9_then_restart_reattaches_by_recorded_id(slurm_server, slurm):
    server = slurm_server()
    sub = server.submit_ok("import time\ntime.sleep(8)\nprint('survived')\n", expected_time=60)
    st = wait_slurm_state(server, sub["job_id"], "RUNNING")
    server.kill()
    server.start()
    wait_online(server)
    done = server.wait(sub["job_id"], timeout=90)
    assert done["status"] == "completed" and done["slurm_job_id"] == st["slurm_job_id"]
    assert server.results(sub["job_id"])["stdout"] == "survived\n"
    assert len(in_slurm(slurm, sub["job_id"])) == 1


def test_crash_between_sbatch_and_recording_never_submits_twice(slurm_server, slurm, tmp_path):
    """A job claimed and sent to sbatch, but the server died before it wrote the id
    down: at restart it is found in Slurm by name, not submitted again."""
    server = slurm_server(start=False)
    server.start()
    wait_online(server)
    blocker = server.submit_ok("import time\ntime.sleep(8)\nprint('first')\n", expected_time=60)
    wait_slurm_state(server, blocker["job_id"], "RUNNING")
    server.kill()
    # Put the spool where the crash would have left it: slurm.json not yet written.
    folder = server.dir / "spool" / "nodes" / "0" / "running" / blocker["job_id"]
    assert (folder / "launching").exists()
    (folder / "slurm.json").unlink()
    server.start()
    wait_online(server)
    done = server.wait(blocker["job_id"], timeout=90)
    assert done["status"] == "completed" and server.results(blocker["job_id"])["stdout"] == "first\n"
    assert len(in_slurm(slurm, blocker["job_id"])) == 1, in_slurm(slurm, blocker["job_id"])


def test_a_claimed_job_that_never_reached_slurm_is_queued_again(slurm_server, slurm):
    server = slurm_server(start=False)
    server.start()
    wait_online(server)
    sub = server.submit_ok("print('once')\n")
    server.wait(sub["job_id"], timeout=90)
    # Build the other crash by hand: a claimed job with no launching mark and no id.
    server.kill()
    done_folder = server.dir / "spool" / "done" / sub["job_id"]
    meta = json.loads((done_folder / "job.json").read_text())
    new_id = sub["job_id"][:-1] + ("0" if sub["job_id"][-1] != "0" else "1")
    claimed = server.dir / "spool" / "nodes" / "0" / "running" / new_id
    claimed.mkdir(parents=True)
    (claimed / "job.json").write_text(json.dumps({**meta, "id": new_id}))
    (claimed / "code.py").write_text("print('queued again')\n")
    (claimed / "config.yaml").write_text("# test\n")
    (claimed / "start.json").write_text(json.dumps({"started_at": time.time(), "node_id": 0}))
    server.start()
    wait_online(server)
    st = server.wait(new_id, timeout=90)
    assert st["status"] == "completed" and server.results(new_id)["stdout"] == "queued again\n"
    assert len(in_slurm(slurm, new_id)) == 1


def test_slurm_listens_on_loopback_only(slurm):
    listening = slurm.listening()
    assert len(listening) == 2 and all(line.startswith("127.0.0.1:") for line in listening), listening


def forgotten_while_down(server, slurm, code):
    """Run ``code`` in Slurm, kill the server while it runs, wait until slurmctld has
    purged the ended job (MinJobAge, then its next purge), restart the server.
    Returns (the status seen while it ran, the status it ends with)."""
    sub = server.submit_ok(code, expected_time=60)
    running = wait_slurm_state(server, sub["job_id"], "RUNNING")
    server.kill()
    end = time.monotonic() + 300
    while in_slurm(slurm, sub["job_id"]):
        assert time.monotonic() < end, in_slurm(slurm, sub["job_id"])
        time.sleep(2)
    server.start()
    return running, server.wait(sub["job_id"], timeout=60)


def test_a_job_slurm_forgot_while_the_server_was_down_fails_with_its_output(slurm_server, slurm):
    server = slurm_server()
    st, done = forgotten_while_down(server, slurm, "import time\ntime.sleep(8)\nprint('left behind')\n")
    # No accounting here to ask (sacct is off): a clear failure that keeps the output.
    assert done["status"] == "failed", done
    assert done["error"] == f"Slurm no longer knows job {st['slurm_job_id']}, and keeps no accounting"
    assert server.results(done["job_id"])["stdout"] == "left behind\n"


def test_jobs_of_several_gpus_become_gres_and_never_share_a_gpu(slurm_server, slurm, tmp_path):
    from test_gpus import assert_never_shared, made, recording_job, records, submit_gpus
    folder = made(tmp_path / "records")
    server = slurm_server(gres="gpu:1", gpus="0,1")  # the cluster's 2 fake GPUs
    sizes = [1, 2, 1, 1, 2, 1]
    subs = [(submit_gpus(server, recording_job(folder, 1), g, expected_time=60), g) for g in sizes]
    for sub, gpus in subs:
        st = server.wait(sub["job_id"], timeout=120)
        assert st["status"] == "completed", st
        info = slurm.job(st["slurm_job_id"])
        assert f"gpu:{gpus}" in info.get("TresPerNode", info.get("Gres", "")), info
    found = records(folder)
    assert [len(found[sub["job_id"]]["devices"]) for sub, _ in subs] == sizes
    assert_never_shared(found)
    r = server.submit("print(1)\n", config=job_config("alice", 5, gpus=3))
    assert r.status_code == 400 and "no node has more than 2" in r.json()["error"]


def test_a_setup_line_that_fails_stops_a_slurm_job_before_its_python(make_server, ssh, slurm,
                                                                     tmp_path):
    """Slurm's job script runs an environment's setup as the wrapper does: a command of
    it that fails ends the job there, with its status, never the python half set up."""
    open_to_nodes(tmp_path)
    flag = tmp_path / "no-module-now"
    cfg = ssh.config()
    cfg["nodes"] = [{**cfg["nodes"][0], "kind": "slurm", "env": slurm.env(),
                     "workdir": str(tmp_path / "slurm-work"), "partition": "debug",
                     "environments": ["later"]}]
    cfg["environments"] = {"later": {"python": "/usr/bin/python3",
                                     "setup": f"test ! -e {flag}\nexport GQ_SETUP=set-up"}}
    server = make_server(**cfg)
    wait_online(server)
    job = "import os\nprint(os.environ.get('GQ_SETUP'))\n"
    sub = server.submit_ok(job, config=job_config(environment="later"))["job_id"]
    assert server.wait(sub, timeout=90)["status"] == "completed"
    assert server.results(sub)["stdout"] == "set-up\n"
    flag.touch()
    sub = server.submit_ok(job, config=job_config(environment="later"))["job_id"]
    st = server.wait(sub, timeout=90)
    assert (st["status"], st["exit_code"]) == ("failed", 1), st
    assert server.results(sub)["stdout"] == ""


def test_a_retried_job_is_never_taken_for_its_earlier_attempt(slurm_server, slurm, tmp_path):
    """Slurm lists a finished job for a while (MinJobAge): a retry's attempt is found by
    a name of its own, never by the failed attempt's line beside it."""
    server = slurm_server()
    marker = tmp_path / "first-try"
    code = (f"import os, sys, time\nif not os.path.exists({str(marker)!r}):\n"
            f"    open({str(marker)!r}, 'w').close()\n    sys.exit(3)\n"
            "time.sleep(6)\nprint('second')\n")
    job_id = server.submit_ok(code, config=job_config(expected_time=60, retries=1))["job_id"]
    st = server.wait(job_id, timeout=120)
    assert (st["status"], st["attempt"], st["exit_code"]) == ("completed", 2, 0), st
    assert server.results(job_id)["stdout"] == "second\n"
    assert [state for _, state in in_slurm(slurm, job_id)] == ["FAILED"]  # the first's
