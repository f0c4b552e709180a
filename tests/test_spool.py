"""The spool on its own (in-process) and its recovery table, state by state.

Part A drives ``gpuqueue.Spool`` and the filesystem primitives directly on a
tmp_path spool.  Part B builds each row of the recovery table in the module
docstring by hand on disk, then opens a fresh Spool (or starts a real server)
on it and checks what recovery made of it.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, alive, job_config, wait_for

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gpuqueue  # noqa: E402
from gpuqueue import Job, Outcome, Spool, SpoolBusy  # noqa: E402


# -- helpers -------------------------------------------------------------------


def new_job(user="alice", expected_time=30):
    """A Job as the API would build it; ids of successive calls sort by creation."""
    time.sleep(0.002)  # ids carry microseconds: keep them strictly increasing
    return Job(id=gpuqueue.new_job_id(), user_id=user, competition_id="comp123",
               project_id="proj456", expected_time=float(expected_time),
               submitted_at=time.time(), node_id=-1)


def submit(spool, code="print(1)\n", expected_time=30, online=None, user="alice"):
    """stage + enqueue, like Api.submit; returns (job, queue position)."""
    job = new_job(user, expected_time)
    staged = spool.stage(job, code.encode(), job_config(user, expected_time).encode())
    position, _ = spool.enqueue(job, staged, set(spool.node_ids) if online is None else set(online),
                                max_pending=1000)
    return job, position


def listing(path):
    return sorted(p.name for p in Path(path).iterdir())


def dead_pid():
    """A pid that ran and is gone (reaped by us)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def spools():
    """Open Spools on a root; every one still open is closed at the end."""
    opened = []

    def open_spool(root, nodes=(0, 1, 2)):
        s = Spool(root, nodes)
        s.open()
        opened.append(s)
        return s

    def close(s):
        s.close()
        opened.remove(s)

    open_spool.close = close
    yield open_spool
    for s in opened:
        s.close()


def reopen(spools, s, nodes=None):
    """Close ``s`` and open a fresh Spool on the same root (recovery runs again)."""
    spools.close(s)
    return spools(s.root, s.node_ids if nodes is None else nodes)


###############################################################################
# Part A: the Spool in-process ################################################
###############################################################################


def test_stage_writes_under_tmp_and_enqueue_places_on_least_loaded_node(tmp_path, spools):
    spool = spools(tmp_path / "spool")
    root = spool.root

    job = new_job(expected_time=100)
    staged = spool.stage(job, b"print('a')\n", job_config("alice", 100).encode())
    assert staged.path == root / "tmp" / job.id
    assert listing(staged.path) == ["code.py", "config.yaml", "job.json"]
    assert (staged.path / "code.py").read_text() == "print('a')\n"

    # All nodes empty: the tie goes to the lowest id.
    assert spool.enqueue(job, staged, {0, 1, 2}, max_pending=1000)[0] == 0
    assert job.node_id == 0
    folder = root / "nodes" / "0" / "pending" / job.id
    assert folder.is_dir() and not staged.path.exists()
    assert listing(root / "tmp") == []
    assert gpuqueue.read_json(folder / "job.json") == job.meta()
    assert (folder / "code.py").read_text() == "print('a')\n"
    assert "expected_time: 100" in (folder / "config.yaml").read_text()
    assert spool.is_active(job.id) and spool.get(job.id) == job and job.status == "pending"

    b, pb = submit(spool, expected_time=10)   # loads 100/0/0 -> node 1
    c, pc = submit(spool, expected_time=10)   # loads 100/10/0 -> node 2
    d, pd = submit(spool, expected_time=10)   # loads 100/10/10 -> tie 1,2 -> node 1
    e, pe = submit(spool, expected_time=5)    # loads 100/20/10 -> node 2
    assert [(j.node_id, p) for j, p in ((b, pb), (c, pc), (d, pd), (e, pe))] == \
        [(1, 0), (2, 0), (1, 1), (2, 1)]
    assert {n: spool.pending_ids(n) for n in spool.node_ids} == {0: [job.id], 1: [b.id, d.id], 2: [c.id, e.id]}
    assert listing(root / "tmp") == []
    assert listing(spool.pending_dir(1)) == sorted([b.id, d.id])
    stats = spool.node_stats()
    assert [stats[n]["queued_jobs"] for n in (0, 1, 2)] == [1, 2, 2]
    assert [stats[n]["queued_seconds"] for n in (0, 1, 2)] == [100, 20, 15]
    assert spool.queue_position(d)[0] == 1 and spool.queue_position(job)[0] == 0


