"""Jobs made ready on their node before its GPU frees (GpuWorker.prepare): each runs
once, one after the other on a GPU, never side by side; a cancelled or drained one
never starts; a kill -9 of the server while one waits leaves every job run once."""
import os
import signal
import time

from conftest import job_config, wait_for

STAMP = ("import os, time\nopen(os.path.join({folder!r}, os.environ['GPUQUEUE_JOB_ID']), 'a')"
         ".write('x')\nprint(time.time(), flush=True)\ntime.sleep({sleep})\nprint(time.time())\n")


def spans(server, ids):
    out = []
    for job_id in ids:
        lines = server.results(job_id)["stdout"].split()
        out.append((float(lines[0]), float(lines[1])))
    return sorted(out)


def test_jobs_follow_each_other_prepared_each_once_never_side_by_side(make_server, tmp_path):
    server = make_server(nodes=1)
    ran = tmp_path / "ran"
    ran.mkdir()
    ids = [server.submit_ok(STAMP.format(folder=str(ran), sleep=0.3), expected_time=5)["job_id"]
           for _ in range(6)]
    for job_id in ids:
        assert server.wait(job_id)["status"] == "completed"
    assert sorted(os.listdir(ran)) == sorted(ids)
    assert all((ran / j).read_text() == "x" for j in ids)  # each ran once
    found = spans(server, ids)
    assert all(b[0] > a[1] for a, b in zip(found, found[1:])), found  # one GPU, one at a time
    assert server.log().count("(prepared)") >= 4, server.log()[-3000:]


def test_a_prepared_job_shows_as_pending_and_a_cancel_keeps_it_from_ever_starting(
        make_server, tmp_path):
    server = make_server(nodes=1)
    gate = tmp_path / "gate"
    first = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                             "    time.sleep(0.05)\n", expected_time=5)["job_id"]
    server.wait(first, ("running",))
    marker = tmp_path / "never"
    second = server.submit_ok(f"open({str(marker)!r}, 'w').write('ran')\n",
                              expected_time=5)["job_id"]
    node = wait_for(lambda: (n := server.get("/api/nodes").json()["nodes"][0])["prepared_jobs"]
                    and n, "the second job to be prepared")
    assert node["prepared_jobs"] == [second] and node["running_jobs"] == [first]
    st = server.status(second)
    assert st["status"] == "pending" and st["started_at"] is None and "ready on node 0" in \
        st["waiting"], st
    r = server.post(f"/api/cancel/{second}", server.token())
    assert r.status_code == 200, r.text
    assert server.wait(second)["status"] == "cancelled"
    third = server.submit_ok("print('third')\n", expected_time=5)["job_id"]
    gate.touch()
    assert server.wait(first)["status"] == "completed"
    assert server.wait(third)["status"] == "completed"
    time.sleep(0.5)
    assert not marker.exists(), "a cancelled job ran"


def test_a_drained_node_gives_its_prepared_job_to_another(make_server, tmp_path):
    server = make_server(nodes=2)
    gate = tmp_path / "gate"
    hold = (f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
            "    time.sleep(0.05)\n")
    a = server.submit_ok(hold, expected_time=5)["job_id"]
    b = server.submit_ok(hold, expected_time=5)["job_id"]
    server.wait(a, ("running",))
    server.wait(b, ("running",))
    c = server.submit_ok("print('c')\n", expected_time=5)["job_id"]
    node = wait_for(lambda: next((n for n in server.get("/api/nodes").json()["nodes"]
                                  if n["prepared_jobs"]), None), "the third job to be prepared")
    r = server.cli("nodes", "drain", str(node["id"]))
    assert "drained" in r.stdout
    wait_for(lambda: not any(n["prepared_jobs"] for n in server.get("/api/nodes").json()["nodes"]),
             "the drained node to give its prepared job back")
    gate.touch()
    st = server.wait(c)
    assert st["status"] == "completed" and st["node_id"] != node["id"], st


def test_a_kill_9_while_a_job_waits_prepared_runs_every_job_once(make_server, tmp_path):
    server = make_server(nodes=1)
    ran = tmp_path / "ran"
    ran.mkdir()
    gate = tmp_path / "gate"
    first = server.submit_ok(
        f"import os, time\nopen(os.path.join({str(ran)!r}, 'first'), 'a').write('x')\n"
        f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n",
        expected_time=5)["job_id"]
    server.wait(first, ("running",))
    second = server.submit_ok(f"open(os.path.join({str(ran)!r}, 'second'), 'a').write('x')\n"
                              .replace("open(", "import os\nopen(", 1), expected_time=5)["job_id"]
    wait_for(lambda: server.get("/api/nodes").json()["nodes"][0]["prepared_jobs"] == [second],
             "the second job to be prepared")
    server.kill(signal.SIGKILL)
    gate.touch()  # the first ends while no server is there: its agent went with the server
    time.sleep(1)
    server.start()
    assert server.wait(first)["status"] == "completed"
    assert server.wait(second)["status"] == "completed"
    assert (ran / "first").read_text() == "x" and (ran / "second").read_text() == "x"
    assert "Traceback" not in server.log()


def test_an_idle_node_asks_back_a_job_prepared_behind_a_long_one(make_server, tmp_path):
    server = make_server(nodes=2, timeout_multiplier=100)
    gate = tmp_path / "gate"
    long = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                            "    time.sleep(0.05)\n", expected_time=1)["job_id"]
    short = server.submit_ok("import time\ntime.sleep(1)\n", expected_time=30)["job_id"]
    server.wait(long, ("running",))
    server.wait(short, ("running",))
    long_node = server.status(long)["node_id"]
    waiting = server.submit_ok("print('w')\n", config=job_config("alice", 5))["job_id"]
    # Planned or prepared behind the long job; once the short one ends, its node takes it.
    st = server.wait(waiting, timeout=30)
    assert st["status"] == "completed" and st["node_id"] != long_node, st
    assert server.status(long)["status"] == "running"
    gate.touch()


def test_a_job_that_comes_ahead_in_turn_takes_the_place_of_a_prepared_one(make_server, tmp_path):
    """Both nodes busy, each with one of alice's jobs prepared to follow: bob's job,
    submitted after, is in turn before them (alice has had her turns), so its submit
    wakes them, one of alice's is given back and bob's is prepared instead; it starts
    with the first free GPU."""
    # Leases renewed every 50 s: only the submit wakes a node to look again in time.
    server = make_server(nodes=2, timeout_multiplier=100, node_timeout=200)
    gate = tmp_path / "gate"
    gated = f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n"
    for _ in range(2):
        server.wait(server.submit_ok(gated, expected_time=5)["job_id"], ("running",))
    alice = [server.submit_ok("print('a')\n", expected_time=5)["job_id"] for _ in range(2)]
    wait_for(lambda: sorted(j for n in server.get("/api/nodes").json()["nodes"]
                            for j in n["prepared_jobs"]) == sorted(alice),
             "alice's two jobs to be prepared, one on each node")
    bob = server.submit_ok("print('b')\n", user="bob", expected_time=5)["job_id"]
    wait_for(lambda: bob in [j for n in server.get("/api/nodes").json()["nodes"]
                             for j in n["prepared_jobs"]], "bob's job to be prepared", timeout=20)
    assert "given back: another job is in turn before it" in server.log()
    gate.touch()
    for job_id in alice + [bob]:
        assert server.wait(job_id, user="bob" if job_id == bob else "alice")["status"] \
            == "completed"
    started = {j: server.status(j, user="bob" if j == bob else "alice")["started_at"]
               for j in alice + [bob]}
    assert started[bob] < max(started[a] for a in alice), started
