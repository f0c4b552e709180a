"""9. Jobs of 1, 2 and 4 GPUs on two 4-GPU nodes: a seeded mix whose true run times are
0.3-3x their expected_time, arriving over time in a seeded stream, at two loads: about
as fast as the GPUs work, and faster (a queue builds up); scaled-down sleeps on local
nodes.  Reported: the makespan against
the lower bound max(total GPU-seconds / GPUs, longest job), and the longest wait of a
4-GPU job from its submit to its start.

The baseline is plain first-fit without reservation, measured in the same run with the
same interpreters and sleeps: whenever GPUs free up, every queued job that fits on one
node, taken in submit order, starts there.  A 4-GPU job then waits until a node happens
to have all four free at once, which smaller jobs taking freed GPUs can put off for long.
gpuqueue holds freed GPUs for the job at the head of the order and lets a later job
use one only if its time limit ends first (conservative backfill).
"""
import random
import subprocess
import sys
import time
from datetime import datetime

import requests

from common import Row, Server, drained_jobs, kill_processes_under, submit_sleeper, workdir

NODES, GPUS = 2, 4
JOBS = 40
MULTIPLIER = 4  # the time limit: more than the 3x the true times reach


def workload(spacing):
    """(arrival, gpus, expected, true) per job, in submit order; arrivals are seconds
    from the start, ``spacing`` apart on average."""
    rng = random.Random(2026)
    work, arrival = [], 0.0
    for _ in range(JOBS):
        gpus = rng.choices((1, 2, 4), weights=(6, 3, 2))[0]
        expected = rng.uniform(0.5, 2.0)
        work.append((arrival, gpus, expected, expected * rng.uniform(0.3, 3.0)))
        arrival += rng.expovariate(1 / spacing)
    return work


def first_fit(work):
    """(makespan, longest wait of a 4-GPU job) under first-fit without reservation."""
    free = [GPUS] * NODES
    arriving = list(enumerate(work))
    queue = []
    running = []  # (process, node, gpus)
    started = {}
    t0 = time.perf_counter()
    while arriving or queue or running:
        now = time.perf_counter() - t0
        while arriving and arriving[0][1][0] <= now:
            queue.append(arriving.pop(0))
        for proc, node, gpus in [r for r in running if r[0].poll() is not None]:
            running.remove((proc, node, gpus))
            free[node] += gpus
        for item in list(queue):
            i, (arrival, gpus, _, true) = item
            node = next((n for n in range(NODES) if free[n] >= gpus), None)
            if node is not None:
                free[node] -= gpus
                started[i] = time.perf_counter() - t0 - arrival
                proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({true:.3f})"])
                running.append((proc, node, gpus))
                queue.remove(item)
        time.sleep(0.01)
    makespan = time.perf_counter() - t0
    return makespan, max(started[i] for i, (_, g, _, _) in enumerate(work) if g == GPUS)


def gpuqueue_run(work):
    root = workdir("gpus")
    nodes = [{"id": n, "host": "local", "gpus": ",".join(map(str, range(GPUS)))}
             for n in range(NODES)]
    server = Server(root / "s", nodes=nodes, timeout_multiplier=MULTIPLIER).start()
    try:
        token = server.token("alice")
        s = requests.Session()
        t0 = time.time()
        for arrival, gpus, expected, true in work:
            time.sleep(max(0.0, t0 + arrival - time.time()))
            submit_sleeper(s, server, token, true, expected, gpus=gpus)
        jobs = drained_jobs(s, server, token)
    finally:
        server.kill()
        kill_processes_under(root)
    assert all(j["status"] == "completed" for j in jobs), [j for j in jobs if j["status"] != "completed"][:2]

    def ts(iso):
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    makespan = max(ts(j["finished_at"]) for j in jobs) - t0
    wait = max(ts(j["started_at"]) - ts(j["submitted_at"]) for j in jobs if j["gpus"] == GPUS)
    return makespan, wait


def run():
    rows = []
    for spacing, load in ((0.5, "arrivals 0.5 s apart"), (0.3, "arrivals 0.3 s apart")):
        work = workload(spacing)
        bound = max(sum(g * t for _, g, _, t in work) / (NODES * GPUS), max(t for *_, t in work))
        ff_span, ff_wait = first_fit(work)
        span, wait = gpuqueue_run(work)
        sizes = {g: sum(1 for w in work if w[1] == g) for g in (1, 2, 4)}
        print(f"9. GPUs, {load}: {JOBS} jobs ({sizes[1]} of 1 GPU, {sizes[2]} of 2, {sizes[4]} "
              f"of 4), true time 0.3-3x expected, {NODES} local nodes of {GPUS} GPUs; lower "
              f"bound {bound:.2f} s")
        rows += [Row("gpus", f"{load}: first-fit makespan vs lower bound", bound, ff_span,
                     ff_span / bound, "", "s").show(),
                 Row("gpus", f"{load}: gpuqueue makespan vs lower bound", bound, span,
                     span / bound, "", "s").show(),
                 Row("gpus", f"{load}: longest 4-GPU wait, gpuqueue vs first-fit", ff_wait,
                     wait, wait / ff_wait, "", "s").show()]
    return rows


if __name__ == "__main__":
    run()
