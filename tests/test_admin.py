"""Admin commands (``nodes list|drain|resume``, ``jobs list|cancel``) and job priority.

Everything runs for real: the server is a subprocess speaking HTTP on 127.0.0.1, and the
admin commands are ``python gpuqueue.py ...`` subprocesses that reach a running server
through ``spool/control/`` or, with none running, open the spool themselves.  Jobs are
held with gate files the test creates, so no assertion depends on how long anything takes.
"""
import json
import os
import signal
import sys
import time

import pytest

from conftest import GRANDCHILD, ROOT, alive, job_config, job_pids, wait_for

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402  (only for new_job_id: request names like the CLI's)


# -- helpers -----------------------------------------------------------------


class Gate:
    """A job that notes it started, then waits for the test to open its gate."""

    def __init__(self, tmp_path, name):
        self.started = tmp_path / f"{name}.started"
        self.gate = tmp_path / f"{name}.gate"
        self.code = ("import os, time\n"
                     f"open({str(self.started)!r}, 'w').close()\n"
                     f"while not os.path.exists({str(self.gate)!r}):\n"
                     "    time.sleep(0.02)\n"
                     "print('gate opened')\n")

    def wait_started(self):
        wait_for(self.started.exists, f"{self.started.name} to start")

    def open(self):
        self.gate.write_text("go")


def marker_job(path):
    """A job that creates ``path``: proof that it ran."""
    return f"open({str(path)!r}, 'w').write('ran')\n"


def order_job(log, name):
    """A job that appends its name to ``log``: the order jobs ran in, on one node."""
    return f"open({str(log)!r}, 'a').write({name + chr(10)!r})\n"


def api_nodes(server):
    r = server.get("/api/nodes")
    assert r.status_code == 200, r.text
    return {n["id"]: n for n in r.json()["nodes"]}


def nodes_json(server):
    return {n["id"]: n for n in json.loads(server.cli("nodes", "list", "--json").stdout)}


def jobs_json(server, *args):
    return json.loads(server.cli("jobs", "list", "--json", *args).stdout)


def control_dir(server):
    return server.dir / "spool" / "control"


def control_is_empty(server):
    return not [p for p in control_dir(server).iterdir() if not p.name.startswith(".")]


def spool_outside_control(server):
    return [p for p in server.spool_files() if not p.startswith("control")]


def assert_json_error(r, status, *fragments):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for fragment in fragments:
        assert fragment in body["error"], body


def failed_cli(server, *args):
    """Run an admin command that must fail; its stderr, for the message."""
    r = server.cli(*args, check=False)
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr


def put_request(server, request, raw=None):
    """Leave a request in control/ by hand, named as the CLI names them; its name."""
    name = gpuqueue.new_job_id()
    folder = control_dir(server)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(raw if raw is not None else json.dumps(request).encode())
    tmp.rename(folder / f"{name}.request.json")
    return name


def reply_to(server, name):
    """The server's reply to a hand-written request, once it has answered."""
    reply = control_dir(server) / f"{name}.reply.json"
    request = control_dir(server) / f"{name}.request.json"
    wait_for(reply.exists, f"a reply to {name}")
    # The server writes the reply, then removes the request.
    wait_for(lambda: not request.exists(), f"request {name} to be removed")
    return json.loads(reply.read_text())


# -- nodes list ----------------------------------------------------------------


def test_nodes_list_table_and_json_on_running_server(make_server, tmp_path):
    server = make_server(nodes=3)
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, expected_time=60)
    server.wait(held["job_id"], ("running",))

    lines = server.cli("nodes", "list").stdout.splitlines()
    assert lines[0].split()[:4] == ["NODE", "HOST", "STATE", "DRAINED"]
    rows = {int(line.split()[0]): line.split() for line in lines[1:]}
    assert sorted(rows) == [0, 1, 2]
    for n, row in rows.items():
        # Through the running server: its workers' state, not "server not running".
        assert row[1:4] == ["local", "online", "no"], row
        assert row[4] == (held["job_id"] if n == 0 else "-")

    found = json.loads(server.cli("nodes", "list", "--json").stdout)
    assert [n["id"] for n in found] == [0, 1, 2]
    for n in found:
        assert n["drained"] is False and n["state"] == "online" and n["host"] == "local"
        assert n["error"] is None
    assert found[0]["running_job"] == held["job_id"]
    assert found[1]["running_job"] is None
    # The request and its reply are gone once the command has its answer.
    wait_for(lambda: control_is_empty(server), "control/ to be empty")
    gate.open()
    assert server.wait(held["job_id"])["status"] == "completed"


