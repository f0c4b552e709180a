"""8. A normal request while hundreds of slow clients hold connections open.

300 connections from 6 loopback addresses each send one header byte a second (never
silent, never done: what waitress's own idle timeout does not catch). Beside them, 50
sequential GET /api/nodes are timed; the baseline is the same 50 requests with no
slow client. Before this round's server, the slow clients took every worker thread
and the connection limit, and the normal request never answered. Target: the p99
stays well under a second (the suite asserts a generous bound; this is the figure).
"""
import socket
import threading
import time

import requests

from common import Row, Server, idle_nodes, median, pct, workdir

SLOW = 300
SAMPLES = 50


def timed(url):
    out = []
    session = requests.Session()
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        assert session.get(url + "/api/nodes", timeout=30).status_code == 200
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run():
    root = workdir("slowclients")
    server = Server(root / "s", nodes=idle_nodes(2)).start()
    try:
        quiet = timed(server.url)
        host, port = server.url.split("//")[1].split(":")
        slow, stop = [], threading.Event()
        for i in range(SLOW):
            s = socket.create_connection((host, int(port)),
                                         source_address=(f"127.0.3.{i % 6 + 1}", 0))
            s.sendall(b"GET /api/nodes HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)

        def trickle():
            while not stop.wait(1):
                for s in slow:
                    try:
                        s.sendall(b"X")
                    except OSError:
                        pass
        t = threading.Thread(target=trickle)
        t.start()
        try:
            busy = timed(server.url)
        finally:
            stop.set()
            t.join()
            for s in slow:
                s.close()
    finally:
        server.kill()
    print(f"8. a normal request beside {SLOW} slow clients ({SAMPLES} requests each way)")
    rows = [Row("slow clients", "GET /api/nodes median", median(quiet), median(busy),
                median(busy) / median(quiet), unit="ms"),
            Row("slow clients", "GET /api/nodes p99", pct(quiet, 99), pct(busy, 99),
                pct(busy, 99) / pct(quiet, 99), "p99 < 1000 ms", unit="ms")]
    return [r.show() for r in rows]


if __name__ == "__main__":
    run()
