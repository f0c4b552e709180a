"""Hostile and careless clients over real sockets: bounded work before a token is
checked, slow clients that cannot starve the rest, follows that free their slot,
a throttle that slows guessers but not teammates."""
import json
import socket
import threading
import time

import pytest
import requests

from conftest import job_config, wait_for


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def raw(server, data, source="127.0.0.1", timeout=10):
    """Send raw bytes from ``source``; the whole answer (until the server closes)."""
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


# -- bounded work before authentication ----------------------------------------------


def test_a_huge_config_is_refused_before_it_is_parsed(server):
    big = "[" + ", ".join(["1"] * 1_000_000) + "]\n"  # a 3 MB flow list
    before = rss_mb(server.proc.pid)
    answers = []

    def send():
        answers.append(server.post("/api/submit", files={"code": ("a.py", "print(1)\n"),
                                                         "config_file": ("c.yaml", big)}))
    threads = [threading.Thread(target=send) for _ in range(4)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 400 and "larger than" in r.json()["error"] for r in answers)
    assert time.monotonic() - began < 30
    assert rss_mb(server.proc.pid) - before < 200  # parsing one would take ~500 MB


def test_a_key_given_twice_is_refused(server):
    config = job_config("alice", 5) + "expected_time: 6\n"
    r = server.submit("print(1)\n", config=config)
    assert r.status_code == 400 and "'expected_time' is given twice" in r.json()["error"], r.text


def test_a_bad_bearer_token_is_refused_before_the_upload_is_read(server):
    r = server.submit("print(1)\n", config="not: [valid", token="x" * 40)
    assert r.status_code == 401 and r.json()["error"] == "invalid token"


