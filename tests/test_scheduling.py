"""Which job runs next: users take turns, priorities go first, idle nodes take work.

The spool-level tests drive ``gpuqueue.Spool`` on a tmp_path spool; the others
run a real server over real HTTP.
"""
import itertools
import sys
import time

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ROOT, job_config

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpuqueue import Job, Outcome, Spool  # noqa: E402

_ids = itertools.count()


def make_job(user="alice", priority=0, expected_time=10.0):
    # Ids sort by creation, as real ones do (a counter keeps them strictly increasing).
    return Job(id=f"{next(_ids):024x}", user_id=user, competition_id="c", project_id="p",
               expected_time=expected_time, submitted_at=time.time(), node_id=-1,
               priority=priority)


def queue(spool, job, online=None):
    staged = spool.stage(job, b"print(1)\n", job_config(job.user_id, job.expected_time).encode())
    return spool.enqueue(job, staged, set(spool.node_ids) if online is None else online,
                         max_pending=10 ** 6)


def run_all(spool, node=0):
    """Claim and finish jobs on ``node`` until none is left; the ids in claim order."""
    order = []
    while (job := spool.claim(node)) is not None:
        order.append(job.id)
        spool.finish(job, Outcome("completed", 0))
    return order


def open_spool(path, nodes=1):
    spool = Spool(path, range(nodes))
    spool.open()
    return spool


def test_users_take_turns_each_oldest_first(tmp_path):
    spool = open_spool(tmp_path / "spool")
    a = [make_job("alice") for _ in range(4)]
    b = [make_job("bob") for _ in range(2)]
    c = [make_job("carol")]
    for job in a + b + c:
        queue(spool, job)
    # Nobody served yet: the oldest waiting job's user goes first, then the others
    # in the order of their oldest jobs; each round gives every waiting user one job.
    expected = [a[0], b[0], c[0], a[1], b[1], a[2], a[3]]
    assert [spool.queue_position(j)[0] for j in expected] == list(range(7))
    assert run_all(spool) == [j.id for j in expected]
    spool.close()


def test_higher_priority_first_then_turns_within_a_priority(tmp_path):
    spool = open_spool(tmp_path / "spool")
    low = make_job("alice", priority=-1)
    a = [make_job("alice") for _ in range(2)]
    urgent = make_job("admin", priority=5)
    b = make_job("bob")
    for job in (low, *a, urgent, b):
        queue(spool, job)
    assert run_all(spool) == [urgent.id, a[0].id, b.id, a[1].id, low.id]
    spool.close()


def test_estimated_start_adds_the_expected_times_ahead(tmp_path):
    spool = open_spool(tmp_path / "spool")
    jobs = [make_job("alice", expected_time=t) for t in (100, 20, 30)]
    for job in jobs:
        queue(spool, job)
    now = time.time()
    starts = [spool.queue_position(j)[1] - now for j in jobs]
    assert abs(starts[0]) < 5 and abs(starts[1] - 100) < 5 and abs(starts[2] - 120) < 5
    running = spool.claim(0)
    assert running.id == jobs[0].id and spool.queue_position(running) == (None, None)
    # The running job's rest counts: about 100 s still to go before the next one.
    assert abs(spool.queue_position(jobs[1])[1] - time.time() - 100) < 5
    spool.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jobs=st.lists(st.tuples(st.sampled_from(["ann", "bo", "cy", "di"]), st.sampled_from([-1, 0, 0, 0, 2])),
                     min_size=1, max_size=14),
       already_run=st.integers(0, 5))
def test_queue_position_is_the_order_jobs_really_start(tmp_path_factory, jobs, already_run):
    """Whatever the mix of users, priorities and earlier turns, the positions status
    reports are exactly the order in which one node then starts the jobs."""
    spool = open_spool(tmp_path_factory.mktemp("spool") / "spool")
    made = [make_job(user, priority) for user, priority in jobs]
    for job in made:
        queue(spool, job)
    for _ in range(already_run):  # some turns taken, so users start out uneven
        if (job := spool.claim(0)) is not None:
            spool.finish(job, Outcome("completed", 0))
    waiting = [j for j in made if j.status == "pending"]
    predicted = sorted(waiting, key=lambda j: spool.queue_position(j)[0])
    assert sorted(spool.queue_position(j)[0] for j in waiting) == list(range(len(waiting)))
    assert run_all(spool) == [j.id for j in predicted]
    spool.close()


def test_an_idle_node_takes_the_job_whose_turn_it_is_from_a_busy_node(tmp_path):
    """Node 1's own queue holds alice's jobs; bob waits on busy node 0.  Bob's turn
    comes first, so idle node 1 takes his job before its own."""
    spool = open_spool(tmp_path / "spool", nodes=2)
    blocker = make_job("alice")
    queue(spool, blocker, online={0})
    assert spool.claim(0).id == blocker.id
    bobs = make_job("bob")
    queue(spool, bobs, online={0})
    alices = [make_job("alice") for _ in range(2)]
    for job in alices:
        queue(spool, job, online={1})
    assert bobs.node_id == 0 and {j.node_id for j in alices} == {1}
    taken = spool.claim(1)
    assert taken.id == bobs.id and taken.node_id == 1
    spool.close()


def test_a_drained_node_starts_nothing_and_others_take_its_queue(tmp_path):
    spool = open_spool(tmp_path / "spool", nodes=2)
    busy = make_job()
    queue(spool, busy, online={0})
    spool.claim(0)
    job = make_job()
    queue(spool, job, online={1})
    spool.set_drained(1, True)
    assert spool.claim(1) is None
    assert (tmp_path / "spool" / "nodes" / "1" / "drained").exists()
    # New work avoids the drained node while another is open.
    later = make_job()
    queue(spool, later)
    assert later.node_id == 0
    spool.finish(spool.running_on(0)[0], Outcome("completed", 0))
    # Node 0 is free: it takes what waits on drained node 1, oldest first.
    assert run_all(spool, 0) == [job.id, later.id]
    spool.close()
    again = open_spool(tmp_path / "spool", nodes=2)
    assert [n for n in again.node_ids if again.is_drained(n)] == [1]
    again.set_drained(1, False)
    again.close()
    assert not any(map(open_spool(tmp_path / "spool", nodes=2).is_drained, (0, 1)))


def test_fair_share_over_http_on_one_node(make_server, tmp_path):
    """A holds the only node and queues 3 more; B then queues 2: B's jobs start
    before A's second and third, and status foretold that order."""
    server = make_server(nodes=1)
    gate = tmp_path / "gate"
    hold = (f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
            "    time.sleep(0.02)\n")
    first = server.submit_ok(hold, user="alice")
    server.wait(first["job_id"], ("running",))
    a = [server.submit_ok("print('a')\n", user="alice", expected_time=10) for _ in range(3)]
    b = [server.submit_ok("print('b')\n", user="bob", expected_time=10) for _ in range(2)]
    order = [b[0], a[0], b[1], a[1], a[2]]
    statuses = [server.status(s["job_id"], user=s_user)
                for s, s_user in zip(order, ["bob", "alice", "bob", "alice", "alice"])]
    assert [s["queue_position"] for s in statuses] == [0, 1, 2, 3, 4]
    starts = [s["estimated_start"] for s in statuses]
    assert starts == sorted(starts) and all(s.endswith("Z") for s in starts)
    gate.write_text("go")
    done = [server.wait(s["job_id"], user=u) for s, u in
            zip(order, ["bob", "alice", "bob", "alice", "alice"])]
    assert all(d["status"] == "completed" for d in done)
    started = [d["started_at"] for d in done]
    assert started == sorted(started), done