def test_enqueue_places_only_on_online_nodes(tmp_path, spools):
    spool = spools(tmp_path / "spool")
    big, _ = submit(spool, expected_time=1000, online={2})
    assert big.node_id == 2                   # the only online node, though all are free
    j, pos = submit(spool, expected_time=10, online={1, 2})
    assert j.node_id == 1 and pos == 0        # least loaded of the online ones
    k, pos = submit(spool, expected_time=10, online={2})
    assert k.node_id == 2 and pos == 1        # node 2 carries 1000 s but is the only one up
    assert spool.pending_ids(0) == []
    assert listing(spool.pending_dir(0)) == []
    assert listing(spool.pending_dir(2)) == sorted([big.id, k.id])


def test_claim_takes_the_oldest_pending_job(tmp_path, spools):
    spool = spools(tmp_path / "spool", nodes=(0, 1))
    a, _ = submit(spool, online={0})
    b, _ = submit(spool, online={0})
    assert spool.claim(1) is None             # nothing queued on node 1

    before = time.time()
    got = spool.claim(0)
    assert got is a and a.status == "running"
    assert not (spool.pending_dir(0) / a.id).exists()
    folder = spool.running_dir(0) / a.id
    assert folder.is_dir() and spool.folder(a).path == folder
    # The claim is the rename alone: when and where it started is written once the job
    # may reach its node (launching), so that a claim cut short is simply pending again.
    assert not (folder / "start.json").exists() and not (folder / "launching").exists()
    assert before <= a.started_at <= time.time()
    assert spool.pending_ids(0) == [b.id]
    assert spool.queue_position(b)[0] == 0 and spool.queue_position(a)[0] is None
    assert spool.running_on(0) == [a] and spool.running_on(1) == []

    assert spool.claim(0) is b
    assert spool.claim(0) is None
    assert listing(spool.pending_dir(0)) == []
    assert listing(spool.running_dir(0)) == sorted([a.id, b.id])


def test_finish_moves_folder_to_done_with_result_and_output(tmp_path, spools):
    spool = spools(tmp_path / "spool", nodes=(0,))
    a, _ = submit(spool)
    b, _ = submit(spool)
    spool.claim(0)
    # A local work folder inside the job folder, as releases before node protocol 2 made it.
    (spool.folder(a).path / "work").mkdir()
    (spool.folder(a).path / "work" / "stdout").write_text("raw")

    spool.finish(a, Outcome("failed", 3, "exit code 3", {"stdout": "out\n", "stderr": "err\n"}))
    done = spool.root / "done" / a.id
    assert not (spool.running_dir(0) / a.id).exists()
    assert {"result.json", "stdout", "stderr", "job.json", "code.py"} <= set(listing(done))
    assert not (done / "work").exists()       # the wrapper's scratch folder is dropped
    assert (done / "stdout").read_text() == "out\n" and (done / "stderr").read_text() == "err\n"
    r = gpuqueue.read_json(done / "result.json")
    assert r["status"] == "failed" and r["exit_code"] == 3 and r["error"] == "exit code 3"
    assert r["node_id"] == 0 and r["started_at"] == a.started_at and r["finished_at"] >= r["started_at"]
    assert not spool.is_active(a.id)

    got = spool.get(a.id)
    assert got is not a
    assert (got.status, got.exit_code, got.error, got.node_id) == ("failed", 3, "exit code 3", 0)
    assert got.meta() == a.meta()
    assert got.public()["finished_at"].endswith("Z")
    done_folder = spool.done_folder(a.id)
    assert [done_folder.stream(s).read_text() for s in ("stdout", "stderr")] == ["out\n", "err\n"]

    spool.claim(0)
    spool.finish(b, Outcome("completed", 0, None, {"stdout": "ok\n"}))
    assert spool.get(b.id).status == "completed" and spool.get(b.id).error is None
    stats = spool.node_stats()[0]
    assert (stats["completed"], stats["failed"], stats["cancelled"], stats["queued_jobs"]) == (1, 1, 0, 0)
    assert spool.get("f" * 24) is None

    # A fresh Spool counts the same finished jobs from done/.
    again = reopen(spools, spool)
    stats = again.node_stats()[0]
    assert (stats["completed"], stats["failed"], stats["cancelled"]) == (1, 1, 0)
    assert again.get(a.id).status == "failed"


