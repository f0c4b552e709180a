"""Projects in, files back (issue 23) away from the server: on SSH nodes reached through
the loopback jump host, on the Slurm node kind, and across a kill -9 of the server
while a job's files are being brought back.  Real sshd, real Slurm, real HTTP."""
import random
import signal
import time

import pytest
import requests

from conftest import FINAL, kill_processes_under, wait_for
from sshcluster import Cluster, open_to_nodes
from test_projects import (MiB, OUTPUT_FINAL, PKG, check_files, download, listing, sha,
                           submit_project_ok, tar_of, vm, wait_outputs)
from test_slurm import slurm, slurm_server, ssh  # noqa: F401  (fixtures)
from test_ssh import wait_nodes

BIG = 4 * MiB
#: A project's entrypoint: its package and data file from the unpacked folder, and
#: files left in $GPUQUEUE_OUTPUT_DIR, a few MB among them; END ends it so.
REMOTE_MAIN = b"""import hashlib, os, random, sys
sys.dont_write_bytecode = True
import pkg
print(pkg.shout(open(os.path.join("data", "x.txt")).read()))
out = os.environ["GPUQUEUE_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "nested"))
with open(os.path.join(out, "small.txt"), "w") as f:
    f.write("small\\n")
with open(os.path.join(out, "nested", "n.bin"), "wb") as f:
    f.write(bytes(range(256)) * 4)
data = random.Random(11).randbytes(%d)
with open(os.path.join(out, "big.bin"), "wb") as f:
    f.write(data)
print("big", hashlib.sha256(data).hexdigest(), flush=True)
sys.exit(int(os.environ.get("END", "0")))
""" % BIG


def project():
    return tar_of([*PKG.items(), ("train.py", REMOTE_MAIN)])


def expected_files():
    return {"small.txt": b"small\n", "nested/n.bin": bytes(range(256)) * 4,
            "big.bin": random.Random(11).randbytes(BIG)}


def check_remote_job(server, job_id, exit_code=0, timeout=120):
    st = wait_outputs(server, job_id, timeout=timeout)
    assert st["exit_code"] == exit_code, (st, server.results(job_id))
    assert st["status"] == ("completed" if exit_code == 0 else "failed"), st
    assert st["outputs"] == "complete", st
    files = expected_files()
    assert server.results(job_id)["stdout"] == f"HELLO PROJECT!\nbig {sha(files['big.bin'])}\n"
    out = check_files(server, job_id, files)
    assert out["state"] == "complete" and out["truncated"] is False and out["skipped"] == []
    return st


# -- SSH nodes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    c = Cluster(root, n=2).start()
    yield c
    c.stop()
    kill_processes_under(root)


@pytest.fixture
def ssh_server(make_server, cluster, tmp_path):
    open_to_nodes(tmp_path)

    def make(**settings):
        cfg = cluster.config(**settings)
        server = make_server(**cfg)
        wait_nodes(server, "online", [n["id"] for n in cfg["nodes"]])
        return server
    return make


def test_a_project_runs_on_ssh_nodes_and_its_files_come_back(ssh_server, cluster):
    server = ssh_server()
    ok = submit_project_ok(server, project(), entrypoint="train.py", expected_time=60)
    bad = submit_project_ok(server, project(), entrypoint="train.py", expected_time=60,
                            env={"END": "3"})
    assert sorted((ok["node_id"], bad["node_id"])) == [0, 1]  # one on each node
    check_remote_job(server, ok["job_id"])
    check_remote_job(server, bad["job_id"], exit_code=3)
    # A download resumed part way, from the server's copy.
    tail = BIG - 1000
    assert download(server, ok["job_id"], "big.bin", headers={"Range": f"bytes={tail}-"}) == \
        (206, 1000, sha(expected_files()["big.bin"][tail:]))
    # Brought back first, then the job's folder on the node is removed.
    for sub in (ok, bad):
        folder = cluster.root / "work" / f"node{sub['node_id']}" / sub["job_id"]
        wait_for(lambda: not folder.exists(), f"{folder} to be removed", timeout=60)
        check_files(server, sub["job_id"], expected_files())


def test_a_range_of_a_running_jobs_big_file_on_an_ssh_node_holds_little(ssh_server, tmp_path):
    """A file of a running job is read over the node's link as it is asked for, a
    window ahead: a Range far into a gigabyte checkpoint, or one byte of it, never
    makes the server fetch and hold the bytes before it, or all of it."""
    server = ssh_server()
    written, gate = tmp_path / "written", tmp_path / "gate"
    job_id = server.submit_ok(
        "import os, time\npath = os.path.join(os.environ['GPUQUEUE_OUTPUT_DIR'], 'big.bin')\n"
        "with open(path, 'wb') as f:\n    f.truncate(1 << 30)\n    f.seek((1 << 30) - 5)\n"
        f"    f.write(b'tail!')\nopen({str(written)!r}, 'w').close()\n"
        f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\nos.remove(path)\n",
        expected_time=120)["job_id"]
    wait_for(written.exists, "the job's gigabyte")
    rss_before = vm(server.proc.pid, "VmRSS")
    token = {"Authorization": f"Bearer {server.token()}"}
    url = f"{server.url}/api/outputs/{job_id}/big.bin"
    r = requests.get(url, headers={**token, "Range": f"bytes={(1 << 30) - 5}-"}, timeout=60)
    assert (r.status_code, r.content) == (206, b"tail!"), r.text[:300]
    r = requests.get(url, headers={**token, "Range": "bytes=0-0"}, timeout=60)
    assert (r.status_code, r.content) == (206, b"\0"), r.text[:300]
    assert vm(server.proc.pid, "VmHWM") - rss_before < 200 * MiB
    gate.touch()
    assert server.wait(job_id, timeout=120)["status"] == "completed"