# -- drain and resume on a running server --------------------------------------


def test_drain_lets_running_job_finish_and_moves_pending_jobs(make_server, tmp_path):
    server = make_server(nodes=2)
    g0, g1 = Gate(tmp_path, "g0"), Gate(tmp_path, "g1")
    # Node 0 carries 100 s, node 1 20 s: the next short jobs are planned on node 1.
    busy0 = server.submit_ok(g0.code, expected_time=100)
    busy1 = server.submit_ok(g1.code, expected_time=20)
    assert (busy0["node_id"], busy1["node_id"]) == (0, 1)
    g0.wait_started()
    g1.wait_started()
    logs = [tmp_path / f"p{i}.ran" for i in range(2)]
    pending = [server.submit_ok(marker_job(p), expected_time=5) for p in logs]
    assert [p["node_id"] for p in pending] == [1, 1]
    assert [server.status(p["job_id"])["status"] for p in pending] == ["pending"] * 2

    out = server.cli("nodes", "drain", "1").stdout
    assert "node 1 drained" in out
    assert f"job {busy1['job_id']} runs to its end" in out
    assert "moved to node(s) 0" in out
    assert (server.dir / "spool" / "nodes" / "1" / "drained").exists()

    for p in pending:
        st = server.status(p["job_id"])
        assert st["status"] == "pending" and st["node_id"] == 0, st
    nodes = api_nodes(server)
    assert nodes[1]["drained"] is True and nodes[0]["drained"] is False
    assert nodes[1]["running_job"] == busy1["job_id"] and nodes[1]["queued_jobs"] == 0
    assert nodes[0]["queued_jobs"] == 2
    assert nodes_json(server)[1]["drained"] is True

    # A new job goes to node 0, though node 1 carries less.
    new_log = tmp_path / "new.ran"
    new = server.submit_ok(marker_job(new_log), expected_time=5)
    assert new["node_id"] == 0

    # The running job on the drained node runs to its end: completed, not killed.
    g1.open()
    st = server.wait(busy1["job_id"])
    assert st["status"] == "completed" and st["error"] is None and st["node_id"] == 1
    assert server.results(busy1["job_id"])["stdout"] == "gate opened\n"

    # Node 1 is now idle but drained: it starts none of the jobs waiting behind node 0.
    time.sleep(1)  # a chance for node 1 to (wrongly) take one; the checks below do not time it
    ids = [p["job_id"] for p in pending] + [new["job_id"]]
    assert [server.status(i)["status"] for i in ids] == ["pending"] * 3
    assert not any(p.exists() for p in logs + [new_log])
    assert api_nodes(server)[1]["running_job"] is None

    g0.open()
    done0 = server.wait(busy0["job_id"])
    for i in ids:
        st = server.wait(i)
        assert st["status"] == "completed" and st["node_id"] == 0, st
        assert st["started_at"] >= done0["finished_at"]
    assert all(p.exists() for p in logs + [new_log])
    nodes = api_nodes(server)
    assert nodes[1]["completed"] == 1 and nodes[0]["completed"] == 4


