"""Faults an unattended queue must outlive: hung nodes, jobs that wreck their own
folders, a full or read-only spool disk, a busy port.  Real processes, real
signals, real filesystems (tmpfs mounts made here, as root)."""
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import agent_pids, wait_for
from test_spool import prepared_server
from test_ssh import cluster, ssh_server, wait_nodes  # noqa: F401  (the sshd cluster fixture)


def one_line_error(r):
    """A refusal of a command: exit code non-zero, one line on stderr, no traceback."""
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs filesystems under tmp_path; unmounted at the end."""
    mounted = []

    def mount(name, size="16m", options=""):
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- jobs that wreck their own folders ----------------------------------------------


def test_a_job_that_removes_its_own_spool_folder_fails_alone(make_server):
    server = make_server(nodes=1)
    wrecker = ("import os, shutil\njid = os.environ['GPUQUEUE_JOB_ID']\n"
               "shutil.rmtree(f'../../running/{jid}')\nprint('removed')\n")
    bad = server.submit_ok(wrecker)
    st = server.wait(bad["job_id"])
    assert st["status"] == "failed" and "removed while it ran" in st["error"], st
    assert server.results(bad["job_id"])["stdout"] == "removed\n"
    good = server.submit_ok("print('next')\n")
    assert server.wait(good["job_id"])["status"] == "completed"
    assert server.results(good["job_id"])["stdout"] == "next\n"


def test_a_job_that_removes_its_work_folder_fails_alone(make_server):
    server = make_server(nodes=1)
    bad = server.submit_ok("import os, shutil\nshutil.rmtree(os.getcwd())\n")
    st = server.wait(bad["job_id"])
    assert st["status"] == "failed" and "without a result" in st["error"], st
    good = server.submit_ok("print('next')\n")
    assert server.wait(good["job_id"])["status"] == "completed"


# -- broken folders at start-up -----------------------------------------------------


def test_copies_and_strays_are_quarantined_and_the_rest_is_served(make_server):
    server, job, _ = prepared_server(make_server, "print('the real one')\n", claim=False)
    spool = server.dir / "spool"
    pending = spool / "nodes" / "0" / "pending"
    original = pending / job.id
    subprocess.run(["cp", "-a", str(original), str(pending / ("0" * 24))], check=True)
    subprocess.run(["cp", "-a", str(original), str(spool / "nodes" / "0" / "running" / job.id)],
                   check=True)
    (pending / "stray.txt").write_text("not a job\n")
    server.start()
    reasons = sorted(p.read_text() for p in (spool / "corrupt").glob("*.REASON"))
    assert len(reasons) == 3, reasons
    assert any("names job" in r for r in reasons)          # a copy under another name
    assert any("second copy" in r for r in reasons)        # the same id twice
    assert any("not a job folder" in r for r in reasons)   # a stray file
    st = server.wait(job.id)
    assert st["status"] == "completed" and server.results(job.id)["stdout"] == "the real one\n"
    nodes = server.get("/api/nodes").json()["nodes"]
    assert nodes[0]["queued_jobs"] == 0 and nodes[0]["completed"] == 1


# -- start-up errors ----------------------------------------------------------------


def test_a_read_only_spool_is_one_line(make_server, tmpfs):
    ro = tmpfs("ro", options="ro")
    server = make_server(nodes=1, start=False, spool=str(ro / "spool"))
    line = one_line_error(server.cli("serve", check=False))
    assert "cannot use the spool" in line and str(ro / "spool") in line
    assert not (ro / "spool").exists()


def test_a_busy_port_is_one_line(make_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = make_server(nodes=1, start=False, port=port)
        line = one_line_error(server.cli("serve", check=False))
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_an_unwritable_tokens_file_is_one_line(make_server, tmpfs):
    ro = tmpfs("ro", options="ro")
    server = make_server(nodes=1, start=False, tokens=str(ro / "tokens.yaml"))
    line = one_line_error(server.cli("tokens", "create", "alice", check=False))
    assert str(ro) in line


# -- a full spool disk --------------------------------------------------------------


def fill(path):
    """Write a file at ``path`` until the disk is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            os.fsync(f.fileno())
        except OSError:
            pass


