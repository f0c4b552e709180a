"""Limits that protect the cluster and its tokens: throttled guessing, per-user caps,
a full disk, and logs that never show a token."""
import time

from conftest import job_config, wait_for


def test_repeated_bad_tokens_from_one_address_get_429(make_server):
    server = make_server(auth_failures_per_minute=3)
    good = server.token("alice")
    # One wrong token presented again and again (a script with a typo) is throttled alone.
    for _ in range(3):
        assert server.get("/api/jobs", "wrong-token-" + "x" * 20).status_code == 401
    r = server.get("/api/jobs", "wrong-token-" + "x" * 20)
    assert r.status_code == 429 and "try again" in r.json()["error"]
    assert server.get("/api/jobs", good).status_code == 200
    # Different wrong tokens from one address are guessing: then even a good token from
    # that address waits out the minute, so that guessing gains nothing.
    for i in range(2):  # with the wrong token above: three different ones
        assert server.get("/api/jobs", f"guess-{i}-" + "x" * 20).status_code == 401
    r = server.get("/api/jobs", good)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    # Asking without any token is no guess and does not count.
    other = make_server(auth_failures_per_minute=3)
    for _ in range(10):
        assert other.get("/api/jobs").status_code == 401
    assert other.get("/api/jobs", other.token("alice")).status_code == 200


def test_per_user_pending_cap_is_429_with_a_clear_message(make_server):
    server = make_server(nodes=1, max_pending_per_user=2)
    blocker = server.submit_ok("import time\ntime.sleep(60)\n")
    server.wait(blocker["job_id"], ("running",))
    server.submit_ok("print(1)\n")
    server.submit_ok("print(2)\n")
    before = server.spool_files()
    r = server.submit("print(3)\n")
    assert r.status_code == 429 and "2 pending jobs" in r.json()["error"]
    assert server.spool_files() == before
    # Another user is not held back by alice's queue.
    assert server.submit("print(4)\n", user="bob").status_code == 201


def test_submit_is_507_when_the_disk_is_nearly_full(make_server):
    server = make_server(min_free_bytes=2 ** 62)  # more than any disk has free
    before = server.spool_files()
    r = server.submit("print(1)\n")
    assert r.status_code == 507 and "disk" in r.json()["error"]
    assert server.spool_files() == before
    assert server.get("/").status_code == 200


def test_one_log_line_per_request_and_transition_and_never_a_token(server):
    token = server.token("alice")
    sub = server.submit_ok("print(1)\n", config=job_config("alice", 5, token=token), token=token)
    server.wait(sub["job_id"])
    server.get("/api/status/" + sub["job_id"], "not-a-real-token-at-all")
    # The end's line follows its record on disk, which the status shows first.
    log = wait_for(lambda: f"job {sub['job_id']} user=alice node=0 completed" in (text := server.log())
                   and text, what="the job's end logged")
    assert token not in log and "not-a-real-token-at-all" not in log
    assert f"job {sub['job_id']} user=alice node=0 pending" in log
    assert f"job {sub['job_id']} user=alice node=0 running" in log
    assert f"job {sub['job_id']} user=alice node=0 completed" in log
    assert "POST '/api/submit' 201 user=alice" in log
    assert f"GET '/api/status/{sub['job_id']}' 401 user=-" in log


def test_log_level_is_configurable(make_server):
    server = make_server(log_level="WARNING")
    server.submit_ok("print(1)\n")
    time.sleep(0.3)
    assert "/api/submit" not in server.log()


def test_pending_cap_holds_exactly_under_concurrent_submits(make_server):
    import threading
    server = make_server(nodes=1, max_pending_per_user=5)
    blocker = server.submit_ok("import time\ntime.sleep(60)\n")
    server.wait(blocker["job_id"], ("running",))
    codes = []

    def hammer():
        for _ in range(5):
            codes.append(server.submit("print(1)\n").status_code)
    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(201) == 5 and set(codes) == {201, 429}
    jobs = server.get("/api/jobs?status=pending", server.token()).json()["jobs"]
    assert len(jobs) == 5
    assert list((server.dir / "spool" / "tmp").iterdir()) == []