def test_resume_lets_a_drained_node_take_jobs_again(make_server, tmp_path):
    server = make_server(nodes=2)
    assert "node 1 drained" in server.cli("nodes", "drain", "1").stdout
    assert api_nodes(server)[1]["drained"] is True

    out = server.cli("nodes", "resume", "1").stdout
    assert "node 1 resumed" in out
    assert not (server.dir / "spool" / "nodes" / "1" / "drained").exists()
    assert api_nodes(server)[1]["drained"] is False
    assert nodes_json(server)[1]["drained"] is False

    # Node 0 is held by a gated job; a new job is placed on node 1 and runs there.
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, expected_time=100)
    assert held["node_id"] == 0
    gate.wait_started()
    ran = tmp_path / "ran"
    job = server.submit_ok(marker_job(ran), expected_time=5)
    st = server.wait(job["job_id"])
    assert st["status"] == "completed" and st["node_id"] == 1
    assert ran.exists()
    assert server.status(held["job_id"])["status"] == "running"
    gate.open()
    server.wait(held["job_id"])


def test_resume_wakes_the_drained_node_for_work_queued_on_a_busy_one(make_server, tmp_path):
    server = make_server(nodes=2)
    server.cli("nodes", "drain", "1")
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, expected_time=100)
    gate.wait_started()
    waiting = server.submit_ok(marker_job(tmp_path / "ran"), expected_time=5)
    assert waiting["node_id"] == 0
    # Resumed, idle node 1 takes the job waiting behind busy node 0.
    server.cli("nodes", "resume", "1")
    st = server.wait(waiting["job_id"])
    assert st["status"] == "completed" and st["node_id"] == 1
    assert server.status(held["job_id"])["status"] == "running"
    gate.open()
    server.wait(held["job_id"])


def test_drain_survives_kill_9_and_restart(make_server, tmp_path):
    server = make_server(nodes=2)
    server.cli("nodes", "drain", "1")
    server.kill()
    server.start()
    assert (server.dir / "spool" / "nodes" / "1" / "drained").exists()
    nodes = api_nodes(server)
    assert nodes[1]["drained"] is True and nodes[0]["drained"] is False
    assert nodes_json(server)[1]["drained"] is True

    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, expected_time=100)
    gate.wait_started()
    ran = tmp_path / "ran"
    job = server.submit_ok(marker_job(ran), expected_time=5)
    assert job["node_id"] == 0
    time.sleep(1)  # a chance for drained node 1 to (wrongly) take it
    assert server.status(job["job_id"])["status"] == "pending" and not ran.exists()
    gate.open()
    finished = server.wait(held["job_id"])
    st = server.wait(job["job_id"])
    assert st["status"] == "completed" and st["node_id"] == 0
    assert st["started_at"] >= finished["finished_at"]


def test_drain_of_unknown_node_fails_and_changes_nothing(make_server):
    server = make_server(nodes=2)
    before = spool_outside_control(server)
    for op in ("drain", "resume"):
        err = failed_cli(server, "nodes", op, "9")
        assert "no node 9" in err and "the nodes are 0, 1" in err, err
    wait_for(lambda: control_is_empty(server), "control/ to be empty")
    assert spool_outside_control(server) == before
    assert not any(n["drained"] for n in api_nodes(server).values())
    # Not a number at all: refused by the command line itself.
    assert "is not a valid integer" in failed_cli(server, "nodes", "drain", "one")
    assert spool_outside_control(server) == before


# -- jobs list and cancel on a running server ---------------------------------