def test_a_full_spool_disk_degrades_and_recovers_by_itself(make_server, tmpfs, tmp_path):
    disk = tmpfs("disk", size="24m")
    # The node's workdir is elsewhere: only the spool's disk fills up here.
    server = make_server(nodes=[{"id": 0, "host": "local", "workdir": str(tmp_path / "work")}],
                         spool=str(disk / "spool"), min_free_bytes=4 * 1024 * 1024,
                         output_limit_bytes=1024 * 1024)
    # A job writing far more than its limit cannot fill the disk: the cap is applied
    # on the node as the output is written.
    flood = server.submit_ok("import sys\nfor i in range(400000): print('x' * 70, i)\n",
                             expected_time=60)
    assert server.wait(flood["job_id"], timeout=120)["status"] == "completed"
    out = server.results(flood["job_id"])["stdout"]
    assert len(out) < 1024 * 1024 + 300 and "output truncated" in out and out.endswith("399999\n")

    # A running job, then submits until the disk is too full to take more.
    marker, gate = tmp_path / "ran", tmp_path / "end-now"
    running = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                               f"    time.sleep(0.05)\nopen({str(marker)!r}, 'a').write('A')\n"
                               "print('A done')\n", expected_time=60)
    server.wait(running["job_id"], ("running",))
    padding = "#" * (512 * 1024) + "\n"
    accepted, refused = [], None
    for i in range(100):
        r = server.submit(f"{padding}print({i})\n", expected_time=5)
        if r.status_code == 507:
            refused = r
            break
        assert r.status_code == 201, r.text
        accepted.append(r.json()["job_id"])
    assert accepted and refused is not None and "disk" in refused.json()["error"]
    fill(disk / "junk")                     # and now not a byte more
    gate.touch()                            # the job ends only on the full disk
    wait_for(lambda: marker.exists(), what="the running job to end on its node")
    time.sleep(1)
    assert server.status(running["job_id"])["status"] == "running"  # not recorded yet, not lost

    server.kill()                           # a restart on the full disk
    server.start()
    assert server.submit("print(1)\n").status_code == 507
    assert server.status(running["job_id"])["status"] == "running"

    (disk / "junk").unlink()                # space comes back: everything goes on
    st = server.wait(running["job_id"], timeout=60)
    assert st["status"] == "completed" and server.results(running["job_id"])["stdout"] == "A done\n"
    for job_id in accepted:
        assert server.wait(job_id, timeout=120)["status"] == "completed"
    assert marker.read_text() == "A"


def files_waiting_for_room(make_server, tmpfs, tmp_path):
    """A server whose spool is on a small disk, its node's workdir elsewhere (the files
    are copied into the spool, not moved), and a job that left an 8 MiB checkpoint
    when the disk had room for its records, not for the checkpoint: (server, job id,
    disk), once a try has found no room."""
    disk = tmpfs("disk", size="24m")
    server = make_server(nodes=[{"id": 0, "host": "local", "workdir": str(tmp_path / "work")}],
                         spool=str(disk / "spool"), min_free_bytes=4 * 1024 * 1024)
    gate = tmp_path / "end-now"
    job_id = server.submit_ok(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n"
        "open(os.path.join(os.environ['GPUQUEUE_OUTPUT_DIR'], 'ckpt.bin'), 'wb')"
        ".write(bytes(range(256)) * 32768)\n", expected_time=60)["job_id"]
    server.wait(job_id, ("running",))
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "ballast", "wb") as f:  # room for records, none for 8 MiB past the 4
        f.write(bytes(free - 6 * 1024 * 1024))
    gate.touch()
    wait_for(lambda: "no room for its files yet" in server.log(), "a try that found no room")
    return server, job_id, disk


def test_a_jobs_files_wait_for_room_and_come_back_once_the_disk_heals(make_server, tmpfs,
                                                                     tmp_path):
    """Files that find no room in the spool when their job ends are tried again while
    the disk may heal (unreachable_grace), not marked lost at once: once room comes
    back they come back whole."""
    server, job_id, disk = files_waiting_for_room(make_server, tmpfs, tmp_path)
    assert server.status(job_id)["status"] == "completed"
    assert server.status(job_id)["outputs"] == "collecting"
    (disk / "ballast").unlink()
    st = wait_for(lambda: (st := server.status(job_id))["outputs"] != "collecting" and st,
                  "the files to come back", timeout=90)
    assert st["outputs"] == "complete", st
    r = server.get(f"/api/outputs/{job_id}/ckpt.bin", server.token())
    assert r.status_code == 200 and r.content == bytes(range(256)) * 32768