def test_request_cancel_pending_running_and_finished(tmp_path, spools):
    spool = spools(tmp_path / "spool", nodes=(0,))
    run, _ = submit(spool)
    pend, _ = submit(spool)
    later, _ = submit(spool)
    spool.claim(0)

    # pending: finished at once as cancelled, gone from its queue
    assert spool.request_cancel(pend.id) is True
    assert spool.pending_ids(0) == [later.id] and spool.queue_position(later)[0] == 0
    assert not spool.is_active(pend.id)
    assert not (spool.pending_dir(0) / pend.id).exists()
    done = spool.root / "done" / pend.id
    assert gpuqueue.read_json(done / "result.json")["status"] == "cancelled"
    got = spool.get(pend.id)
    assert got.status == "cancelled" and got.error == "cancelled while pending"
    assert spool.node_stats()[0]["cancelled"] == 1

    # running: a cancel file for its scheduler, the job stays running
    assert spool.request_cancel(run.id) is True
    assert (spool.running_dir(0) / run.id / "cancel").exists()
    assert run.cancel_requested and run.status == "running" and spool.is_active(run.id)
    assert spool.node_stats()[0]["cancelled"] == 1

    # finished: nothing to do
    assert spool.request_cancel(pend.id) is False
    spool.finish(run, Outcome("cancelled", -15, "cancelled while running"))
    assert spool.request_cancel(run.id) is False
    assert spool.get(run.id).status == "cancelled"

    # a fresh Spool sees the cancel file of a running job
    other, _ = submit(spool)
    assert spool.claim(0) is later
    spool.request_cancel(later.id)
    again = reopen(spools, spool)
    assert again.get(later.id).cancel_requested is True
    assert again.get(other.id).cancel_requested is False


def test_job_ids_newest_first_and_queue_position(tmp_path, spools):
    spool = spools(tmp_path / "spool", nodes=(0,))
    jobs = [submit(spool)[0] for _ in range(4)]
    ids = [j.id for j in jobs]
    assert ids == sorted(ids)                 # ids sort by submit time
    spool.claim(0)
    spool.finish(jobs[0], Outcome("completed", 0))
    spool.request_cancel(jobs[2].id)
    assert list(spool.job_ids()) == ids[::-1]       # active and done together, newest first
    assert [spool.queue_position(j)[0] for j in jobs] == [None, 0, None, 1]
    again = reopen(spools, spool)
    assert list(again.job_ids()) == ids[::-1]
    assert again.pending_ids(0) == [ids[1], ids[3]]
    assert again.queue_position(again.get(ids[3]))[0] == 1


def test_second_spool_on_same_root_is_refused_naming_the_first_pid(tmp_path, spools):
    first = spools(tmp_path / "spool")
    job, _ = submit(first)
    second = Spool(tmp_path / "spool", (0, 1, 2))
    with pytest.raises(SpoolBusy) as info:
        second.open()
    msg = str(info.value)
    assert f"pid {os.getpid()}" in msg and str(first.root) in msg
    # The first one is untouched and still works.
    assert first.claim(job.node_id) is job
    assert (first.root / "server.pid").read_text().strip() == str(os.getpid())
    spools.close(first)
    # Once the first is closed, the spool can be taken again.
    third = spools(tmp_path / "spool")
    assert third.is_active(job.id)