def test_jobs_list_shows_every_user_and_filters(make_server, tmp_path):
    server = make_server(nodes=1)
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, user="alice", expected_time=60)
    server.wait(held["job_id"], ("running",))
    bob1 = server.submit_ok("print('b1')\n", user="bob")
    alice1 = server.submit_ok("print('a1')\n", user="alice")
    bob2 = server.submit_ok("print('b2')\n", user="bob")
    everyone = [bob2, alice1, bob1, held]  # newest first

    found = jobs_json(server)
    assert [j["job_id"] for j in found] == [j["job_id"] for j in everyone]
    by_id = {j["job_id"]: j for j in found}
    assert by_id[held["job_id"]]["status"] == "running"
    assert by_id[held["job_id"]]["queue_position"] is None
    assert {by_id[j["job_id"]]["user_id"] for j in everyone} == {"alice", "bob"}
    for j in (bob1, alice1, bob2):
        assert by_id[j["job_id"]]["status"] == "pending"
        assert by_id[j["job_id"]]["priority"] == 0
    assert sorted(by_id[j["job_id"]]["queue_position"] for j in (bob1, alice1, bob2)) == [0, 1, 2]

    pending = jobs_json(server, "--status", "pending")
    assert [j["job_id"] for j in pending] == [bob2["job_id"], alice1["job_id"], bob1["job_id"]]
    bobs = jobs_json(server, "--user", "bob")
    assert [j["job_id"] for j in bobs] == [bob2["job_id"], bob1["job_id"]]
    assert jobs_json(server, "--user", "alice", "--status", "running")[0]["job_id"] == held["job_id"]
    assert jobs_json(server, "--user", "carol") == []
    assert [j["job_id"] for j in jobs_json(server, "--limit", "2")] == [bob2["job_id"], alice1["job_id"]]

    lines = server.cli("jobs", "list").stdout.splitlines()
    assert lines[0].split()[:3] == ["JOB", "USER", "STATUS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == [j["job_id"] for j in everyone]
    assert rows[held["job_id"]][1:3] == ["alice", "running"]
    assert rows[bob1["job_id"]][1:3] == ["bob", "pending"]
    table = server.cli("jobs", "list", "--user", "bob", "--status", "pending").stdout
    assert bob1["job_id"] in table and bob2["job_id"] in table
    assert alice1["job_id"] not in table and held["job_id"] not in table

    err = failed_cli(server, "jobs", "list", "--status", "sleeping")
    assert "sleeping" in err
    gate.open()
    for j in everyone:
        server.wait(j["job_id"], token=server.token("root", admin=True))
    assert {j["status"] for j in jobs_json(server)} == {"completed"}


def test_jobs_cancel_pending_job_of_another_user(make_server, tmp_path):
    server = make_server(nodes=1)
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, user="alice", expected_time=60)
    server.wait(held["job_id"], ("running",))
    marker = tmp_path / "bob-ran"
    victim = server.submit_ok(marker_job(marker), user="bob")
    later = server.submit_ok("print('later')\n", user="bob")

    out = server.cli("jobs", "cancel", victim["job_id"]).stdout
    assert f"job {victim['job_id']} cancelled" in out
    st = server.status(victim["job_id"], user="bob")
    assert st["status"] == "cancelled" and st["error"] == "cancelled while pending"
    assert (server.dir / "spool" / "done" / victim["job_id"]).is_dir()

    gate.open()
    assert server.wait(held["job_id"])["status"] == "completed"
    assert server.wait(later["job_id"], user="bob")["status"] == "completed"
    assert not marker.exists()
    assert server.status(victim["job_id"], user="bob")["status"] == "cancelled"
    assert api_nodes(server)[0]["cancelled"] == 1


def test_jobs_cancel_running_job_kills_its_processes(make_server, tmp_path):
    server = make_server(nodes=1)
    pids_file = tmp_path / "pids"
    job = server.submit_ok(f"PIDS = {str(pids_file)!r}\n" + GRANDCHILD, user="bob")
    pids = job_pids(pids_file)
    assert all(alive(p) for p in pids)

    out = server.cli("jobs", "cancel", job["job_id"]).stdout
    assert f"job {job['job_id']} is running on node 0: it is being stopped now" in out
    st = server.wait(job["job_id"], user="bob")
    assert st["status"] == "cancelled" and st["error"] == "cancelled while running"
    # The grandchild ignores SIGTERM: it must have been KILLed after the grace.
    wait_for(lambda: not any(alive(p) for p in pids), "the job's processes to end")
    assert server.results(job["job_id"], user="bob")["stdout"] == "started\n"


def test_jobs_cancel_of_finished_or_unknown_job_fails(make_server):
    server = make_server(nodes=1)
    done = server.submit_ok("print(1)\n", user="bob")
    assert server.wait(done["job_id"], user="bob")["status"] == "completed"

    err = failed_cli(server, "jobs", "cancel", done["job_id"])
    assert f"job {done['job_id']} already completed" in err
    assert server.status(done["job_id"], user="bob")["status"] == "completed"

    for bad in ("xyz", "0" * 23, "G" * 24, gpuqueue.new_job_id()):
        err = failed_cli(server, "jobs", "cancel", bad)
        assert f"no such job {bad!r}" in err, err
    wait_for(lambda: control_is_empty(server), "control/ to be empty")


