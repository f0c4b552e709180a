"""kill -9 the real server, again and again, and find every acknowledged job exactly once."""
import random
import signal
import threading
import time

import requests

from conftest import job_config
from sshcluster import open_to_nodes
from test_ssh import cluster, wait_nodes  # noqa: F401  (the sshd cluster fixture)


def all_jobs(server, token):
    jobs, cursor = [], None
    while True:
        q = "/api/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else "")
        page = server.get(q, token).json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return jobs


def test_kill_9_twenty_times_under_four_submitters(make_server, tmp_path):
    server = make_server(max_pending_per_user=100000)
    token = server.token("alice")
    admin = server.token("root", admin=True)
    runs = tmp_path / "runs"
    acked = {}  # job_id -> nonce
    lock = threading.Lock()
    stop = threading.Event()
    errors = []

    def submitter(k):
        try:
            submit_until_stopped(k)
        except BaseException as exc:  # a thread's failure must fail the test
            errors.append(exc)

    def submit_until_stopped(k):
        n = 0
        while not stop.is_set():
            nonce = f"s{k}-{n}"
            n += 1
            code = (f"import time\nopen({str(runs)!r}, 'a').write('{nonce}\\n')\n"
                    f"time.sleep({random.choice([0, 0.05, 0.3])})\nprint('{nonce}')\n")
            try:
                r = requests.post(server.url + "/api/submit",
                                  headers={"Authorization": f"Bearer {token}"}, timeout=10,
                                  files={"code": ("j.py", code),
                                         "config_file": ("c.yaml", job_config("alice", 30))})
            except requests.RequestException:
                time.sleep(0.05)
                continue
            assert r.status_code == 201, r.text
            with lock:
                acked[r.json()["job_id"]] = nonce

    threads = [threading.Thread(target=submitter, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    rng = random.Random(1234)
    for _ in range(20):
        time.sleep(rng.uniform(0.1, 0.6))
        server.kill(signal.SIGKILL)
        server.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors

    assert len(acked) >= 20, "the submitters hardly got through"
    for job_id, nonce in acked.items():
        st = server.wait(job_id, timeout=120)
        assert st["status"] == "completed", (st, server.log()[-3000:])
        assert server.results(job_id)["stdout"] == nonce + "\n"
    jobs = all_jobs(server, admin)
    ids = [j["job_id"] for j in jobs]
    assert len(ids) == len(set(ids)), "a job is listed twice"
    assert set(acked) <= set(ids)
    for j in jobs:  # jobs whose submit got no answer may exist too, but only whole
        server.wait(j["job_id"], user="alice", timeout=120)
    lines = runs.read_text().split()
    assert len(lines) == len(set(lines)), "a job was started twice"
    assert set(acked.values()) <= set(lines)
    assert list((server.dir / "spool" / "corrupt").iterdir()) == []
    assert list((server.dir / "spool" / "tmp").iterdir()) == []


def test_kill_9_while_jobs_run_on_ssh_nodes(make_server, cluster, tmp_path):  # noqa: F811
    cfg = cluster.config()
    cfg["nodes"] = cfg["nodes"][:3]
    server = make_server(**cfg)
    wait_nodes(server, "online", [0, 1, 2])
    runs = open_to_nodes(tmp_path) / "runs"
    code = ("import os, sys, time\n"
            f"open({str(runs)!r}, 'a').write(os.environ['GPUQUEUE_JOB_ID'] + '\\n')\n"
            "print('start', flush=True)\ntime.sleep(3)\nprint('end')\n"
            "print('err', file=sys.stderr)\n")
    subs = [server.submit_ok(code, expected_time=30) for _ in range(3)]
    timed = server.submit_ok("import time\nprint('x', flush=True)\ntime.sleep(120)\n",
                             expected_time=2)  # killed after 4 s, on the node, server or not
    for s in subs + [timed]:
        server.wait(s["job_id"], ("running",))
    server.kill(signal.SIGKILL)
    time.sleep(1)
    server.start()
    for s in subs:
        st = server.wait(s["job_id"], timeout=60)
        assert st["status"] == "completed", st
        res = server.results(s["job_id"])
        assert (res["stdout"], res["stderr"]) == ("start\nend\n", "err\n")
    st = server.wait(timed["job_id"], timeout=60)
    assert st["status"] == "failed" and st["error"] == "timeout"
    assert server.results(timed["job_id"])["stdout"] == "x\n"
    assert sorted(runs.read_text().split()) == sorted(s["job_id"] for s in subs)
