"""Many readers at once while the queue moves.

Dashboards, monitoring and scripts read /api/status, /api/nodes, /api/jobs and
/metrics all the time, on the server's HTTP threads, while the node threads start
and end jobs, keep GPUs for big jobs and take readings of GPUs used outside the
queue.  A reader must never get an error for that, nor a *torn* answer: one put
together from before and after a change, such as a job shown running with a
finish time, or a node whose running jobs are not the jobs on its busy GPUs.

Here a driver keeps submitting short jobs of 1, 2 and 4 GPUs to two nodes of four
GPUs (so GPUs are held for the 4-GPU jobs behind the small ones), cancels some, and
has GPUs go foreign and come back through the stand-in nvidia-smi, while 8 threads
read as fast as they can.  Every answer must be a 200 and consistent within
itself; every problem is collected, so that a failure lists each kind seen.
"""
import collections
import random
import re
import subprocess
import threading
import time
import traceback

import requests

from conftest import FINAL, job_config, wait_for
from test_gpus import fake_gpus  # noqa: F401 (a fixture: the stand-in nvidia-smi on PATH)

STATES = ("pending", "running", *FINAL)
SLOT_STATES = ("busy", "held", "foreign", "free")
#: Two nodes on one machine of 8 (stand-in) GPUs, four each.
NODE_GPUS = {0: ["0", "1", "2", "3"], 1: ["4", "5", "6", "7"]}
HAMMER_SECONDS = 20
READERS = 8
#: Seconds between changes of which GPUs are used outside the queue.
FOREIGN_PHASE = 4
#: The driver submits only while fewer jobs than this wait, so the end drains fast.
MOST_PENDING = 12

SAMPLE_RE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^{}]*)\})? "
                       r"(?P<value>\S+)")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"\\]*)"')


class Problems:
    """What went wrong, by kind, from every thread; a few examples of each are kept."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.jobs = collections.defaultdict(set)  # kind -> the jobs it was seen of
        self.examples = collections.defaultdict(list)

    def add(self, kind, detail=""):
        with self.lock:
            self.counts[kind] += 1
            if isinstance(detail, dict) and "job_id" in detail:
                self.jobs[kind].add(detail["job_id"])
            if len(self.examples[kind]) < 3:
                self.examples[kind].append(str(detail)[:1500])

    def report(self):
        def of(kind):
            return f" ({len(self.jobs[kind])} jobs)" if self.jobs[kind] else ""
        return "\n".join(f"{n:5d} x {kind}{of(kind)}\n" + "".join(
            f"        e.g. {e}\n" for e in self.examples[kind])
            for kind, n in self.counts.most_common())


# -- what must hold within one answer ------------------------------------------


def job_problems(job, gpus_of):
    """The inconsistencies of one job record (from a status, a listing or a cancel)."""
    status, gi = job.get("status"), job.get("gpu_indices")
    if status not in STATES:
        return [f"unknown status {status!r}"]
    found = []
    if gpus_of.get(job["job_id"], job["gpus"]) != job["gpus"]:
        found.append("'gpus' is not what was submitted")
    if gi is not None and (len(gi) != job["gpus"] or len(set(gi)) != len(gi)
                           or not set(gi) <= set(NODE_GPUS.get(job["node_id"], ()))):
        found.append("gpu_indices are not 'gpus' distinct GPUs of its node")
    if status == "pending":
        found += [f"pending with {k} set" for k in ("gpu_indices", "started_at", "finished_at",
                                                    "exit_code") if job[k] is not None]
    elif status == "running":
        found += [f"running without {k}" for k in ("gpu_indices", "started_at") if job[k] is None]
        found += [f"running with {k} set" for k in ("finished_at", "exit_code")
                  if job[k] is not None]
    else:
        if job["finished_at"] is None:
            found.append(f"{status} without finished_at")
        if status == "completed" and (job["exit_code"] != 0 or job["started_at"] is None
                                      or gi is None):
            found.append("completed without exit code 0, started_at and gpu_indices")
    times = [job[k] for k in ("submitted_at", "started_at", "finished_at") if job[k]]
    if times != sorted(times):  # ISO 8601 UTC, all of one format
        found.append("submitted_at <= started_at <= finished_at does not hold")
    return found


def brief(job):
    """A job record cut to what the checks look at, for a problem's example."""
    return {k: job.get(k) for k in ("job_id", "status", "node_id", "gpus", "gpu_indices",
                                    "started_at", "finished_at", "exit_code", "cancel_requested")}