# -- with no server running ---------------------------------------------------


def test_drain_with_no_server_then_start(make_server):
    server = make_server(nodes=2, start=False)
    refused = server.cli("nodes", "drain", "1", check=False)  # no server has used the spool
    assert refused.returncode == 1 and "no gpuqueue server has used the spool" in refused.stderr
    assert not (server.dir / "spool").exists()
    server.start()
    server.kill(signal.SIGTERM)
    out = server.cli("nodes", "drain", "1").stdout
    assert "node 1 drained" in out
    assert (server.dir / "spool" / "nodes" / "1" / "drained").exists()

    lines = server.cli("nodes", "list").stdout.splitlines()
    rows = {int(line.split()[0]): line for line in lines[1:]}
    assert sorted(rows) == [0, 1]
    assert all("server not running" in row for row in rows.values())
    found = nodes_json(server)
    assert [found[n]["drained"] for n in (0, 1)] == [False, True]
    assert {n["state"] for n in found.values()} == {"server not running"}
    assert "no node 9" in failed_cli(server, "nodes", "drain", "9")

    server.start()
    nodes = api_nodes(server)
    assert nodes[1]["drained"] is True and nodes[0]["drained"] is False
    assert nodes[0]["state"] == "online"
    job = server.submit_ok("print(1)\n", expected_time=5)
    assert job["node_id"] == 0
    assert server.wait(job["job_id"])["node_id"] == 0


def test_drain_with_server_down_moves_its_pending_jobs(make_server, tmp_path):
    server = make_server(nodes=2)
    g0, g1 = Gate(tmp_path, "g0"), Gate(tmp_path, "g1")
    server.submit_ok(g0.code, expected_time=100)
    busy1 = server.submit_ok(g1.code, expected_time=20)
    g0.wait_started()
    g1.wait_started()
    queued = server.submit_ok("print('q')\n", expected_time=5)
    assert queued["node_id"] == 1
    server.kill()

    out = server.cli("nodes", "drain", "1").stdout
    assert "moved to node(s) 0" in out and f"job {busy1['job_id']} runs to its end" in out
    listed = {j["job_id"]: j for j in jobs_json(server)}
    assert listed[queued["job_id"]]["node_id"] == 0
    assert listed[busy1["job_id"]]["status"] == "running"
    found = nodes_json(server)
    assert found[1]["running_job"] == busy1["job_id"] and found[1]["drained"] is True
    assert found[1]["state"] == "server not running" and found[0]["queued_jobs"] == 1

    server.start()
    assert api_nodes(server)[1]["drained"] is True
    g1.open()
    st = server.wait(busy1["job_id"])
    assert st["status"] == "completed" and st["node_id"] == 1
    g0.open()
    st = server.wait(queued["job_id"])
    assert st["status"] == "completed" and st["node_id"] == 0


def test_cancel_pending_job_while_server_is_down(make_server, tmp_path):
    server = make_server(nodes=1)
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, expected_time=60)
    gate.wait_started()
    marker = tmp_path / "victim-ran"
    victim = server.submit_ok(marker_job(marker), user="bob")
    other = server.submit_ok("print('other')\n", user="bob")
    server.kill()

    out = server.cli("jobs", "cancel", victim["job_id"]).stdout
    assert f"job {victim['job_id']} cancelled" in out
    listed = {j["job_id"]: j for j in jobs_json(server)}
    assert listed[victim["job_id"]]["status"] == "cancelled"
    assert listed[other["job_id"]]["status"] == "pending"
    assert listed[held["job_id"]]["status"] == "running"
    assert "already cancelled" in failed_cli(server, "jobs", "cancel", victim["job_id"])

    server.start()
    st = server.status(victim["job_id"], user="bob")
    assert st["status"] == "cancelled" and st["error"] == "cancelled while pending"
    gate.open()
    assert server.wait(held["job_id"])["status"] == "completed"
    assert server.wait(other["job_id"], user="bob")["status"] == "completed"
    assert not marker.exists()
    assert server.status(victim["job_id"], user="bob")["status"] == "cancelled"