def test_write_file_is_atomic_and_honours_mode(tmp_path):
    target = tmp_path / "secret"
    gpuqueue.write_file(target, "one", mode=0o600)
    assert target.read_text() == "one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert listing(tmp_path) == ["secret"]    # no '.secret.*.tmp' left behind

    gpuqueue.write_file(target, b"two\x00bytes", mode=0o600)
    assert target.read_bytes() == b"two\x00bytes"
    assert [n for n in listing(tmp_path) if n.startswith(".")] == []

    gpuqueue.write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert gpuqueue.read_json(tmp_path / "x.json") == {"a": [1, 2], "b": 1}
    assert [n for n in listing(tmp_path) if n.startswith(".")] == []

    # A failed write leaves the old file as it was and no temp file.
    with pytest.raises((TypeError, AttributeError)):
        gpuqueue.write_file(target, 12345)
    assert target.read_bytes() == b"two\x00bytes"
    assert listing(tmp_path) == ["secret", "x.json"]


def test_read_capped_keeps_head_and_tail(tmp_path):
    f = tmp_path / "out"
    data = b"H" * 3000 + b"M" * 4000 + b"T" * 3000
    f.write_bytes(data)
    text = gpuqueue.read_capped(f, 2048)
    assert text.startswith(b"H" * 1024) and text.endswith(b"T" * 1024)
    assert b"M" not in text
    note = (b"\n[gpuqueue: output truncated, 7952 of 10000 bytes cut here;"
            b" the limit is 2048 bytes per stream]\n")
    assert text == b"H" * 1024 + note + b"T" * 1024

    f.write_bytes(b"x" * 2048)                # exactly at the limit: untouched
    assert gpuqueue.read_capped(f, 2048) == b"x" * 2048
    f.write_bytes(b"short\n\xff")           # bytes as stored: decoded only when sent
    assert gpuqueue.read_capped(f, 2048) == b"short\n\xff"
    f.write_bytes(b"")
    assert gpuqueue.read_capped(f, 2048) == b""
    assert gpuqueue.read_capped(tmp_path / "missing", 2048) == b""


###############################################################################
# Part B: the recovery table, state by state ##################################
###############################################################################


def test_recovery_removes_tmp_leftovers(tmp_path, spools):
    spool = spools(tmp_path / "spool")
    kept, _ = submit(spool)
    job = new_job()
    staged = spool.stage(job, b"print(1)\n", job_config().encode())
    spools.close(spool)                       # "crash" between stage and enqueue
    assert staged.path.is_dir()

    again = spools(tmp_path / "spool")
    assert listing(again.root / "tmp") == []
    assert not again.is_active(job.id) and again.get(job.id) is None
    assert job.id not in list(again.job_ids())
    assert again.is_active(kept.id)            # a queued job is not touched


@pytest.mark.parametrize("where", ["pending", "running"])
def test_recovery_moves_folder_with_result_to_done_exactly_once(tmp_path, spools, where):
    spool = spools(tmp_path / "spool", nodes=(0,))
    job, _ = submit(spool)
    other, _ = submit(spool)
    if where == "running":
        spool.claim(0)
    folder = spool.folder(job).path
    # finish() cut short after result.json, before the rename to done/
    status = "completed" if where == "running" else "cancelled"
    gpuqueue.write_file(folder / "stdout", "out\n")
    gpuqueue.write_file(folder / "stderr", "")
    gpuqueue.write_json(folder / "result.json", {
        "status": status, "exit_code": 0 if status == "completed" else None,
        "error": None if status == "completed" else "cancelled while pending",
        "node_id": 0, "started_at": job.started_at, "finished_at": time.time()})
    spools.close(spool)

    again = spools(tmp_path / "spool", nodes=(0,))
    done = again.root / "done" / job.id
    assert done.is_dir() and not folder.exists()
    assert not again.is_active(job.id) and job.id not in again.pending_ids(0)
    got = again.get(job.id)
    assert got.status == status and got.node_id == 0
    assert [(done / s).read_text() for s in ("stdout", "stderr")] == ["out\n", ""]
    assert again.node_stats()[0][status] == 1
    assert list(again.job_ids()).count(job.id) == 1
    assert again.pending_ids(0) == [other.id]

    # A second restart neither moves nor counts it again.
    third = reopen(spools, again)
    assert third.node_stats()[0][status] == 1
    assert list(third.job_ids()).count(job.id) == 1
    assert listing(third.root / "done") == [job.id]
    assert third.get(job.id).status == status


