"""For the people who run it: retention of finished jobs, results beside a drop
folder's receipt, and /metrics read with a real Prometheus parser."""
import json
import os
import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import job_config, wait_for
from test_client import fake_nvidia_smi
from test_incoming import drop, outcome


def families(server):
    """{sample name: {labels tuple: value}}, parsed as Prometheus would."""
    found = {}
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def test_finished_jobs_and_quarantined_folders_expire(make_server):
    # 3 seconds of keeping (a fraction of a day); the sweep runs every second then.
    server = make_server(nodes=1, keep_finished_days=3 / 86400)
    old = server.submit_ok("print('old')\n")
    server.wait(old["job_id"])
    corrupt = server.dir / "spool" / "corrupt"
    (corrupt / "junk.abc123").mkdir()
    (corrupt / "junk.abc123.REASON").write_text("a test's junk\n")
    done = server.dir / "spool" / "done" / old["job_id"]
    assert done.is_dir()
    wait_for(lambda: not done.exists(), "the old job to be removed", timeout=30)
    wait_for(lambda: not os.listdir(corrupt), "the quarantined folder to be removed", timeout=30)
    assert server.get(f"/api/status/{old['job_id']}", server.token()).status_code == 404
    assert server.get("/api/jobs", server.token()).json()["jobs"] == []
    nodes = server.get("/api/nodes").json()["nodes"]
    assert nodes[0]["completed"] == 0
    assert "removed 1 finished job(s)" in server.log()
    # A fresh job is kept while it is younger than the limit.
    new = server.submit_ok("print('new')\n")
    server.wait(new["job_id"])
    assert server.get(f"/api/results/{new['job_id']}", server.token()).json()["stdout"] == "new\n"


def test_a_finished_job_that_a_pending_one_needs_stays_across_a_restart(make_server, tmp_path):
    """Retention keeps a job that an unfinished one names in ``after``: a restart reads
    its status again, and had it gone, the job waiting on it would be cancelled."""
    server = make_server(nodes=1, keep_finished_days=3 / 86400)

    def gated(flag):
        return (f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n"
                "    time.sleep(0.05)\n")
    first = server.submit_ok(gated(tmp_path / "first"), expected_time=120)["job_id"]
    blocker = server.submit_ok(gated(tmp_path / "blocker"), expected_time=120)["job_id"]
    second = server.submit_ok("print('second')\n", config=job_config(after=[first]))["job_id"]
    (tmp_path / "first").touch()
    server.wait(first)
    server.wait(blocker, ("running",))  # (in turn before second, which stays pending)
    # A sweep that removes what was put aside after first finished has looked at first.
    junk = server.dir / "spool" / "corrupt" / "junk.abc123"
    junk.mkdir()
    wait_for(lambda: not junk.exists(), "a sweep", timeout=30)
    assert (server.dir / "spool" / "done" / first).is_dir()  # kept: second needs it
    assert server.status(second)["status"] == "pending"
    server.kill()
    server.start()
    (tmp_path / "blocker").touch()
    st = server.wait(second, timeout=60)
    assert st["status"] == "completed", st
    assert server.results(second)["stdout"] == "second\n"


def test_keep_forever_with_zero(make_server):
    server = make_server(nodes=1, keep_finished_days=0)
    job = server.submit_ok("print(1)\n")
    server.wait(job["job_id"])
    finished = time.monotonic()
    # Three seconds of keeping would remove it within about four; zero keeps it.
    time.sleep(max(0.0, 5 - (time.monotonic() - finished)))
    assert (server.dir / "spool" / "done" / job["job_id"]).is_dir()
    refused = make_server(nodes=1, keep_finished_days=-1, start=False)
    r = refused.cli("serve", check=False)
    assert r.returncode == 1 and "'keep_finished_days' is too small" in r.stderr


def test_a_dropped_jobs_results_land_beside_its_receipt(server):
    token = server.token("alice")
    files = {"train.py": "import sys\nprint('out é')\nprint('err', file=sys.stderr)\nsys.exit(4)\n",
             "config.yaml": job_config("alice", 10, token=token)}
    incoming = drop(server, "run1", files)
    receipt = json.loads(outcome(incoming, "run1").read_text())
    job_id = receipt["job_id"]
    result = incoming / f"run1.{job_id}.result.json"
    wait_for(result.exists, "the result beside the receipt")
    r = json.loads(result.read_text())
    assert r["job_id"] == job_id and r["status"] == "failed" and r["exit_code"] == 4
    assert r["finished_at"].endswith("Z")
    assert (incoming / f"run1.{job_id}.stdout").read_text() == "out é\n"
    assert (incoming / f"run1.{job_id}.stderr").read_text() == "err\n"
    # What gpuqueue wrote there is never taken for a new drop.
    time.sleep(1)
    assert not any(p.name.endswith(".refused") for p in incoming.iterdir())


def test_results_of_a_drop_are_delivered_after_a_restart(make_server):
    server = make_server(nodes=1)
    token = server.token("alice")
    files = {"slow.py": "import time\ntime.sleep(3)\nprint('late')\n",
             "config.yaml": job_config("alice", 30, token=token)}
    incoming = drop(server, "run2", files)
    job_id = json.loads(outcome(incoming, "run2").read_text())["job_id"]
    server.wait(job_id, ("running",))
    server.kill()
    server.start()
    wait_for((incoming / f"run2.{job_id}.result.json").exists, "the result after a restart")
    assert (incoming / f"run2.{job_id}.stdout").read_text() == "late\n"


def test_metrics_parse_and_count_from_zero_after_a_restart(make_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path)}:{os.environ['PATH']}")
    server = make_server(nodes=[{"id": 0, "host": "local", "gpus": "0"},
                                {"id": 1, "host": "local", "gpus": "2"}])
    job = server.submit_ok("print(1)\n")
    server.wait(job["job_id"])
    m = wait_for(lambda: (f := families(server)) and f.get("gpuqueue_gpu_memory_used_bytes")
                 and len(f["gpuqueue_gpu_memory_used_bytes"]) == 2 and f, "GPU figures")
    node = job["node_id"]
    assert m["gpuqueue_jobs_started_total"][(("node", str(node)),)] == 1
    assert m["gpuqueue_jobs_finished_total"][(("node", str(node)), ("status", "completed"))] == 1
    assert m["gpuqueue_jobs_kept"][(("node", str(node)), ("status", "completed"))] == 1
    # The fake nvidia-smi: GPU 0 uses 1024 of 40960 MiB at 37 %, GPU 2 512 MiB at 5 %.
    assert m["gpuqueue_gpu_memory_used_bytes"] == {(("gpu", "0"), ("node", "0")): 1024 * 2**20,
                                                   (("gpu", "2"), ("node", "1")): 512 * 2**20}
    assert m["gpuqueue_gpu_memory_total_bytes"][(("gpu", "0"), ("node", "0"))] == 40960 * 2**20
    assert m["gpuqueue_gpu_utilization_ratio"][(("gpu", "0"), ("node", "0"))] == 0.37
    server.kill()
    server.start()
    m = families(server)
    # Both counters start again from 0 together; what the spool keeps is a gauge.
    assert m["gpuqueue_jobs_started_total"][(("node", str(node)),)] == 0
    assert m["gpuqueue_jobs_finished_total"][(("node", str(node)), ("status", "completed"))] == 0
    assert m["gpuqueue_jobs_kept"][(("node", str(node)), ("status", "completed"))] == 1