def brief_nodes(nodes):
    """An /api/nodes answer cut to what the checks look at, for a problem's example."""
    return [{"id": n["id"], "running_jobs": n["running_jobs"],
             "slots": [(s["gpu"], s["state"], s["job"]) for s in n["gpu_slots"]],
             "holding": n.get("holding", {}).get("gpus"),
             "reading_foreign": {g["device"]: g["foreign"] for g in n.get("gpus", ())
                                 if g["foreign"]} if "gpus" in n else "no reading"}
            for n in nodes]


def nodes_problems(nodes, gpus_of):
    """The inconsistencies of one /api/nodes answer."""
    found = []
    if sorted(n["id"] for n in nodes) != sorted(NODE_GPUS):
        return ["not every node listed once"]
    busy_anywhere = collections.Counter()
    for node in nodes:
        slots = node["gpu_slots"]
        if [s["gpu"] for s in slots] != NODE_GPUS[node["id"]]:
            found.append("gpu_slots are not the node's GPUs, each once, in order")
            continue
        on = collections.Counter(s["job"] for s in slots if s["state"] == "busy")
        busy_anywhere.update(on.keys())
        if any(s["state"] not in SLOT_STATES for s in slots):
            found.append("a slot in an unknown state")
        if any((s["state"] == "busy") != (s["job"] is not None) for s in slots):
            found.append("a busy slot without a job, or a job on a slot not busy")
        if any(gpus_of.get(job, n) != n for job, n in on.items()):
            found.append("a job on a number of slots other than its GPUs")
        running = node["running_jobs"]
        if len(set(running)) != len(running) or set(running) != set(on):
            found.append("running_jobs are not the jobs on the busy slots")
        if node["running_job"] != (running[0] if running else None):
            found.append("running_job is not the first of running_jobs")
        held = set(node["holding"]["gpus"]) if "holding" in node else set()
        if any((s["state"] == "held") != (s["gpu"] in held) for s in slots
               if s["state"] in ("held", "free")):
            found.append("held slots are not the node's 'holding' GPUs")
        if "gpus" in node:  # nvidia-smi's reading: what it calls foreign, the slots do
            reading = {g["device"]: g for g in node["gpus"]}
            if len(reading) != len(node["gpus"]):
                found.append("a GPU listed twice in the reading")
            if any((s["state"] == "foreign") != bool(reading.get(s["gpu"], {}).get("foreign"))
                   for s in slots if s["state"] != "busy"):
                found.append("foreign slots are not the GPUs the reading calls foreign")
        if any(not isinstance(node[k], int) or node[k] < 0
               for k in ("queued_jobs", *FINAL)):
            found.append("a count that is not a whole number >= 0")
    if any(n > 1 for n in busy_anywhere.values()):
        found.append("a job busy on two nodes")
    return found