def test_recovery_quarantines_folders_without_readable_job_json(tmp_path, spools):
    spool = spools(tmp_path / "spool", nodes=(0,))
    running, _ = submit(spool)
    assert spool.claim(0) is running
    garbage, _ = submit(spool)
    missing, _ = submit(spool)
    wrong_keys, _ = submit(spool)
    good, _ = submit(spool)
    spools.close(spool)

    def pdir(j):
        return tmp_path / "spool" / "nodes" / "0" / ("running" if j is running else "pending") / j.id

    (pdir(garbage) / "job.json").write_text("{not json")
    (pdir(missing) / "job.json").unlink()
    (pdir(wrong_keys) / "job.json").write_text(json.dumps({"id": wrong_keys.id}))
    (pdir(running) / "job.json").write_bytes(b"\xff\xfe")
    before = {j.id: sorted(listing(pdir(j))) for j in (garbage, missing, wrong_keys, running)}
    contents = {j.id: (pdir(j) / "code.py").read_text() for j in (garbage, missing, wrong_keys, running)}

    again = spools(tmp_path / "spool", nodes=(0,))
    corrupt = again.root / "corrupt"
    moved = {p.name.split(".")[0]: p for p in corrupt.iterdir() if not p.name.endswith(".REASON")}
    assert sorted(moved) == sorted(before)
    for job_id, files in before.items():
        dest = moved[job_id]
        assert dest.is_dir()
        assert sorted(listing(dest)) == files   # nothing deleted, nothing added
        assert (dest / "code.py").read_text() == contents[job_id]
        reason = dest.with_name(dest.name + ".REASON").read_text()
        assert "job.json" in reason and reason.strip()
        assert not again.is_active(job_id) and again.get(job_id) is None
    assert listing(again.pending_dir(0)) == [good.id]
    assert listing(again.running_dir(0)) == []
    assert again.pending_ids(0) == [good.id] and [j for j in again.job_ids() if again.is_active(j)] == [good.id]
    # Nothing quarantined comes back at the next start, and nothing is lost.
    third = reopen(spools, again)
    assert sorted(p.name for p in corrupt.iterdir() if not p.name.endswith(".REASON")) == \
        sorted(p.name for p in moved.values())
    assert [j for j in third.job_ids() if third.is_active(j)] == [good.id]


def test_recovery_survives_a_stray_file_in_a_queue_folder(tmp_path, spools):
    """A plain file where a job folder belongs must not stop the server from starting."""
    spool = spools(tmp_path / "spool", nodes=(0,))
    good, _ = submit(spool)
    spools.close(spool)
    stray = tmp_path / "spool" / "nodes" / "0" / "pending" / "notes.txt"
    stray.write_text("left here by hand\n")

    again = spools(tmp_path / "spool", nodes=(0,))   # must not raise
    assert again.pending_ids(0) == [good.id]
    kept = [p for p in again.root.rglob("*") if p.is_file() and p.read_text() == "left here by hand\n"]
    assert kept, "the stray file was deleted"


def test_recovery_requeues_running_job_without_start_json(tmp_path, spools):
    spool = spools(tmp_path / "spool", nodes=(0,))
    claimed, _ = submit(spool)
    waiting, _ = submit(spool)
    spools.close(spool)
    # Claimed, but cut short before anything reached the node: no launching.
    node = tmp_path / "spool" / "nodes" / "0"
    os.rename(node / "pending" / claimed.id, node / "running" / claimed.id)

    again = spools(tmp_path / "spool", nodes=(0,))
    assert listing(again.running_dir(0)) == []
    assert listing(again.pending_dir(0)) == sorted([claimed.id, waiting.id])
    job = again.get(claimed.id)
    assert job.status == "pending" and job.started_at is None
    assert again.running_on(0) == []
    assert claimed.id in again.pending_ids(0), \
        f"requeued job {claimed.id} is pending but missing from the queue {again.pending_ids(0)}"
    assert again.pending_ids(0) == [claimed.id, waiting.id]      # oldest id first
    assert again.queue_position(job)[0] == 0
    assert again.node_stats()[0]["queued_jobs"] == 2
    assert again.claim(0).id == job.id