def test_files_moved_in_whole_wait_for_room_for_their_listing_past_the_grace(
        make_server, tmpfs):
    """A local node's files are moved into the spool, not copied: when their listing
    finds no room they are there all the same, and nothing of them is left on the
    node.  They are never marked lost (as "left on the node") while they wait, however
    long the disk stays full, and once it heals they are listed whole."""
    disk = tmpfs("disk", size="24m")
    server = make_server(nodes=1, spool=str(disk / "spool"), min_free_bytes=0,
                         unreachable_grace=1)
    gate = disk / "end-now"
    # 900 files: a listing of about 100 KB, where a lost one takes a few hundred bytes.
    job_id = server.submit_ok(
        "import os, time\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\nfor i in range(900):\n"
        "    open(os.path.join(out, 'f%04d' % i), 'w').write(str(i))\n"
        f"open({str(disk / 'written')!r}, 'w').close()\n"
        f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n",
        expected_time=60)["job_id"]
    wait_for(lambda: (disk / "written").exists(), "the job's files")
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "ballast", "wb") as f:  # room for the job's records, not its listing
        f.write(bytes(free - 48 * 1024))
    gate.touch()
    wait_for(lambda: server.status(job_id)["status"] == "completed", "the job's end")
    st = wait_for(lambda: (server.log().count("no room for its files yet") >= 3
                           or server.status(job_id)["outputs"] != "collecting")
                  and server.status(job_id), "tries past the grace", timeout=60)
    lst = server.get(f"/api/outputs/{job_id}", server.token()).json()
    assert st["outputs"] == "collecting", (lst["state"], lst["error"])
    (disk / "ballast").unlink()
    st = wait_for(lambda: (st := server.status(job_id))["outputs"] != "collecting" and st,
                  "the listing", timeout=90)
    assert st["outputs"] == "complete", st
    r = server.get(f"/api/outputs/{job_id}", server.token())
    assert len(r.json()["files"]) == 900, r.text
    r = server.get(f"/api/outputs/{job_id}/f0899", server.token())
    assert r.status_code == 200 and r.content == b"899"


def test_a_jobs_files_whose_folder_went_from_the_node_meanwhile_are_lost_not_none(
        make_server, tmpfs, tmp_path):
    """A job's folder that goes from its node while its files wait (removed by hand,
    a workdir a reboot cleared) takes its files with it: they are lost, and the
    listing says why, never "complete" with no files as if the job had made none."""
    server, job_id, disk = files_waiting_for_room(make_server, tmpfs, tmp_path)
    subprocess.run(["rm", "-rf", str(tmp_path / "work" / job_id)], check=True)
    (disk / "ballast").unlink()
    st = wait_for(lambda: (st := server.status(job_id))["outputs"] != "collecting" and st,
                  "the next try", timeout=90)
    assert st["status"] == "completed" and st["outputs"] == "lost", st
    r = server.get(f"/api/outputs/{job_id}", server.token())
    assert r.status_code == 200, r.text
    assert r.json()["files"] == [] and "folder is gone from node 0" in r.json()["error"], r.text


def test_a_restart_on_a_full_disk_without_the_index_of_done_starts(make_server, tmpfs, tmp_path):
    """done.index is derived: a full disk removes it when a line cannot be added.  A
    restart with no room to write it again must still start, from the jobs' own
    records, and make it at a later start that has room."""
    disk = tmpfs("disk", size="16m")
    server = make_server(nodes=[{"id": 0, "host": "local", "workdir": str(tmp_path / "work")}],
                         spool=str(disk / "spool"), min_free_bytes=0)
    job_id = server.submit_ok("print('kept')\n")["job_id"]
    assert server.wait(job_id)["status"] == "completed"
    server.kill()
    index = disk / "spool" / "done.index"
    index.unlink()
    fill(disk / "junk")
    server.start()
    st = server.status(job_id)
    assert st["status"] == "completed" and server.results(job_id)["stdout"] == "kept\n", st
    assert not index.exists()
    server.kill()
    (disk / "junk").unlink()
    server.start()
    assert server.status(job_id)["status"] == "completed"
    assert index.read_text().split()[:2] == ["+", job_id]



def test_a_cancel_on_a_full_disk_is_a_507_and_changes_nothing(make_server, tmpfs, tmp_path):
    """Cancelling a queued job writes its record: with no room for it the answer says
    so (507, as a submit's), the job stays queued, and the same cancel with room again
    goes through."""
    disk = tmpfs("disk", size="16m")
    server = make_server(nodes=[{"id": 0, "host": "local", "workdir": str(tmp_path / "work")}],
                         spool=str(disk / "spool"), min_free_bytes=0)
    gate = tmp_path / "gate"
    first = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                             "    time.sleep(0.05)\n", expected_time=600)["job_id"]
    server.wait(first, ("running",))
    queued = server.submit_ok("print('never')\n", expected_time=600)["job_id"]
    fill(disk / "junk")
    r = server.post(f"/api/cancel/{queued}", server.token())
    assert r.status_code == 507 and "disk" in r.json()["error"], r.text
    assert server.status(queued)["status"] == "pending"
    (disk / "junk").unlink()
    r = server.post(f"/api/cancel/{queued}", server.token())
    assert r.status_code == 200, r.text
    assert server.wait(queued)["status"] == "cancelled"
    gate.touch()
    assert server.wait(first)["status"] == "completed"

# -- hung nodes ------------------------------------------------------------------------


NODE_TIMEOUT = 4