# -- the Slurm node kind -----------------------------------------------------------------


#: A job that leaves files whose names are not UTF-8 (any bytes but '/' make a Linux
#: name), a folder of them among them, beside one ordinary file.
UNNAMED = ("import os\nout = os.fsencode(os.environ['GPUQUEUE_OUTPUT_DIR'])\n"
           "open(os.path.join(out, b'caf\\xe9.txt'), 'wb').write(b'x')\n"
           "os.mkdir(os.path.join(out, b'd\\xff'))\n"
           "open(os.path.join(out, b'd\\xff', b'in.txt'), 'wb').write(b'y')\n"
           "open(os.path.join(out, b'ok.txt'), 'wb').write(b'ok')\n")


def check_unnamed(server, job_id, folder):
    """Each name that is not UTF-8 is listed as skipped, escaped, and left out; the rest
    comes back; the job's folder on its node still goes."""
    st = wait_outputs(server, job_id, timeout=90)
    assert (st["status"], st["outputs"]) == ("completed", "complete"), \
        (st, listing(server, job_id))
    out = check_files(server, job_id, {"ok.txt": b"ok"})
    reason = "a name that is not UTF-8 text, which no listing or URL can carry"
    assert out["skipped"] == [{"path": "caf\\xe9.txt", "reason": reason},
                              {"path": "d\\xff", "reason": reason}], out
    wait_for(lambda: not folder.exists(), f"{folder} to be removed", timeout=60)


def test_names_that_are_not_utf8_are_skipped_on_ssh_nodes(ssh_server, cluster):
    server = ssh_server()
    sub = server.submit_ok(UNNAMED, expected_time=30)
    check_unnamed(server, sub["job_id"],
                  cluster.root / "work" / f"node{sub['node_id']}" / sub["job_id"])


def test_names_that_are_not_utf8_are_skipped_on_local_nodes(make_server):
    server = make_server(nodes=1)
    sub = server.submit_ok(UNNAMED, expected_time=30)
    check_unnamed(server, sub["job_id"],
                  server.dir / "spool" / "nodes" / "0" / "work" / sub["job_id"])


def test_a_project_runs_in_slurm_and_its_files_come_back(slurm_server):  # noqa: F811
    server = slurm_server()
    sub = submit_project_ok(server, project(), entrypoint="train.py", expected_time=60)
    st = check_remote_job(server, sub["job_id"], timeout=180)
    assert st["slurm_state"] == "COMPLETED", st


def test_names_that_are_not_utf8_are_skipped_in_slurm(slurm_server, tmp_path):  # noqa: F811
    server = slurm_server()
    sub = server.submit_ok(UNNAMED, expected_time=30)
    check_unnamed(server, sub["job_id"], tmp_path / "slurm-work" / sub["job_id"])


# -- kill -9 while the files come back -----------------------------------------------------


def test_kill_9_while_the_files_come_back(make_server, tmp_path):
    server = make_server(nodes=1)
    runs = tmp_path / "runs"
    size = 50 * MiB
    code = ("import hashlib, os, random\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\n"
            f"data = random.Random(99).randbytes({size})\n"
            "with open(os.path.join(out, 'big.bin'), 'wb') as f:\n    f.write(data)\n"
            "print('big', hashlib.sha256(data).hexdigest())\n"
            f"open({str(runs)!r}, 'a').write(os.environ['GPUQUEUE_JOB_ID'] + '\\n')\n")
    sub = server.submit_ok(code, expected_time=60)
    job_id = sub["job_id"]
    # Poll fast, to catch it while its files are being brought back; else just after.
    end = time.monotonic() + 60
    while True:
        st = server.status(job_id)
        if st["outputs"] == "collecting" or st["status"] in FINAL:
            break
        assert time.monotonic() < end, st
        time.sleep(0.005)
    print("killed with the job", st["status"], "and its files", st["outputs"])
    server.kill(signal.SIGKILL)
    server.start()

    st = wait_outputs(server, job_id)
    assert st["status"] == "completed", st
    jobs = server.get("/api/jobs?limit=1000", server.token("root", admin=True)).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id]  # final, and listed exactly once
    assert runs.read_text() == job_id + "\n"  # ran once, not again after the restart
    want = (size, server.results(job_id)["stdout"].split()[1])
    assert want[1] == sha(random.Random(99).randbytes(size))
    out = listing(server, job_id)
    assert out["state"] == st["outputs"] and out["state"] in OUTPUT_FINAL, out
    got = {f["path"]: (f["size"], f["sha256"]) for f in out["files"]}
    if out["state"] == "complete":
        assert got == {"big.bin": want}, out
    else:  # truncated or lost: said so, and nothing listed is wrong
        assert out["truncated"] is True or out["state"] == "lost", out
        assert set(got) <= {"big.bin"} and all(v == want for v in got.values()), out
    for path, (n, digest) in got.items():
        assert download(server, job_id, path) == (200, n, digest)