# -- recovery with a real server ----------------------------------------------


def prepared_server(make_server, code, expected_time=30, claim=True):
    """A server (not started) whose spool holds one job, claimed on node 0 by hand."""
    server = make_server(nodes=1, start=False)
    spool = Spool(server.dir / "spool", (0,))
    spool.open()
    try:
        job, _ = submit(spool, code, expected_time=expected_time)
        if claim:
            assert spool.claim(0) is job
    finally:
        spool.close()
    return server, job, server.dir / "spool" / "nodes" / "0" / "running" / job.id


def test_running_job_without_start_json_runs_after_restart(make_server, tmp_path):
    ran = tmp_path / "ran"
    server, job, _ = prepared_server(make_server, f"open({str(ran)!r}, 'a').write('x\\n')\n",
                                     claim=False)
    node = server.dir / "spool" / "nodes" / "0"
    os.rename(node / "pending" / job.id, node / "running" / job.id)
    server.start()
    st = server.wait(job.id, timeout=10)
    assert st["status"] == "completed", st
    assert ran.read_text() == "x\n"


def test_claimed_but_never_launched_job_runs_exactly_once(make_server, tmp_path):
    ran = tmp_path / "ran"
    code = f"import os\nopen({str(ran)!r}, 'a').write(f'{{os.getpid()}}\\n')\nprint('ran')\n"
    server, job, folder = prepared_server(make_server, code)
    assert folder.is_dir() and not (folder / "launching").exists()
    server.start()
    st = server.wait(job.id)
    assert st["status"] == "completed" and st["exit_code"] == 0, st
    assert server.results(job.id)["stdout"] == "ran\n"
    time.sleep(0.5)
    assert len(ran.read_text().splitlines()) == 1
    assert server.get("/api/nodes").json()["nodes"][0]["completed"] == 1


def mark_launching(folder, work):
    """The launching record an executor writes before its start may reach the node."""
    (folder / "launching").write_text(json.dumps({"where": str(work), "started_at": time.time(),
                                                  "node_id": 0, "gpus": ["0"]}))


def node_work(server, job):
    """A job's folder in local node 0's workdir."""
    return server.dir / "spool" / "nodes" / "0" / "work" / job.id


def half_started(make_server, tmp_path, claim=None):
    """A server (not started) whose one job was marked launching and its folder made
    on node 0 (with a ``launched`` link to ``claim``), but which never started: its
    code appends a line to the file ``ran``."""
    code = f"open({str(tmp_path / 'ran')!r}, 'a').write('x\\n')\nprint('ran')\n"
    server, job, folder = prepared_server(make_server, code)
    work = node_work(server, job)
    work.mkdir(parents=True)
    (work / "code.py").write_text(code)
    mark_launching(folder, work)
    if claim is not None:
        os.symlink(claim, work / "launched")
    return server, job


def test_claimed_with_half_made_work_folder_runs_exactly_once(make_server, tmp_path):
    """The executor had made the job's folder on the node and marked the job as
    launching, but its wrapper had not claimed ``launched`` when the server died."""
    server, job = half_started(make_server, tmp_path)
    server.start()
    assert server.wait(job.id)["status"] == "completed"
    time.sleep(0.5)
    assert (tmp_path / "ran").read_text() == "x\n"


def test_a_recovery_cut_short_after_its_claim_runs_the_job_once(make_server, tmp_path):
    """A recovering server had claimed the launch of a job that never started (so
    that no wrapper ever will), and was killed before it queued the job again: the
    next recovery tells its claim from a wrapper's and queues it, not a job failed
    that never ran."""
    server, job = half_started(make_server, tmp_path, claim=gpuqueue.NodeFiles.VOID)
    server.start()
    st = server.wait(job.id)
    assert st["status"] == "completed" and st["exit_code"] == 0, st
    assert server.results(job.id)["stdout"] == "ran\n"
    assert (tmp_path / "ran").read_text() == "x\n"


