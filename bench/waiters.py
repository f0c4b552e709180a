"""12. Submits that wait (POST /api/submit?wait=1): what 500 of them cost the server.

500 waiting submits, from 10 loopback addresses (the server lets one address hold 64
connections), for jobs on 8 nodes that stay offline, so every job stays pending and
every submit keeps waiting. The server's threads, RSS and CPU (over 10 s), and the p99
of GET /api/nodes and of a job's status, are measured with none waiting (the baseline,
the same server just before) and with all 500 waiting; then every job is cancelled and
the time until the last waiter has its answer is taken. The original server held a
thread per waiter and polled its database for each every 0.5 s.
"""
import os
import socket
import time

import requests

from common import Row, Server, idle_nodes, job_config, kill_processes_under, pct, rss_mb, workdir

WAITERS = 500
ADDRESSES = 10
SAMPLES = 100
TICK = os.sysconf("SC_CLK_TCK")


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_share(pid, seconds=10):
    """Share of one core the process used over ``seconds``."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def latencies(session, server, token, job_id):
    out = []
    for _ in range(SAMPLES):
        for path in ("/api/nodes", f"/api/status/{job_id}"):
            t = time.perf_counter()
            r = session.get(server.url + path, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            out.append((time.perf_counter() - t) * 1000)
    return out


def waiting_submit(server, token, i):
    """One waiting submit over a bare socket: (socket, the job's id) once the headers came."""
    boundary = "b0undary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
        f'filename="{name}"\r\n\r\n'.encode() + data.encode() + b"\r\n"
        for name, data in (("code", "print('hi')\n"),
                           ("config_file", job_config("alice", 1, token=token)))
    ) + f"--{boundary}--\r\n".encode()
    host, port = server.url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=120,
                                 source_address=(f"127.0.4.{i % ADDRESSES + 1}", 0))
    s.sendall(f"POST /api/submit?wait=1 HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
              f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
              "\r\n".encode() + body)
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    head = got.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    job_id = next(line.split(": ")[1] for line in head.split("\r\n")
                  if line.lower().startswith("x-gpuqueue-job-id"))
    return s, job_id, got.split(b"\r\n\r\n", 1)[1]


def answered(s, rest):
    """The waiter's whole answer (chunked), once the server closes."""
    while chunk := s.recv(65536):
        rest += chunk
    s.close()
    return b'"status": "cancelled"' in rest


def run():
    root = workdir("waiters")
    server = Server(root / "s", nodes=idle_nodes(8), max_pending_per_user=10 * WAITERS).start()
    pid = server.proc.pid
    session = requests.Session()
    token = server.token()
    try:
        probe = server.submit_ok("print(1)\n", expected_time=1)["job_id"]
        quiet = latencies(session, server, token, probe)
        base = {"threads": threads(pid), "rss": rss_mb(pid), "cpu": cpu_share(pid)}
        waiting = [waiting_submit(server, token, i) for i in range(WAITERS)]
        busy = latencies(session, server, token, probe)
        held = {"threads": threads(pid), "rss": rss_mb(pid), "cpu": cpu_share(pid)}
        t = time.perf_counter()
        for _, job_id, _ in waiting:
            session.post(f"{server.url}/api/cancel/{job_id}",
                         headers={"Authorization": f"Bearer {token}"})
        cancelled = time.perf_counter() - t
        ok = sum(answered(s, rest) for s, _, rest in waiting)
        delivered = time.perf_counter() - t
    finally:
        server.kill()
        kill_processes_under(root)
    bench = "waiters"
    rows = [
        Row(bench, f"server threads, {WAITERS} submits waiting (vs none)", base["threads"],
            held["threads"], held["threads"] / base["threads"]),
        Row(bench, f"server RSS, {WAITERS} waiting (vs none)", round(base["rss"], 1),
            round(held["rss"], 1), held["rss"] / base["rss"], unit="MB"),
        Row(bench, f"server CPU, {WAITERS} waiting (vs none), share of a core",
            round(base["cpu"], 3), round(held["cpu"], 3), None),
        Row(bench, f"status and nodes p99, {WAITERS} waiting (vs none)", round(pct(quiet, 99), 1),
            round(pct(busy, 99), 1), pct(busy, 99) / pct(quiet, 99), "< 1 s", unit="ms"),
        Row(bench, f"{WAITERS} cancels sent, then the last answer (of {ok})",
            round(cancelled, 2), round(delivered, 2), delivered / cancelled, unit="s"),
    ]
    print(f"waiters: {WAITERS} waiting submits, {ok} answered 'cancelled'; "
          f"{(held['rss'] - base['rss']) * 1024 / WAITERS:.0f} KiB each")
    return [r.show() for r in rows]


if __name__ == "__main__":
    run()