def parse_metrics(text):
    """{(name, labels as a sorted tuple): value}; ValueError for a line that is not
    a comment or a sample."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE_RE.fullmatch(line)
        if m is None:
            raise ValueError(f"not a sample: {line!r}")
        labels = tuple(sorted(LABEL_RE.findall(m["labels"] or "")))
        if m["labels"] and ",".join(f'{k}="{v}"' for k, v in LABEL_RE.findall(m["labels"])) \
                != m["labels"]:
            raise ValueError(f"malformed labels: {line!r}")
        key = (m["name"], labels)
        if key in samples:
            raise ValueError(f"a sample twice: {line!r}")
        samples[key] = float(m["value"])
    return samples


def metrics_problems(samples):
    """The inconsistencies of one /metrics answer."""
    found = []
    states = collections.defaultdict(dict)  # (node, gpu) -> state -> value
    buckets = collections.defaultdict(list)  # node -> [(le, count)]
    for (name, labels), value in samples.items():
        lab = dict(labels)
        if name == "gpuqueue_gpu_state":
            states[lab["node"], lab["gpu"]][lab["state"]] = value
        elif name == "gpuqueue_dispatch_seconds_bucket":
            buckets[lab["node"]].append((float(lab["le"]), value))
        if value < 0:
            found.append(f"{name} below 0")
    gpus = sorted(states)
    if gpus != sorted((str(n), g) for n, gs in NODE_GPUS.items() for g in gs):
        found.append("gpu_state is not given for each GPU of each node")
    if any(sorted(s) != sorted(SLOT_STATES) or sorted(s.values()) != [0, 0, 0, 1]
           for s in states.values()):
        found.append("a GPU not in exactly one state")
    for node, bs in buckets.items():
        counts = [c for _, c in sorted(bs)]
        if counts != sorted(counts) or \
                counts[-1] != samples.get(("gpuqueue_dispatch_seconds_count", (("node", node),))):
            found.append("dispatch_seconds buckets do not rise to its count")
    return found


# -- the threads ---------------------------------------------------------------


def guarded(problems, name, work):
    """Run ``work``; an exception it raises is a problem (with its traceback), not lost."""
    try:
        work()
    except Exception:
        problems.add(f"{name}: exception", traceback.format_exc())


def answer(session, url, what, problems):
    """The JSON of a 200 answer to GET ``url`` (the text of /metrics), or None with
    the problem recorded."""
    try:
        r = session.get(url, timeout=60)
    except requests.RequestException as exc:
        problems.add(f"{what}: no answer", repr(exc))
        return None
    if r.status_code != 200:
        problems.add(f"{what}: HTTP {r.status_code}", r.text[:300])
        return None
    if what == "metrics":
        return r.text
    try:
        return r.json()
    except ValueError:
        problems.add(f"{what}: not JSON", r.text[:300])
        return None


def read(server, token, ids, gpus_of, problems, seen, stop):
    """One reader: status of a recent job, nodes, jobs (all, and running ones), metrics,
    round and round, checking each answer."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    rnd = random.Random()
    finished = set()  # jobs this reader has seen final: it must never see them unfinished
    turn = 0
    while not stop.is_set():
        turn += 1
        kind = ("status", "nodes", "jobs", "metrics")[turn % 4]
        if kind == "status":
            if not ids:
                time.sleep(0.01)
                continue
            job_id = rnd.choice(ids[-12:]) if rnd.random() < 0.8 else rnd.choice(ids)
            got = answer(session, f"{server.url}/api/status/{job_id}", kind, problems)
            jobs = [got] if got is not None else []
        elif kind == "jobs":
            query = "?status=running" if turn % 8 < 4 else "?limit=1000"
            got = answer(session, f"{server.url}/api/jobs{query}", kind, problems)
            jobs = got["jobs"] if got is not None else []
            listed = [j["job_id"] for j in jobs]
            if listed != sorted(set(listed), reverse=True):
                problems.add("jobs: not each job once, newest first", listed)
            for j in jobs:
                if query == "?status=running" and j["status"] != "running":
                    problems.add("jobs: a job not running listed as running", brief(j))
        elif kind == "nodes":
            got = answer(session, f"{server.url}/api/nodes", kind, problems)
            if got is not None:
                nodes = got["nodes"]
                seen.update(s["state"] for n in nodes for s in n["gpu_slots"])
                for p in nodes_problems(nodes, gpus_of):
                    problems.add(f"nodes: {p}", brief_nodes(nodes))
            continue
        else:
            text = answer(session, f"{server.url}/metrics", kind, problems)
            if text is not None:
                try:
                    samples = parse_metrics(text)
                except ValueError as exc:
                    problems.add("metrics: does not parse", exc)
                    continue
                for p in metrics_problems(samples):
                    problems.add(f"metrics: {p}", [line for line in text.splitlines()
                                                   if "gpu_state" in line or "dispatch" in line])
            continue
        for job in jobs:
            seen.add(job["status"])
            for p in job_problems(job, gpus_of):
                problems.add(f"{kind}: {p}", brief(job))
            if job["status"] in FINAL:
                finished.add(job["job_id"])
            elif job["job_id"] in finished:
                problems.add(f"{kind}: a finished job shown unfinished again", brief(job))


def short_job(rnd):
    """A job of a fraction of a second; one in ten fails."""
    code = f"import time\ntime.sleep({rnd.uniform(0.2, 1.2):.2f})\n"
    return code + ("raise SystemExit(3)\n" if rnd.random() < 0.1 else "")


def go_foreign(fake, outsider, phase):
    """Which GPUs are used outside the queue, by phase: none; GPU 2 (node 0) by a
    process; that and GPU 5 (node 1) by memory out of sight; GPU 5 alone; none..."""
    fake.apps = [["GPU-0002", outsider.pid, 3000]] if phase % 4 in (1, 2) else []
    fake.gpus[5][3] = 5000 if phase % 4 in (2, 3) else 0
    fake.write()


