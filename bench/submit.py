"""2. Submit throughput: 8 concurrent clients for 10 s on /api/submit (a durable accept)
vs a bare Bottle+waitress route that takes the same multipart upload, fsyncs it and
renames it into place. Target: >= 0.7 x the baseline. p50/p99 latency too. A second
baseline also fsyncs the folder after the rename, as gpuqueue does so that an accepted
job survives a power cut; it shows what that durability costs on this disk.

The clients run in a separate process, keep their connections open, and send a
pre-built body, so both servers face the same load. gpuqueue's nodes are unreachable
here, so accepted jobs stay queued and nothing else competes for the CPU.
"""
import http.client
import json
import subprocess
import sys
import threading
import time

from common import Row, Server, idle_nodes, job_config, median, pct, workdir

CLIENTS = 8
SECONDS = 10
BOUNDARY = "gpuqueuebenchboundary"


def body(config):
    parts = []
    for name, data in (("code", "print('hello')\n"), ("config_file", config)):
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                     f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                     f"{data}\r\n")
    return ("".join(parts) + f"--{BOUNDARY}--\r\n").encode()


BASELINE_APP = r'''
import logging, os, sys, secrets, bottle, waitress
logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as gpuqueue does
app = bottle.Bottle()
root, sync_dir = sys.argv[1], sys.argv[2] == "sync-dir"

@app.post("/api/submit")
def submit():
    name = secrets.token_hex(8)
    tmp = os.path.join(root, "." + name)
    with open(tmp, "wb") as f:
        for part in ("code", "config_file"):
            f.write(bottle.request.files.get(part).file.read())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(root, name))
    if sync_dir:  # what makes the rename itself survive a power cut
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    bottle.response.status = 201
    return {"job_id": name}

server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
print(f"listening on http://127.0.0.1:{server.effective_port}", flush=True)
server.run()
'''


def load(url, token, data):
    """Run CLIENTS keep-alive clients for SECONDS in this process; latencies in ms."""
    host, port = url.split("//")[1].split(":")
    latencies, errors = [], []
    end = time.monotonic() + SECONDS
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
               "Authorization": f"Bearer {token}"}

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while time.monotonic() < end:
            t0 = time.perf_counter()
            conn.request("POST", "/api/submit", body=data, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 201:
                errors.append(r.status)
            latencies.append((time.perf_counter() - t0) * 1000)
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors}


def measure(url, token, data):
    """Run the load from a child process so it does not share the server's GIL."""
    out = subprocess.run([sys.executable, __file__, "--load", url, token],
                         input=data, capture_output=True, check=True)
    return json.loads(out.stdout)


def bare_route(folder, mode):
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_APP, str(folder), mode],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().split("listening on ")[1].strip()


def run():
    root = workdir("submit")
    server = Server(root / "s", nodes=idle_nodes(), max_pending_per_user=10 ** 9).start()
    token = server.token("alice")
    data = body(job_config("alice", 10))
    base, base_url = bare_route(root / "base", "plain")
    synced, synced_url = bare_route(root / "synced", "sync-dir")
    try:
        b = measure(base_url, token, data)
        s = measure(synced_url, token, data)
        g = measure(server.url, token, data)
    finally:
        base.kill()
        synced.kill()
        server.kill()
    assert not (b["errors"] or s["errors"] or g["errors"]), [r["errors"][:3] for r in (b, s, g)]
    b_rate, s_rate, g_rate = (len(r["latencies"]) / SECONDS for r in (b, s, g))
    print(f"2. submit throughput ({CLIENTS} clients, {SECONDS} s)")
    return [
        Row("submit", "accepted submits per second", b_rate, g_rate, g_rate / b_rate,
            ">= 0.7", "req/s").show(),
        Row("submit", "the same, baseline also fsyncs its folder", s_rate, g_rate,
            g_rate / s_rate, unit="req/s").show(),
        Row("submit", "latency p50", median(b["latencies"]), median(g["latencies"]),
            median(g["latencies"]) / median(b["latencies"]), unit="ms").show(),
        Row("submit", "latency p99", pct(b["latencies"], 99), pct(g["latencies"], 99),
            pct(g["latencies"], 99) / pct(b["latencies"], 99), unit="ms").show(),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        print(json.dumps(load(sys.argv[2], sys.argv[3], sys.stdin.buffer.read())))
    else:
        run()
