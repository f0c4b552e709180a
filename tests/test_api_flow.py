"""The original README's flow and the job lifecycle, over real HTTP against a real server."""
import time

from conftest import GRANDCHILD, alive, job_pids, job_config, wait_for


HELLO = 'import time\nprint("Hello from GPU!")\ntime.sleep(0.2)\nprint("Job complete!")\n'


def test_original_readme_flow(server):
    token = server.token("myuser")
    # The original puts the token in config.yaml and sends no header.
    config = job_config("myuser", 10, token=token)
    r = server.post("/api/submit", files={"code": ("my_script.py", HELLO),
                                          "config_file": ("config.yaml", config)})
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["status"] == "pending" and sub["queue_position"] == 0
    assert sub["node_id"] == 0

    st = server.wait(sub["job_id"], token=token)
    assert st["status"] == "completed" and st["exit_code"] == 0 and st["error"] is None
    assert st["user_id"] == "myuser" and st["competition_id"] == "comp123"
    assert st["started_at"] and st["finished_at"] and st["submitted_at"].endswith("Z")

    res = server.get(f"/api/results/{sub['job_id']}", token).json()
    assert res == {"job_id": sub["job_id"], "status": "completed", "exit_code": 0, "error": None,
                   "stdout": "Hello from GPU!\nJob complete!\n", "stderr": ""}

    jobs = server.get("/api/jobs", token).json()
    assert [j["job_id"] for j in jobs["jobs"]] == [sub["job_id"]]
    assert server.get("/api/jobs?status=completed&user_id=myuser", token).json()["jobs"]
    assert server.get("/api/jobs?status=running", token).json()["jobs"] == []

    nodes = server.get("/api/nodes").json()["nodes"]
    assert [n["id"] for n in nodes] == list(range(8))
    assert nodes[0]["completed"] == 1 and nodes[0]["state"] == "online"

    info = server.get("/").json()
    assert info["name"] == "gpuqueue" and info["nodes"] == 8 and info["queue_length"] == 0

    r = server.post(f"/api/cancel/{sub['job_id']}", token)
    assert r.status_code == 409 and "already completed" in r.json()["error"]


def test_job_folder_keeps_script_and_config_without_token(server):
    token = server.token("alice")
    sub = server.submit_ok(HELLO, config=job_config("alice", 5, token=token), token=token)
    server.wait(sub["job_id"])
    folder = server.dir / "spool" / "done" / sub["job_id"]
    assert (folder / "code.py").read_text() == HELLO
    kept = (folder / "config.yaml").read_text()
    assert token not in kept and "expected_time: 5" in kept
    assert not (folder / "work").exists()


def test_environment_of_a_local_job(server):
    code = "import os\nfor k in ('CUDA_VISIBLE_DEVICES','CUDA_DEVICE_ORDER','GPUQUEUE_JOB_ID'):\n print(os.environ[k])\n"
    subs = [server.submit_ok(code) for _ in range(2)]
    for sub in subs:
        server.wait(sub["job_id"])
        out = server.results(sub["job_id"])["stdout"].split()
        assert out == [str(sub["node_id"]), "PCI_BUS_ID", sub["job_id"]]


def test_failing_job_reports_exit_code_and_traceback(server):
    sub = server.submit_ok("import sys\nprint('before')\nraise SystemExit(3)\n")
    st = server.wait(sub["job_id"])
    assert st["status"] == "failed" and st["exit_code"] == 3 and st["error"] == "exit code 3"
    sub = server.submit_ok("1/0\n")
    server.wait(sub["job_id"])
    res = server.results(sub["job_id"])
    assert res["status"] == "failed" and res["exit_code"] == 1
    assert "ZeroDivisionError" in res["stderr"]


def test_eight_equal_jobs_go_to_eight_nodes(server):
    subs = [server.submit_ok("import time\ntime.sleep(0.5)\n", expected_time=60) for _ in range(8)]
    assert sorted(s["node_id"] for s in subs) == list(range(8))
    assert all(s["queue_position"] == 0 for s in subs)
    for s in subs:
        assert server.wait(s["job_id"])["node_id"] == s["node_id"]


def test_placement_prefers_least_queued_time(make_server):
    server = make_server(nodes=2)
    long = server.submit_ok("import time\ntime.sleep(30)\n", expected_time=100)
    short = [server.submit_ok("import time\ntime.sleep(30)\n", expected_time=10) for _ in range(3)]
    # node 0 carries 100 s; the three 10 s jobs all fit on node 1 before it catches up.
    assert long["node_id"] == 0
    assert [s["node_id"] for s in short] == [1, 1, 1]
    server.wait(short[0]["job_id"], ("running",))
    # Due to end within PREPARE_AHEAD, it has the next made ready behind it on node 1:
    # that one is next, and the one after it still has one job ahead.
    wait_for(lambda: "ready on node 1" in (server.status(short[1]["job_id"]).get("waiting") or ""),
             what="the next job prepared")
    assert [server.status(s["job_id"])["queue_position"] for s in short[1:]] == [0, 1]


def test_results_of_unfinished_job_is_409(make_server):
    server = make_server(nodes=1)
    running = server.submit_ok("import time\ntime.sleep(30)\n")
    pending = server.submit_ok("print(1)\n")
    server.wait(running["job_id"], ("running",))
    for sub, state in ((running, "running"), (pending, "pending")):
        r = server.get(f"/api/results/{sub['job_id']}", server.token())
        assert r.status_code == 409 and state in r.json()["error"]