def launched_by_a_dead_wrapper(server, job, folder):
    """A job's folder on its node as a wrapper leaves it once launched, that wrapper now gone."""
    work = node_work(server, job)
    work.mkdir(parents=True)
    mark_launching(folder, work)
    pid = dead_pid()
    (work / "launched").touch()
    (work / "pids").write_text(json.dumps({"wrapper": pid, "job": pid}))
    return work


def test_wrapper_result_left_behind_is_collected_without_running_again(make_server, tmp_path):
    ran = tmp_path / "ran"
    server, job, folder = prepared_server(make_server, f"open({str(ran)!r}, 'a').write('x\\n')\n")
    work = launched_by_a_dead_wrapper(server, job, folder)
    (work / "stdout").write_text("from the first server\n")
    (work / "stderr").write_text("a warning\n")
    (work / "result.json").write_text(json.dumps({"exit_code": 0, "reason": None}))
    server.start()
    st = server.wait(job.id)
    assert st["status"] == "completed" and st["exit_code"] == 0 and st["error"] is None, st
    res = server.results(job.id)
    assert res["stdout"] == "from the first server\n" and res["stderr"] == "a warning\n"
    time.sleep(0.5)
    assert not ran.exists(), "the job was run a second time"
    done = server.dir / "spool" / "done" / job.id
    assert done.is_dir() and not folder.exists()


def test_wrapper_gone_without_result_fails_with_clear_error(make_server, tmp_path):
    ran = tmp_path / "ran"
    server, job, folder = prepared_server(make_server, f"open({str(ran)!r}, 'a').write('x\\n')\n")
    work = launched_by_a_dead_wrapper(server, job, folder)
    (work / "stdout").write_text("partial\n")
    server.start()
    st = server.wait(job.id)
    assert st["status"] == "failed" and st["exit_code"] is None, st
    assert "wrapper ended without a result" in st["error"]
    assert server.results(job.id)["stdout"] == "partial\n"
    time.sleep(0.5)
    assert not ran.exists(), "the job was run a second time"


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_running_job_is_reattached_after_kill_9(make_server, tmp_path):
    server = make_server(nodes=1)
    pids_file = tmp_path / "job_pids"
    code = (f"import os, time\nopen({str(pids_file)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
            "time.sleep(3)\nprint('done')\n")
    sub = server.submit_ok(code)
    job_id = sub["job_id"]
    server.wait(job_id, ("running",))
    wait_for(lambda: _lines(pids_file), what="the job to start")
    work = server.dir / "spool" / "nodes" / "0" / "work" / job_id
    wrapper = wait_for(lambda: (work / "pids").exists() and gpuqueue.read_json(work / "pids"),
                       what="the wrapper's pids")["wrapper"]

    server.kill()                             # SIGKILL: no clean-up at all
    assert alive(wrapper), "the job's wrapper died with the server"
    server.start()
    st = server.wait(job_id, timeout=60)
    assert st["status"] == "completed" and st["exit_code"] == 0, st
    assert server.results(job_id)["stdout"] == "done\n"
    assert len(_lines(pids_file)) == 1, f"the job started more than once: {_lines(pids_file)}"
    assert server.get("/api/nodes").json()["nodes"][0]["completed"] == 1


def test_timeout_still_fires_after_restart(make_server, tmp_path):
    server = make_server(nodes=1)
    pids_file = tmp_path / "job_pids"
    code = (f"import os, time\nopen({str(pids_file)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
            "time.sleep(60)\n")
    sub = server.submit_ok(code, expected_time=1)   # multiplier 2: a 2 s limit
    job_id = sub["job_id"]
    wait_for(lambda: _lines(pids_file), what="the job to start")
    server.kill(signal.SIGKILL)
    server.start()
    st = server.wait(job_id, timeout=60)
    assert st["status"] == "failed" and st["error"] == "timeout", st
    assert len(_lines(pids_file)) == 1
    assert not alive(int(_lines(pids_file)[0]))