def test_cancel_running_job_while_server_is_down_stops_it_at_start(make_server, tmp_path):
    server = make_server(nodes=1)
    pids_file = tmp_path / "pids"
    job = server.submit_ok(f"PIDS = {str(pids_file)!r}\n" + GRANDCHILD, user="bob")
    pids = job_pids(pids_file)
    server.kill()
    assert all(alive(p) for p in pids)  # the job outlives the server

    out = server.cli("jobs", "cancel", job["job_id"]).stdout
    assert "it is being stopped as soon as the server starts" in out

    server.start()
    st = server.wait(job["job_id"], user="bob")
    assert st["status"] == "cancelled" and st["error"] == "cancelled while running"
    wait_for(lambda: not any(alive(p) for p in pids), "the job's processes to end")


# -- requests left in control/ --------------------------------------------------


def test_request_left_before_start_is_carried_out_at_start(make_server):
    server = make_server(nodes=2, start=False)
    name = put_request(server, {"op": "drain", "node": 0})
    server.start()
    reply = reply_to(server, name)
    assert reply["ok"] is True and "node 0 drained" in reply["message"], reply
    assert (server.dir / "spool" / "nodes" / "0" / "drained").exists()
    assert api_nodes(server)[0]["drained"] is True
    assert server.submit_ok("print(1)\n")["node_id"] == 1


def test_drain_request_left_before_start_holds_before_any_job_starts(make_server, tmp_path):
    """A drain request the server had not answered when it died (the command said it
    "is carried out when it does") must hold before the node starts anything."""
    server = make_server(nodes=1)
    server.cli("nodes", "drain", "0")
    markers = [tmp_path / f"q{i}.ran" for i in range(3)]
    queued = [server.submit_ok(marker_job(m), expected_time=5) for m in markers]
    server.kill()
    # With the server down: resume node 0, then leave a drain of it that nobody answered.
    server.cli("nodes", "resume", "0")
    name = put_request(server, {"op": "drain", "node": 0})
    server.start()
    reply = reply_to(server, name)
    assert reply["ok"] is True, reply
    time.sleep(0.5)  # a chance for drained node 0 to (wrongly) start one
    ran = [q["job_id"] for q, m in zip(queued, markers) if m.exists()
           or server.status(q["job_id"])["status"] != "pending"]
    assert ran == [], f"drained node 0 started {ran} before the drain request was applied"


def test_unreadable_request_is_answered_and_server_goes_on(server):
    garbage = put_request(server, None, raw=b"{not json at all")
    reply = reply_to(server, garbage)
    assert reply["ok"] is False and "unreadable request" in reply["error"], reply

    binary = put_request(server, None, raw=b"\xff\xfe\x00garbage")
    assert reply_to(server, binary)["ok"] is False

    for request, fragment in (([1, 2], "unknown request"), ({"op": "explode"}, "unknown request 'explode'"),
                              ({"op": "drain", "node": "1"}, "no node '1'"),
                              ({"op": "drain"}, "no node None"),
                              ({"op": "cancel", "job": 5}, "no such job 5"),
                              ({"op": "jobs", "limit": 0}, "limit"),
                              ({"op": "jobs", "status": "sleeping"}, "status must be one of")):
        reply = reply_to(server, put_request(server, request))
        assert reply["ok"] is False and fragment in reply["error"], (request, reply)

    # Later requests, by hand and by the command, are still answered; nothing was drained.
    reply = reply_to(server, put_request(server, {"op": "nodes"}))
    assert reply["ok"] is True and len(reply["nodes"]) == 8
    assert not any(n["drained"] for n in nodes_json(server).values())
    assert server.get("/").status_code == 200