def test_cancel_pending_job_never_runs(make_server, tmp_path):
    server = make_server(nodes=1)
    marker = tmp_path / "ran"
    first = server.submit_ok("import time\ntime.sleep(30)\n")
    second = server.submit_ok(f"open({str(marker)!r}, 'w').write('x')\n")
    server.wait(first["job_id"], ("running",))
    assert server.status(second["job_id"])["queue_position"] == 0
    r = server.post(f"/api/cancel/{second['job_id']}", server.token())
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    server.post(f"/api/cancel/{first['job_id']}", server.token())
    assert server.wait(first["job_id"])["status"] == "cancelled"
    time.sleep(0.5)
    assert not marker.exists()
    assert server.get("/api/nodes").json()["nodes"][0]["cancelled"] == 2


def test_cancel_running_job_kills_its_whole_group(server, tmp_path):
    pids_file = tmp_path / "pids"
    sub = server.submit_ok(f"PIDS = {str(pids_file)!r}\n" + GRANDCHILD)
    pids = job_pids(pids_file)
    assert all(alive(p) for p in pids)
    r = server.post(f"/api/cancel/{sub['job_id']}", server.token())
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running" and r.json()["cancel_requested"]  # answered at once
    again = server.post(f"/api/cancel/{sub['job_id']}", server.token())  # a second cancel too
    assert again.status_code == 200 and again.json()["cancel_requested"]
    st = server.wait(sub["job_id"])
    assert st["status"] == "cancelled" and st["error"] == "cancelled while running"
    # The grandchild ignores SIGTERM: it must have been KILLed after the grace.
    assert not any(alive(p) for p in pids)
    res = server.results(sub["job_id"])
    assert res["stdout"] == "started\n" and res["status"] == "cancelled"


def test_timeout_kills_group_and_fails_job(server, tmp_path):
    pids_file = tmp_path / "pids"
    # expected_time 1 s x multiplier 2: killed after about 2 s.
    sub = server.submit_ok(f"PIDS = {str(pids_file)!r}\n" + GRANDCHILD, expected_time=1)
    pids = job_pids(pids_file)
    st = server.wait(sub["job_id"], timeout=60)
    assert st["status"] == "failed" and st["error"] == "timeout"
    assert not any(alive(p) for p in pids)
    took = st["finished_at"], st["started_at"]
    assert took[0] > took[1]


def test_leftover_background_processes_are_killed_when_job_ends(server, tmp_path):
    pids_file = tmp_path / "pids"
    code = ("import os, subprocess, sys\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            f"open({str(pids_file)!r}, 'w').write(str(c.pid))\n")
    sub = server.submit_ok(code)
    assert server.wait(sub["job_id"])["status"] == "completed"
    assert not alive(job_pids(pids_file)[0])


def test_output_is_capped_with_a_visible_note(make_server):
    server = make_server(output_limit_bytes=4096)
    code = "import sys\nprint('HEAD')\nsys.stdout.write('x' * 100000)\nprint()\nprint('TAIL')\n"
    sub = server.submit_ok(code)
    server.wait(sub["job_id"])
    out = server.results(sub["job_id"])["stdout"]
    assert out.startswith("HEAD\n") and out.endswith("TAIL\n")
    assert "[gpuqueue: output truncated" in out
    assert len(out) < 4096 + 200


def test_non_utf8_output_is_replaced_not_an_error(server):
    sub = server.submit_ok("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end')\n")
    server.wait(sub["job_id"])
    assert server.results(sub["job_id"])["stdout"] == "ok \ufffd\ufffd end"


def test_jobs_list_pages_with_cursor(server):
    ids = [server.submit_ok("print(1)\n")["job_id"] for _ in range(5)]
    token = server.token()
    page = server.get("/api/jobs?limit=2", token).json()
    seen = [j["job_id"] for j in page["jobs"]]
    while page["next_cursor"]:
        page = server.get(f"/api/jobs?limit=2&cursor={page['next_cursor']}", token).json()
        seen += [j["job_id"] for j in page["jobs"]]
    assert seen == sorted(ids, reverse=True)


def test_second_server_on_same_spool_refuses(server):
    from conftest import GPUQUEUE
    import subprocess, sys
    r = subprocess.run([sys.executable, str(GPUQUEUE), "--config", str(server.config_path),
                        "serve"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "another gpuqueue server" in r.stderr and str(server.proc.pid) in r.stderr
    assert server.get("/").status_code == 200


def test_an_idle_node_takes_work_waiting_behind_a_busy_one(make_server, tmp_path):
    server = make_server(nodes=2)
    # Estimates are wrong both ways: X says 100 s and ends soon, Y says 1 s and runs on.
    gate = tmp_path / "x-ends"
    x = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                         "    time.sleep(0.05)\n", expected_time=100)
    y = server.submit_ok("import time\ntime.sleep(60)\n", expected_time=1)
    server.wait(y["job_id"], ("running",))
    z = server.submit_ok("print('z')\n", expected_time=1)
    assert (x["node_id"], y["node_id"], z["node_id"]) == (0, 1, 1)  # planned behind Y
    gate.touch()
    st = server.wait(z["job_id"], timeout=30)
    assert st["status"] == "completed" and st["node_id"] == 0  # node 0 took it
    assert server.status(y["job_id"])["status"] == "running"
    assert "taken by idle node 0" in server.log()