def test_content_length_with_transfer_encoding_is_refused_and_closed(server):
    body = b"5\r\nhello\r\n0\r\n\r\n"
    answer = raw(server, b"POST /api/submit HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + body + b"GET / HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Content-Length and Transfer-Encoding" in answer
    assert answer.count(b"HTTP/1.1") == 1  # closed: the request behind it was never read


# -- slow clients ---------------------------------------------------------------------


def test_hundreds_of_slow_clients_do_not_starve_a_normal_request(server):
    host, port = server.url.split("//")[1].split(":")
    slow, stop = [], threading.Event()
    # 6 loopback addresses x 50: under the per-address cap, far over waitress's threads.
    for i in range(300):
        s = socket.create_connection((host, int(port)), source_address=(f"127.0.1.{i % 6 + 1}", 0))
        s.sendall(b"POST /api/submit HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)

    def trickle():
        while not stop.wait(1):
            for s in slow:
                try:
                    s.sendall(b"X")  # one header byte a second: never silent, never done
                except OSError:
                    pass
    t = threading.Thread(target=trickle)
    t.start()
    try:
        began = time.monotonic()
        r = requests.get(server.url + "/api/nodes", timeout=10)
        assert r.status_code == 200 and time.monotonic() - began < 5
        # Past the header deadline (10 s) every trickling connection is closed.
        def closed(s):
            try:
                s.settimeout(0.01)
                return s.recv(1) == b""
            except socket.timeout:
                return False
            except OSError:
                return True
        wait_for(lambda: all(closed(s) for s in slow), what="the slow clients to be cut off",
                 timeout=40)
    finally:
        stop.set()
        t.join()
        for s in slow:
            s.close()
    assert requests.get(server.url + "/api/nodes", timeout=10).status_code == 200


def test_one_address_cannot_hold_every_connection(server):
    host, port = server.url.split("//")[1].split(":")
    held = [socket.create_connection((host, int(port)), source_address=("127.0.2.1", 0))
            for _ in range(64)]
    try:
        extra = socket.create_connection((host, int(port)), source_address=("127.0.2.1", 0))
        extra.settimeout(10)
        try:
            extra.sendall(b"GET /api/nodes HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = extra.recv(100)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed without an answer
        extra.close()
        other = raw(server, b"GET /api/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    source="127.0.2.2")
        assert other.startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()


def test_a_slow_body_is_cut_off(server):
    host, port = server.url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /api/submit HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
              b"boundary=b\r\nContent-Length: 1000000\r\n\r\n")
    began = time.monotonic()
    s.settimeout(1)
    try:
        while time.monotonic() - began < 40:
            try:
                s.sendall(b"x" * 100)  # 100 bytes a second: far under the minimum rate
                if s.recv(1) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
    finally:
        s.close()
    assert time.monotonic() - began < 40, "a body trickling in was never cut off"


# -- follows ------------------------------------------------------------------------


def test_follows_of_clients_that_hung_up_free_their_slots(server):
    sub = server.submit_ok("import time\nprint('quiet', flush=True)\ntime.sleep(120)\n",
                           expected_time=300)
    server.wait(sub["job_id"], ("running",))
    token = server.token()
    path = server.url + f"/api/logs/{sub['job_id']}?follow=1"
    for _ in range(4):
        r = requests.get(path, stream=True, timeout=30, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert json.loads(next(r.iter_lines())) == {"stream": "stdout", "offset": 0,
                                                    "data": "quiet\n"}
        r.close()  # the client hangs up while the job is quiet
    def fifth():
        r = requests.get(path, stream=True, timeout=30, headers={"Authorization": f"Bearer {token}"})
        ok = r.status_code == 200
        r.close()
        return ok
    wait_for(fifth, what="a follow slot to be free again", timeout=30)
    server.post(f"/api/cancel/{sub['job_id']}", token)


def test_revoking_a_token_ends_its_follow(server):
    sub = server.submit_ok("import time\nprint('on', flush=True)\ntime.sleep(120)\n",
                           expected_time=300)
    admin = server.token("root", admin=True)
    server.wait(sub["job_id"], ("running",))
    r = requests.get(server.url + f"/api/logs/{sub['job_id']}?follow=1", stream=True, timeout=30,
                     headers={"Authorization": f"Bearer {admin}"})
    lines = (line for line in r.iter_lines() if line.strip())
    assert json.loads(next(lines))["data"] == "on\n"
    server.cli("tokens", "revoke", admin)
    began = time.monotonic()
    last = json.loads(next(lines))
    assert last == {"error": "token revoked"} and time.monotonic() - began < 15
    server.post(f"/api/cancel/{sub['job_id']}", server.token("alice"))


# -- the throttle ---------------------------------------------------------------------


@pytest.fixture
def strict(make_server):
    """A server that throttles after 5 failures a minute, behind a proxy on 127.0.0.1."""
    return make_server(nodes=1, auth_failures_per_minute=5, trusted_proxies=["127.0.0.1"])


def nodes_with(server, token, forwarded=None):
    headers = {"Authorization": f"Bearer {token}"}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    return requests.get(server.url + "/api/jobs", headers=headers, timeout=10)


def test_a_revoked_token_left_in_a_dashboard_locks_nobody_out(strict):
    stale = strict.token("carol")
    strict.cli("tokens", "revoke", stale)
    for _ in range(20):
        assert nodes_with(strict, stale).status_code == 401
    assert nodes_with(strict, strict.token("alice")).status_code == 200


def test_one_wrong_token_repeated_is_throttled_alone(strict):
    for _ in range(5):
        assert nodes_with(strict, "w" * 43).status_code == 401
    r = nodes_with(strict, "w" * 43)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert nodes_with(strict, strict.token("alice")).status_code == 200  # the address is fine


def test_a_guesser_is_throttled_by_address_behind_a_trusted_proxy(strict):
    guesser, teammate = "192.0.2.1", "192.0.2.2"
    for i in range(5):
        assert nodes_with(strict, f"guess{i:040d}", guesser).status_code == 401
    r = nodes_with(strict, strict.token("alice"), guesser)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert nodes_with(strict, strict.token("alice"), teammate).status_code == 200


def test_an_unreadable_token_file_is_503_and_counts_for_nothing(strict):
    good = strict.token("alice")
    tokens = strict.dir / "tokens.yaml"
    kept = tokens.read_text()
    tokens.write_text("tokens: [unclosed\n")
    try:
        wait_for(lambda: nodes_with(strict, good).status_code == 503,
                 what="the unreadable file to be noticed")
        for _ in range(8):
            r = nodes_with(strict, good)
            assert r.status_code == 503 and "token file" in r.json()["error"]
    finally:
        tokens.write_text(kept)
    wait_for(lambda: nodes_with(strict, good).status_code == 200, what="the file to be read again")


# -- cancels -----------------------------------------------------------------------


def test_a_storm_of_cancels_holds_no_thread(server):
    token = server.token()
    sub = server.submit_ok("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                           "print('stubborn', flush=True)\ntime.sleep(120)\n", expected_time=300)
    server.wait(sub["job_id"], ("running",))
    answers, lock = [], threading.Lock()

    def cancel():
        r = requests.post(f"{server.url}/api/cancel/{sub['job_id']}", timeout=30,
                          headers={"Authorization": f"Bearer {token}"})
        with lock:
            answers.append(r.status_code)
    storm = [threading.Thread(target=cancel) for _ in range(40)]
    began = time.monotonic()
    for t in storm:
        t.start()
    # The job ignores SIGTERM, so its kill takes the whole kill_grace; meanwhile the
    # server answers everyone.
    r = requests.get(server.url + "/api/nodes", timeout=10)
    assert r.status_code == 200
    for t in storm:
        t.join()
    assert answers and all(code in (200, 409) for code in answers), answers
    assert time.monotonic() - began < 20
    assert server.wait(sub["job_id"])["status"] == "cancelled"