def test_a_silent_idle_node_goes_offline_and_comes_back(ssh_server, cluster):
    server = ssh_server(node_count=2, node_timeout=NODE_TIMEOUT)
    node = cluster.nodes[1]
    node.signal_all(signal.SIGSTOP)
    try:
        began = time.monotonic()
        nodes = wait_nodes(server, "offline", [1], timeout=30)
        assert time.monotonic() - began < 30 and nodes[1]["error"], nodes[1]
        subs = [server.submit_ok("print('ok')\n", expected_time=5) for _ in range(3)]
        for s in subs:
            st = server.wait(s["job_id"], timeout=60)
            assert st["status"] == "completed" and st["node_id"] == 0, st
    finally:
        node.signal_all(signal.SIGCONT)
    wait_nodes(server, "online", [0, 1], timeout=60)


def test_a_node_that_hangs_mid_job_keeps_the_job_and_sheds_its_queue(ssh_server, cluster, tmp_path):
    server = ssh_server(node_count=2, node_timeout=NODE_TIMEOUT)
    marker = tmp_path / "runs"
    code = (f"import time\nopen({str(marker)!r}, 'a').write('x')\ntime.sleep(3)\n"
            "print('finished')\n")
    first = server.submit_ok(code, expected_time=30)
    assert first["node_id"] == 0
    server.wait(first["job_id"], ("running",))
    wait_for(lambda: marker.exists(), what="the job to start")
    node = cluster.nodes[0]
    node.signal_all(signal.SIGSTOP)
    try:
        # A second user's job placed behind the first on node 0 moves on once node 0
        # is seen to be silent.
        blocker = server.submit_ok("import time\ntime.sleep(1)\n", expected_time=1000)
        queued = server.submit_ok("print('elsewhere')\n", expected_time=5)
        wait_nodes(server, "offline", [0], timeout=30)
        st = server.wait(queued["job_id"], timeout=60)
        assert st["status"] == "completed" and st["node_id"] == 1, st
        assert server.wait(blocker["job_id"], timeout=60)["status"] == "completed"
        assert server.status(first["job_id"])["status"] == "running"
    finally:
        node.signal_all(signal.SIGCONT)
    st = server.wait(first["job_id"], timeout=90)
    assert st["status"] == "completed" and server.results(first["job_id"])["stdout"] == "finished\n"
    assert marker.read_text() == "x"          # it ran once, and was never started again
    wait_nodes(server, "online", [0, 1], timeout=60)


def test_a_start_the_node_never_confirmed_runs_once_after_its_lease(ssh_server, cluster, tmp_path):
    server = ssh_server(node_count=2, node_timeout=NODE_TIMEOUT)
    workdir = cluster.root / "work" / cluster.nodes[0].name
    stuck = wait_for(lambda: agent_pids(workdir), what="node 0's agent")
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)     # its sshd still answers: the job is sent, never confirmed
    marker = tmp_path / "runs"
    try:
        sub = server.submit_ok(f"import os\nopen({str(marker)!r}, 'a').write('x')\n"
                               "print(os.environ['SSH_CONNECTION'].split()[2])\n", expected_time=5)
        assert sub["node_id"] == 0
        st = server.wait(sub["job_id"], timeout=90)
        assert st["status"] == "completed", st
    finally:
        for pid in stuck:
            os.kill(pid, signal.SIGCONT)  # it reads the start now, past its lease
    time.sleep(2)  # time for the old agent to act on the start it held
    assert marker.read_text() == "x", "the job started twice"


def test_an_agent_that_ends_is_logged_with_its_words_and_its_job_followed_again(make_server, tmp_path):
    server = make_server(nodes=1)
    flag = tmp_path / "go-on"
    sub = server.submit_ok(f"import os, time\nprint('before', flush=True)\n"
                           f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.05)\n"
                           "print('after')\n", expected_time=60)
    token = server.token()
    wait_for(lambda: server.get(f"/api/logs/{sub['job_id']}", token).json()["data"] == "before\n",
             what="the job to run")
    workdir = server.dir / "spool" / "nodes" / "0" / "work"
    first = wait_for(lambda: agent_pids(workdir), what="node 0's agent")
    for pid in first:
        os.kill(pid, signal.SIGINT)  # Python dies of it with a traceback on stderr
    wait_for(lambda: "node 0: its agent ended:" in server.log(), what="the agent's end logged")
    assert "KeyboardInterrupt" in server.log().split("node 0: its agent ended:")[1]
    wait_for(lambda: set(agent_pids(workdir)) - set(first), what="a new agent")
    flag.touch()
    st = server.wait(sub["job_id"], timeout=60)
    assert st["status"] == "completed", st
    assert server.results(sub["job_id"])["stdout"] == "before\nafter\n"
