"""Drop-a-folder submission: spool/incoming/ turns a folder into a job, or says why not."""
import json
import os
import time

import pytest

from conftest import job_config


def drop(server, name, files, dot_first=True):
    """Put a folder into incoming/ the documented way: under a dot-name, then rename."""
    incoming = server.dir / "spool" / "incoming"
    tmp = incoming / f".{name}" if dot_first else incoming / name
    tmp.mkdir()
    for fname, data in files.items():
        (tmp / fname).write_bytes(data.encode() if isinstance(data, str) else data)
    if dot_first:
        os.rename(tmp, incoming / name)
    return incoming


def outcome(incoming, name, timeout=30):
    """Wait for the receipt or the reason file of a dropped folder."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in incoming.iterdir():
            if p.name.startswith(name + ".") and p.name.endswith((".receipt.json", ".reason.txt")):
                return p
        time.sleep(0.05)
    raise AssertionError(f"no outcome for {name}: {sorted(os.listdir(incoming))}")


def test_a_good_folder_becomes_a_job_with_a_receipt(server):
    token = server.token("alice")
    files = {"train.py": "print('from a folder')\n",
             "config.yaml": job_config("alice", 10, token=token)}
    incoming = drop(server, "run1", files)
    receipt = outcome(incoming, "run1")
    assert receipt.name.endswith(".receipt.json")
    r = json.loads(receipt.read_text())
    st = server.wait(r["job_id"])
    assert st["status"] == "completed" and st["user_id"] == "alice"
    assert server.results(r["job_id"])["stdout"] == "from a folder\n"
    kept = incoming / f"run1.{r['job_id']}.accepted"
    assert sorted(os.listdir(kept)) == ["config.yaml", "train.py"]  # nothing deleted
    assert not (incoming / "run1").exists()


@pytest.mark.parametrize("case, files, reason", [
    ("bad-yaml", {"a.py": "print(1)\n", "config.yaml": "user_id: [\n"}, "not valid YAML"),
    ("bad-token", {"a.py": "print(1)\n", "config.yaml": job_config("alice", 5, token="x" * 20)},
     "invalid token"),
    ("no-config", {"a.py": "print(1)\n"}, "exactly one .py script"),
    ("two-scripts", {"a.py": "1", "b.py": "2", "config.yaml": "x: 1"}, "exactly one .py script"),
    ("extra-file", {"a.py": "1", "config.yaml": "x: 1", "notes.txt": "hi"}, "unexpected file"),
    ("empty-code", {"a.py": "", "config.yaml": "TOKEN"}, "code is empty"),
])
def test_a_bad_folder_is_kept_aside_with_a_reason(server, case, files, reason):
    token = server.token("alice")
    files = {k: (job_config("alice", 5, token=token) if v == "TOKEN" else v) for k, v in files.items()}
    before = server.spool_files()
    incoming = drop(server, case, files)
    found = outcome(incoming, case)
    assert found.name.endswith(".reason.txt"), found
    assert reason in found.read_text()
    kept = incoming / found.name.replace(".reason.txt", ".refused")
    assert sorted(os.listdir(kept)) == sorted(files)  # untouched
    for fname, data in files.items():
        assert (kept / fname).read_text() == data
    assert server.get("/api/jobs", server.token("alice")).json()["jobs"] == []
    assert [p for p in server.spool_files() if not p.startswith("incoming")] == \
        [p for p in before if not p.startswith("incoming")]


def test_symlinks_special_files_nested_folders_and_huge_files_are_refused(make_server, tmp_path):
    server = make_server(max_upload_bytes=4096)
    token = server.token("alice")
    secret = tmp_path / "secret.py"
    secret.write_text("print('not yours')\n")
    incoming = server.dir / "spool" / "incoming"
    cfg = job_config("alice", 5, token=token)

    tmp = incoming / ".link"
    tmp.mkdir()
    (tmp / "config.yaml").write_text(cfg)
    (tmp / "a.py").symlink_to(secret)
    os.rename(tmp, incoming / "link")

    tmp = incoming / ".fifo"
    tmp.mkdir()
    (tmp / "config.yaml").write_text(cfg)
    os.mkfifo(tmp / "a.py")
    os.rename(tmp, incoming / "fifo")

    drop(server, "nested", {"a.py": "print(1)\n", "config.yaml": cfg})

    tmp = incoming / ".sub"
    tmp.mkdir()
    (tmp / "a.py").write_text("print(1)\n")
    (tmp / "config.yaml").write_text(cfg)
    (tmp / "inner").mkdir()
    os.rename(tmp, incoming / "sub")

    drop(server, "huge", {"a.py": "#" * 10000 + "\nprint(1)\n", "config.yaml": cfg})
    (incoming / "linkdir").symlink_to(tmp_path)

    expected = {"link": "symbolic link", "fifo": "not a regular file", "sub": "nested folders",
                "huge": "larger than 4096", "linkdir": "symbolic link"}
    for name, reason in expected.items():
        found = outcome(incoming, name)
        assert found.name.endswith(".reason.txt") and reason in found.read_text(), name
    assert secret.read_text() == "print('not yours')\n"
    r = json.loads(outcome(incoming, "nested").read_text())
    assert server.wait(r["job_id"])["status"] == "completed"


def test_a_folder_still_being_written_is_not_taken(server):
    token = server.token("alice")
    incoming = server.dir / "spool" / "incoming"
    folder = incoming / "slow"
    folder.mkdir()
    (folder / "a.py").write_text("print('whole')\n")
    # Keep touching it for a while, as a slow copy would; it must not be taken meanwhile.
    end = time.monotonic() + 2
    while time.monotonic() < end:
        (folder / "a.py").write_text("print('whole')\n")
        assert folder.exists()
        time.sleep(0.1)
    (folder / "config.yaml").write_text(job_config("alice", 5, token=token))
    r = json.loads(outcome(incoming, "slow").read_text())
    assert server.wait(r["job_id"])["status"] == "completed"


def test_dot_names_are_never_taken(server):
    incoming = server.dir / "spool" / "incoming"
    (incoming / ".copying").mkdir()
    (incoming / ".copying" / "a.py").write_text("print(1)\n")
    time.sleep(2)
    assert sorted(os.listdir(incoming)) == [".copying"]


def test_two_folders_at_once(server):
    token = server.token("alice")
    for name in ("one", "two"):
        drop(server, name, {f"{name}.py": f"print({name!r})\n",
                            "config.yaml": job_config("alice", 5, token=token)})
    incoming = server.dir / "spool" / "incoming"
    ids = {}
    for name in ("one", "two"):
        ids[name] = json.loads(outcome(incoming, name).read_text())["job_id"]
    assert ids["one"] != ids["two"]
    for name, job_id in ids.items():
        server.wait(job_id)
        assert server.results(job_id)["stdout"] == f"{name}\n"


def test_a_claimed_folder_without_receipt_is_queued_once_after_a_crash(make_server, tmp_path):
    server = make_server(start=False)
    token = server.token("alice")
    incoming = server.dir / "spool" / "incoming"
    incoming.mkdir(parents=True)
    job_id = "0" * 14 + "abcdef0123"
    runs = tmp_path / "runs"
    claimed = incoming / f"crashed.{job_id}.accepted"
    claimed.mkdir()
    (claimed / "a.py").write_text(f"open({str(runs)!r}, 'a').write('x')\nprint('once')\n")
    (claimed / "config.yaml").write_text(job_config("alice", 5, token=token))
    # The server's own record of its claim, written before the rename (a planted
    # .accepted without one is ignored: tests/test_round3_folders.py).
    claims = server.dir / "spool" / "claims"
    claims.mkdir()
    (claims / f"{job_id}.json").write_text(json.dumps({"name": "crashed", "job_ids": None}))
    server.start()
    receipt = outcome(incoming, "crashed")
    assert json.loads(receipt.read_text())["job_id"] == job_id
    assert server.wait(job_id)["status"] == "completed"
    # A second restart finds the receipt and queues nothing again.
    server.kill()
    server.start()
    time.sleep(1)
    assert runs.read_text() == "x"
    assert len(server.get("/api/jobs", server.token("alice", admin=True)).json()["jobs"]) == 1


def test_a_dropped_array_gets_one_receipt_and_each_job_its_results(server):
    token = server.token("alice")
    files = {"a.py": "import os\nprint('index', os.environ['GPUQUEUE_ARRAY_INDEX'])\n",
             "config.yaml": job_config("alice", 10, token=token, array=3)}
    incoming = drop(server, "sweep", files)
    receipt = outcome(incoming, "sweep")
    assert receipt.name.endswith(".receipt.json"), receipt.read_text()
    r = json.loads(receipt.read_text())
    assert len(r["job_ids"]) == 3 and r["array_id"] in receipt.name
    for i, job_id in enumerate(r["job_ids"]):
        result = incoming / f"sweep.{job_id}.result.json"
        end = time.monotonic() + 60
        while not result.exists():
            assert time.monotonic() < end, sorted(os.listdir(incoming))
            time.sleep(0.05)
        assert json.loads(result.read_text())["status"] == "completed"
        assert (incoming / f"sweep.{job_id}.stdout").read_text() == f"index {i}\n"


def test_a_config_yaml_that_is_a_fifo_or_huge_never_jams_the_drop_folder(make_server):
    """The folder's config.yaml is read before its other files are looked at (to tell
    a project): a FIFO there is not waited on, nor a sparse terabyte read, so the
    thread that watches incoming/ (and the admin commands' control/) goes on."""
    server = make_server(nodes=1)
    cfg = job_config("alice", 5, token=server.token("alice"))
    incoming = server.dir / "spool" / "incoming"
    tmp = incoming / ".fifo"
    tmp.mkdir()
    (tmp / "a.py").write_text("print(1)\n")
    os.mkfifo(tmp / "config.yaml")
    os.rename(tmp, incoming / "fifo")
    tmp = incoming / ".sparse"
    tmp.mkdir()
    (tmp / "a.py").write_text("print(1)\n")
    with open(tmp / "config.yaml", "wb") as f:
        f.truncate(1 << 40)
    os.rename(tmp, incoming / "sparse")
    drop(server, "good", {"a.py": "print('good')\n", "config.yaml": cfg})
    for name in ("fifo", "sparse"):
        assert outcome(incoming, name).name.endswith(".reason.txt"), name
    r = json.loads(outcome(incoming, "good").read_text())
    assert server.wait(r["job_id"])["status"] == "completed"
    assert server.cli("nodes", "list").returncode == 0


def test_a_folder_whose_name_leaves_no_room_for_its_outcomes_is_refused(server):
    """NAME.<job id>.result.json must fit in a file name: a longer NAME is refused under
    its name cut short, with the reason, rather than tried again and again; one just
    short enough is taken and gets its results."""
    cfg = job_config("alice", 5, token=server.token("alice"))
    incoming = drop(server, "a" * 230, {"a.py": "print(1)\n", "config.yaml": cfg})
    found = outcome(incoming, "a" * 150)
    assert found.name.endswith(".reason.txt") and "longer than 200 bytes" in found.read_text()
    assert not (incoming / ("a" * 230)).exists()
    drop(server, "b" * 200, {"a.py": "print('long')\n", "config.yaml": cfg})
    receipt = json.loads(outcome(incoming, "b" * 200).read_text())
    assert server.wait(receipt["job_id"])["status"] == "completed"
    result = incoming / f"{'b' * 200}.{receipt['job_id']}.result.json"
    deadline = time.monotonic() + 30
    while not result.exists():
        assert time.monotonic() < deadline, sorted(os.listdir(incoming))
        time.sleep(0.05)
    assert (incoming / f"{'b' * 200}.{receipt['job_id']}.stdout").read_text() == "long\n"