def drive(server, fake, outsider, ids, gpus_of, problems, seen, until):
    """Submit jobs of 1, 2 and 4 GPUs while few wait, cancel one now and then, and
    change which GPUs are used outside the queue, until ``until``, and on (for at
    most as long again) until a reader has seen a GPU used outside the queue: the
    nodes read their GPUs every few seconds, which a slow machine may stretch."""
    rnd = random.Random(1234)
    token = server.token()
    began, phase = time.monotonic(), None
    while time.monotonic() < until or (
            "foreign" not in seen and time.monotonic() < until + HAMMER_SECONDS):
        if phase != (now := int((time.monotonic() - began) // FOREIGN_PHASE)):
            phase = now
            go_foreign(fake, outsider, phase)
        pending = parse_metrics(server.get("/metrics").text)[("gpuqueue_jobs",
                                                               (("state", "pending"),))]
        if pending < MOST_PENDING:
            gpus = rnd.choice((1, 1, 1, 1, 2, 2, 4))
            r = server.submit(short_job(rnd), config=job_config("alice", 2, gpus=gpus))
            if r.status_code != 201:
                problems.add(f"submit: HTTP {r.status_code}", r.text[:300])
            else:
                gpus_of[r.json()["job_id"]] = gpus
                ids.append(r.json()["job_id"])
        if ids and rnd.random() < 0.15:
            r = server.post(f"/api/cancel/{rnd.choice(ids[-6:])}", token)
            if r.status_code == 200:
                for p in job_problems(r.json(), gpus_of):
                    problems.add(f"cancel: {p}", brief(r.json()))
            elif r.status_code != 409:  # 409: it had finished already
                problems.add(f"cancel: HTTP {r.status_code}", r.text[:300])
        time.sleep(0.05)
    go_foreign(fake, outsider, 0)


# -- the test --------------------------------------------------------------------


def test_readers_never_see_an_error_or_a_torn_value_while_the_queue_moves(make_server,
                                                                          fake_gpus):
    fake = fake_gpus(8)
    server = make_server(nodes=[{"id": n, "host": "local", "gpus": ",".join(gs)}
                                for n, gs in NODE_GPUS.items()])
    token = server.token()
    outsider = subprocess.Popen(["sleep", "300"])  # the process "outside the queue"
    problems, seen = Problems(), set()
    ids, gpus_of = [], {}  # what the driver submitted, in order; and each one's GPUs
    stop = threading.Event()
    readers = [threading.Thread(target=guarded, args=(problems, "reader", lambda: read(
        server, token, ids, gpus_of, problems, seen, stop))) for _ in range(READERS)]
    try:
        for t in readers:
            t.start()
        guarded(problems, "driver", lambda: drive(server, fake, outsider, ids, gpus_of,
                                                  problems, seen, time.monotonic() + HAMMER_SECONDS))
    finally:
        stop.set()
        for t in readers:
            t.join(120)
        outsider.kill()
        outsider.wait()
    # It was the moving queue that was read: GPUs busy, held for a big job, foreign.
    if len(ids) < 20 or not {"busy", "held", "foreign", "pending", "running",
                             "completed"} <= seen:
        problems.add("the queue did not move as planned", (len(ids), seen))

    # Every job ends, and is listed once; the server counts each one finished once.
    def listing():
        jobs = server.get("/api/jobs?limit=1000", token).json()["jobs"]
        return all(j["status"] in FINAL for j in jobs) and len(jobs) >= len(ids) and jobs
    jobs = wait_for(listing, f"every job to end; and besides:\n{problems.report()}", timeout=180)
    if [j["job_id"] for j in jobs] != sorted(ids, reverse=True):
        problems.add("end: not each job listed once", [j["job_id"] for j in jobs])
    for job in jobs:
        for p in job_problems(job, gpus_of):
            problems.add(f"end: {p}", brief(job))
    samples = parse_metrics(server.get("/metrics").text)
    finished = sum(v for (name, _), v in samples.items() if name == "gpuqueue_jobs_finished_total")
    if finished != len(ids):
        problems.add("end: jobs_finished_total is not the number of jobs", (finished, len(ids)))
    for p in metrics_problems(samples):
        problems.add(f"end: metrics: {p}")
    log = server.log()
    for bad in ("Traceback", "internal error"):
        if bad in log:
            problems.add(f"server log: {bad}", log[max(0, log.index(bad) - 300):][:1500])
    assert not problems.counts, f"{sum(problems.counts.values())} problems:\n{problems.report()}"
