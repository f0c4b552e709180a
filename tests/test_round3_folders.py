"""Drop folders under attack and after crashes: only the server claims names, a result
that cannot be put where it is due is said so, odd names survive a crash, a crash
leaves no half-written files, and planted oddities do not stall the rest."""
import hashlib
import json
import os
import re
import signal
import time

import pytest

from conftest import job_config, wait_for

ID = r"[0-9a-f]{24}"
#: The outcome names a dropped folder NAME may have (the Incoming docstring).
DOCUMENTED = re.compile(rb"\A(?P<name>.+)\.[0-9a-f]{24}\."
                        rb"(?:accepted|receipt\.json|stdout|stderr|result\.json|outputs)\Z",
                        re.S)


def incoming_of(server):
    return server.dir / "spool" / "incoming"


def drop(server, name, files):
    """Drop a folder the documented way (under a dot-name, then renamed); ``name`` may
    be bytes, for names that are not UTF-8."""
    incoming = os.fsencode(incoming_of(server))
    name = os.fsencode(name)
    tmp = os.path.join(incoming, b"." + name)
    os.mkdir(tmp)
    for fname, data in files.items():
        with open(os.path.join(tmp, os.fsencode(fname)), "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    os.rename(tmp, os.path.join(incoming, name))


def job_files(token, code, user, expected_time=30, **extra):
    return {"job.py": code, "config.yaml": job_config(user, expected_time, token=token, **extra)}


def accepted_id(server, name, timeout=30):
    """The job id in NAME.<id>.accepted, once the server has claimed the folder."""
    incoming = os.fsencode(incoming_of(server))
    pattern = re.compile(re.escape(os.fsencode(name)) + rb"\.([0-9a-f]{24})\.accepted\Z", re.S)

    def find():
        for n in os.listdir(incoming):
            m = pattern.match(n)
            if m:
                return m.group(1).decode()
        return None
    return wait_for(find, f"{name!r} to be accepted; {sorted(os.listdir(incoming))}", timeout)


def wait_result(server, name, job_id, timeout=60):
    path = os.path.join(os.fsencode(incoming_of(server)), os.fsencode(name) + b"." +
                        job_id.encode() + b".result.json")
    wait_for(lambda: os.path.exists(path),
             f"{name!r}'s result.json; {sorted(os.listdir(incoming_of(server)))}\n"
             f"{server.log()[-3000:]}", timeout)
    # result.json is published whole (written last): it parses at once.
    with open(path, "rb") as f:
        text = f.read().decode()
    return json.loads(text), text


def all_jobs(server, token):
    jobs, cursor = [], None
    while True:
        page = server.get("/api/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else ""),
                          token).json()
        jobs += page["jobs"]
        cursor = page.get("next_cursor")
        if not cursor:
            return jobs


# -- 1. only the server makes claims ---------------------------------------------------


@pytest.mark.parametrize("restart, plant_receipt", [(False, True), (True, True), (True, False)],
                         ids=["live", "restart-with-receipt", "restart-without-receipt"])
def test_a_planted_claim_on_someone_elses_job_gets_nothing(make_server, restart, plant_receipt):
    """A name like NAME.<id>.accepted is the server's claim; planted by another user on
    bob's job id, it must neither divert bob's results nor make a job of its own."""
    server = make_server(nodes=2)
    bob, mallory = server.token("bob"), server.token("mallory")
    admin = server.token("root", admin=True)
    incoming = incoming_of(server)
    drop(server, "bobrun", job_files(bob, "import time\ntime.sleep(2)\nprint('bob')\n", "bob"))
    job_id = accepted_id(server, "bobrun")
    wait_for(lambda: (incoming / f"bobrun.{job_id}.receipt.json").exists(), "bob's receipt")

    # mallory plants claims on bob's job id (several: the order of a directory listing
    # must not decide), each holding a valid job of her own.
    plants = [f"evil{i}" for i in range(5)]
    for plant in plants:
        tmp = incoming / f".{plant}"
        tmp.mkdir()
        (tmp / "steal.py").write_text("print('mallory')\n")
        (tmp / "config.yaml").write_text(job_config("mallory", 10, token=mallory))
        os.rename(tmp, incoming / f"{plant}.{job_id}.accepted")
        if plant_receipt:
            (incoming / f"{plant}.{job_id}.receipt.json").write_text(
                json.dumps({"job_ids": [job_id]}))
    if restart:
        server.kill(signal.SIGKILL)
        server.start()

    forbidden = {f"{p}.{job_id}.{s}" for p in plants
                 for s in ("stdout", "stderr", "result.json", "outputs")}
    if not plant_receipt:  # a receipt the server wrote for a planted claim
        forbidden |= {f"{p}.{job_id}.receipt.json" for p in plants}

    def check():
        seen = forbidden & set(os.listdir(incoming))
        assert not seen, f"delivered to a planted claim: {seen}"
        return (incoming / f"bobrun.{job_id}.result.json").exists()
    wait_for(check, f"bob's results; {sorted(os.listdir(incoming))}\n{server.log()[-3000:]}", 60)
    end = time.monotonic() + 2  # a few more scans (4 a second)
    while time.monotonic() < end:
        check()
        time.sleep(0.05)

    result = json.loads((incoming / f"bobrun.{job_id}.result.json").read_text())
    assert result["job_id"] == job_id and result["status"] == "completed", result
    assert (incoming / f"bobrun.{job_id}.stdout").read_text() == "bob\n"
    jobs = all_jobs(server, admin)
    assert [j["job_id"] for j in jobs].count(job_id) == 1, jobs
    assert [j["user_id"] for j in jobs if j["job_id"] == job_id] == ["bob"]
    assert not [j for j in jobs if j["user_id"] == "mallory"], jobs
    assert server.status(job_id, user="bob")["user_id"] == "bob"
    assert server.get(f"/api/status/{job_id}", mallory).status_code == 404

    # Each planted folder is left alone, or set aside as refused with a reason.
    names = os.listdir(incoming)
    for plant in plants:
        if f"{plant}.{job_id}.accepted" in names:
            assert sorted(os.listdir(incoming / f"{plant}.{job_id}.accepted")) == \
                ["config.yaml", "steal.py"]
        else:
            refused = [n for n in names if n.startswith(plant + ".") and n.endswith(".refused")]
            reasons = [n for n in names if n.startswith(plant + ".")
                       and n.endswith(".reason.txt")]
            assert refused and reasons, (plant, sorted(names))
        others = [n for n in names if n.startswith(plant + ".") and n not in
                  (f"{plant}.{job_id}.accepted", f"{plant}.{job_id}.receipt.json")
                  and not n.endswith((".refused", ".reason.txt"))]
        assert not others, others


# -- 2. something planted where a result is due ----------------------------------------


@pytest.mark.parametrize("kind", ["directory-at-stdout", "symlink-at-stderr"])
def test_a_file_planted_where_a_result_is_due(make_server, tmp_path, kind):
    """A folder or a link where NAME.<id>.stdout/.stderr is due: result.json still comes
    and says what could not be delivered, nothing is written through the link, and
    the log does not repeat itself at every scan.  The tests run as root, so a bait
    file of the test's own stands in for /etc/passwd."""
    server = make_server(nodes=1)
    token = server.token("bob")
    incoming = incoming_of(server)
    bait = tmp_path / "passwd"
    bait.write_text("root:x:0:0:root:/root:/bin/bash\n")
    bait_digest = hashlib.sha256(bait.read_bytes()).hexdigest()
    name = "plantdir" if kind == "directory-at-stdout" else "plantlink"
    drop(server, name, job_files(token, "import sys, time\nprint('out')\n"
                                        "print('err', file=sys.stderr)\ntime.sleep(3)\n", "bob"))
    job_id = accepted_id(server, name)
    wait_for(lambda: (incoming / f"{name}.{job_id}.receipt.json").exists(), "the receipt")
    if kind == "directory-at-stdout":
        stream = "stdout"
        (incoming / f"{name}.{job_id}.stdout").mkdir()
        (incoming / f"{name}.{job_id}.stdout" / "mine.txt").write_text("keep\n")
    else:
        stream = "stderr"
        (incoming / f"{name}.{job_id}.stderr").symlink_to(bait)
    assert server.status(job_id, user="bob")["status"] not in ("completed", "failed", "cancelled")

    result, text = wait_result(server, name, job_id, timeout=30)
    assert result["job_id"] == job_id and result["status"] == "completed", result
    assert "deliver" in text and stream in text, text
    assert hashlib.sha256(bait.read_bytes()).hexdigest() == bait_digest
    time.sleep(3)  # a dozen scans more: is the same warning logged at each?
    mentions = [line for line in server.log().splitlines() if name in line]
    assert len(mentions) <= 3, "\n".join(mentions[:20])
    assert hashlib.sha256(bait.read_bytes()).hexdigest() == bait_digest


# -- 3. names with odd bytes ---------------------------------------------------------


ODD_NAMES = [b"a\nb", b"a\tb", b"x\xff", b"n" * 200]


def test_odd_names_survive_a_crash_right_after_they_are_accepted(make_server):
    """Folder names with a newline, a tab, a byte that is not UTF-8, or 200 characters
    are taken, and after a kill -9 each still gets its receipt and its result."""
    server = make_server(nodes=4)
    token = server.token("alice")
    for name in ODD_NAMES:
        drop(server, name, job_files(token, "import time\ntime.sleep(1)\nprint('ok')\n", "alice"))
    ids = {name: accepted_id(server, name) for name in ODD_NAMES}
    server.kill(signal.SIGKILL)
    server.start()
    incoming = os.fsencode(incoming_of(server))
    for name, job_id in ids.items():
        receipt = os.path.join(incoming, name + f".{job_id}.receipt.json".encode())
        wait_for(lambda: os.path.exists(receipt), f"the receipt of {name!r}", 60)
        with open(receipt, "rb") as f:
            assert json.load(f)["job_id"] == job_id
        result, _ = wait_result(server, name, job_id)
        assert result["status"] == "completed", (name, result)
        with open(os.path.join(incoming, name + f".{job_id}.stdout".encode()), "rb") as f:
            assert f.read() == b"ok\n"
    assert len(all_jobs(server, server.token("root", admin=True))) == len(ODD_NAMES)


# -- 4. no half-written file after a crash ---------------------------------------------


BIG = 20_000_000


@pytest.mark.parametrize("kill_at", ["job-finished", "first-new-name", "stdout-appears"])
def test_a_crash_during_delivery_leaves_only_documented_names(make_server, kill_at):
    """kill -9 while a 20 MB stdout may be being delivered: after the restart the result
    comes, and incoming/ holds only the documented outcome names: no temporary files."""
    server = make_server(nodes=1, output_limit_bytes=64 * 1024 * 1024)
    token = server.token("alice")
    incoming = incoming_of(server)
    drop(server, "big", job_files(token, f"import sys\nsys.stdout.write('x' * {BIG})\n", "alice"))
    job_id = accepted_id(server, "big")
    wait_for(lambda: (incoming / f"big.{job_id}.receipt.json").exists(), "the receipt")
    known = {f"big.{job_id}.accepted", f"big.{job_id}.receipt.json"}
    result = incoming / f"big.{job_id}.result.json"

    def moment():
        if result.exists():
            return True  # the moment passed: kill now all the same
        if kill_at == "job-finished":
            return server.status(job_id)["status"] in ("completed", "failed", "cancelled")
        if kill_at == "first-new-name":
            return bool(set(os.listdir(incoming)) - known)
        return (incoming / f"big.{job_id}.stdout").exists()
    end = time.monotonic() + 60
    while not moment():
        assert time.monotonic() < end, f"no {kill_at}: {sorted(os.listdir(incoming))}"
        time.sleep(0.002 if kill_at != "job-finished" else 0.02)
    server.kill(signal.SIGKILL)
    server.start()

    outcome, _ = wait_result(server, "big", job_id)
    assert outcome["status"] == "completed", outcome
    assert (incoming / f"big.{job_id}.stdout").stat().st_size == BIG
    time.sleep(1)  # a few scans: anything left behind would have been tidied by now
    odd = [n for n in os.listdir(os.fsencode(incoming))
           if not (DOCUMENTED.match(n) and DOCUMENTED.match(n)["name"] == b"big")]
    assert not odd, f"not outcome names: {odd}"


# -- 5. planted oddities do not stall the rest -----------------------------------------


def test_a_fifo_and_a_folder_of_ten_thousand_files_do_not_stall_the_others(server):
    """A FIFO (which blocks whoever opens it) and a folder of 10,000 files sit in
    incoming/; folders dropped beside them are still taken and run."""
    token = server.token("alice")
    incoming = incoming_of(server)
    os.mkfifo(incoming / "pipe")
    tmp = incoming / ".many"
    tmp.mkdir()
    for i in range(10_000):
        (tmp / f"f{i:05}.py").write_bytes(b"print(1)\n")
    (tmp / "config.yaml").write_text(job_config("alice", 5, token=token))
    os.rename(tmp, incoming / "many")
    for n in range(3):
        drop(server, f"normal{n}", job_files(token, f"print('n{n}')\n", "alice"))
    for n in range(3):
        job_id = accepted_id(server, f"normal{n}", timeout=60)
        result, _ = wait_result(server, f"normal{n}", job_id, timeout=60)
        assert result["status"] == "completed", result
        assert (incoming / f"normal{n}.{job_id}.stdout").read_text() == f"n{n}\n"
    assert server.get("/api/nodes").status_code == 200