def test_stale_replies_are_removed_and_fresh_ones_kept(server):
    folder = control_dir(server)
    old, fresh = (folder / f"{gpuqueue.new_job_id()}.reply.json" for _ in range(2))
    for path in (old, fresh):
        path.write_text('{"ok": true}\n')
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    wait_for(lambda: not old.exists(), "the stale reply to go")
    # A request after it has been answered shows the scan that removed the old one is over.
    assert reply_to(server, put_request(server, {"op": "nodes"}))["ok"] is True
    assert fresh.exists()


def test_odd_node_values_in_a_request_are_refused_clearly(server):
    """JSON true is not node 1, nor is 1.0: refused as 'no node', not an I/O error."""
    for node in (True, 1.0):
        reply = reply_to(server, put_request(server, {"op": "drain", "node": node}))
        assert reply["ok"] is False and "no node" in reply["error"], (node, reply)
    assert not any(n["drained"] for n in api_nodes(server).values())


# -- priority -----------------------------------------------------------------


def test_priority_above_zero_needs_an_admin(server):
    before = server.spool_files()
    for prio in (1, 100):
        r = server.submit("print(1)\n", config=job_config("alice", 5, priority=prio))
        assert_json_error(r, 403, "only an admin")
    assert server.spool_files() == before


def test_priority_out_of_range_or_not_a_whole_number_is_400(server):
    admin = server.token("root", admin=True)
    before = server.spool_files()
    for prio in (101, -101, 10 ** 30):
        for token in (server.token("alice"), admin):
            r = server.submit("print(1)\n", config=job_config("alice", 5, priority=prio), token=token)
            assert_json_error(r, 400, "'priority' must be from -100 to 100")
    for prio in (1.5, "high", True, None, [1]):
        r = server.submit("print(1)\n", config=job_config("alice", 5, priority=prio))
        assert_json_error(r, 400, "'priority' must be a whole number")
    # Not a whole number written as a float, nor a quoted number.
    for text in ("priority: 1.0\n", "priority: '1'\n"):
        r = server.submit("print(1)\n", config=job_config("alice", 5) + text)
        assert_json_error(r, 400, "priority")
    assert server.spool_files() == before


def test_admin_priority_job_runs_before_earlier_jobs(make_server, tmp_path):
    server = make_server(nodes=1)
    admin = server.token("root", admin=True)
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, user="alice", expected_time=60)
    server.wait(held["job_id"], ("running",))
    log = tmp_path / "order"
    a1 = server.submit_ok(order_job(log, "a1"), user="alice")
    b1 = server.submit_ok(order_job(log, "b1"), user="bob")
    a2 = server.submit_ok(order_job(log, "a2"), user="alice")
    urgent = server.submit_ok(order_job(log, "urgent"), token=admin,
                              config=job_config("bob", 30, priority=5))
    assert urgent["queue_position"] == 0

    st = server.status(urgent["job_id"], user="bob")  # bob's job, though an admin sent it
    assert st["user_id"] == "bob" and st["priority"] == 5 and st["queue_position"] == 0
    assert server.status(a1["job_id"])["priority"] == 0
    waiting = {"urgent": (urgent, "bob"), "a1": (a1, "alice"), "b1": (b1, "bob"), "a2": (a2, "alice")}
    positions = {n: server.status(j["job_id"], user=u)["queue_position"] for n, (j, u) in waiting.items()}
    assert sorted(positions.values()) == [0, 1, 2, 3]
    listed = {j["job_id"]: j for j in jobs_json(server)}
    assert listed[urgent["job_id"]]["priority"] == 5
    prio_col = {line.split()[0]: line.split()[5] for line in server.cli("jobs", "list").stdout.splitlines()[1:]}
    assert prio_col[urgent["job_id"]] == "5" and prio_col[a1["job_id"]] == "0"
    kept = server.dir / "spool" / "nodes" / "0" / "pending" / urgent["job_id"] / "config.yaml"
    assert "priority: 5" in kept.read_text()

    gate.open()
    for j, user in ((a1, "alice"), (b1, "bob"), (a2, "alice"), (urgent, "bob")):
        assert server.wait(j["job_id"], user=user)["status"] == "completed"
    order = log.read_text().split()
    assert order[0] == "urgent" and sorted(order) == ["a1", "a2", "b1", "urgent"]
    # What status said while they waited is the order they ran in.
    assert order == sorted(positions, key=positions.get)
    assert server.status(urgent["job_id"], user="bob")["priority"] == 5


def test_own_negative_priority_job_runs_after_priority_zero_jobs(make_server, tmp_path):
    server = make_server(nodes=1)
    gate = Gate(tmp_path, "g")
    held = server.submit_ok(gate.code, user="alice", expected_time=60)
    server.wait(held["job_id"], ("running",))
    log = tmp_path / "order"
    low = server.submit_ok(order_job(log, "low"), config=job_config("alice", 30, priority=-1))
    a = server.submit_ok(order_job(log, "a"), user="alice")
    b = server.submit_ok(order_job(log, "b"), user="bob")
    st = server.status(low["job_id"])
    assert st["priority"] == -1 and st["queue_position"] == 2
    positions = {"low": 2, "a": server.status(a["job_id"])["queue_position"],
                 "b": server.status(b["job_id"], user="bob")["queue_position"]}
    assert sorted(positions.values()) == [0, 1, 2]

    gate.open()
    for j, user in ((low, "alice"), (a, "alice"), (b, "bob")):
        assert server.wait(j["job_id"], user=user)["status"] == "completed"
    order = log.read_text().split()
    assert order[-1] == "low" and sorted(order[:2]) == ["a", "b"]
    assert order == sorted(positions, key=positions.get)


@pytest.mark.parametrize("text", ["tokens: [\n", "tokens: 5\n"])
def test_a_damaged_token_file_is_one_line_from_every_tokens_command(make_server, text):
    """The token commands on a file that is not YAML, or not a token file, say so in one
    line and fail: never a traceback, never an empty list that reads as 'no tokens'."""
    server = make_server(nodes=1, start=False)
    (server.dir / "tokens.yaml").write_text(text)
    for args in (("create", "bob"), ("list",), ("revoke", "0" * 12)):
        r = server.cli("tokens", *args, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "tokens.yaml" in r.stderr, (args, r.stderr)
    assert (server.dir / "tokens.yaml").read_text() == text


def test_an_admin_command_run_as_another_user_than_the_spools_is_refused(make_server):
    """An admin command run as a user other than the spool's (root's sudo beside a
    server of its own user) is refused, saying as whom to run it: it would take the
    live server's lock for one a job planted, and act on the spool behind its back."""
    server = make_server(nodes=2)
    spool = server.dir / "spool"
    for path in (spool, spool / "server.lock"):  # as if the server ran as another user
        os.chown(path, 4321, 4321)
    try:
        r = server.cli("nodes", "drain", "1", check=False)
        assert r.returncode != 0 and "belongs to user 4321" in r.stderr, r.stderr
        assert (spool / "server.lock").exists()
        nodes = server.get("/api/nodes").json()["nodes"]
        assert not nodes[1]["drained"], nodes
    finally:
        for path in (spool, spool / "server.lock"):
            os.chown(path, os.geteuid(), os.getegid())


def test_a_tokens_command_run_as_another_user_than_the_token_files_is_refused(make_server):
    """The token file is rewritten whole, mode 0600: written by another user (root's
    sudo) it would be one the server cannot read, and every token would be refused."""
    server = make_server(nodes=1)
    tokens = server.dir / "tokens.yaml"
    server.token("alice")  # (the file exists)
    before = tokens.read_bytes()
    os.chown(tokens, 4321, 4321)
    try:
        r = server.cli("tokens", "create", "bob", check=False)
        assert r.returncode != 0 and "belongs to user 4321" in r.stderr, r.stderr
        assert tokens.read_bytes() == before and tokens.stat().st_uid == 4321
    finally:
        os.chown(tokens, os.geteuid(), os.getegid())
