"""Projects in, files back (issue 23), on local nodes: a folder sent as an archive runs
with its entrypoint, what a job leaves in $GPUQUEUE_OUTPUT_DIR comes back whatever the
end, hostile archives are refused fast without a byte on the spool, and the client and
the drop folder do both ends.  A real server over real HTTP, every wait a condition."""
import contextlib
import functools
import hashlib
import io
import json
import os
import signal
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml

from conftest import (FINAL, GPUQUEUE, ROOT, Server, agent_pids, alive, job_config,
                      kill_processes_under, wait_for)

OUTPUT_FINAL = ("complete", "truncated", "lost")
MiB = 1024 * 1024


# -- archives built in memory ------------------------------------------------------------


def _entry(name, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, data


def tar_of(entries, mode="w:gz"):
    """A tar (``mode`` w, w:gz) of ``entries``: (name, bytes) pairs or (TarInfo, None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            if isinstance(name, tarfile.TarInfo):
                tf.addfile(name, io.BytesIO(data) if data else None)
            else:
                info, data = _entry(name, data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def repeated_tar_gz(header, count, data=b""):
    """A tar.gz of main.py, then ``count`` times one member (``header``'s block and
    ``data``), compressed as it is made: small, however many it holds."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    main = b"print('never')\n"
    info = tarfile.TarInfo("main.py")
    info.size = len(main)
    parts = [c.compress(info.tobuf(tarfile.USTAR_FORMAT) + main + bytes(-len(main) % 512))]
    one = header.tobuf(tarfile.USTAR_FORMAT) + data
    for _ in range(count // 1000):
        parts.append(c.compress(one * 1000))
    parts.append(c.compress(bytes(1024)))
    parts.append(c.flush())
    return b"".join(parts)


def pax_bomb_tar_gz(size=1 << 30):
    """A tar.gz whose first member is a pax header that says it holds ``size`` bytes
    (zeros, compressed as they are made), then main.py: tarfile reads such a header
    whole."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, size
    parts = [c.compress(info.tobuf(tarfile.USTAR_FORMAT))]
    zeros = bytes(MiB)
    for _ in range(size // MiB):
        parts.append(c.compress(zeros))
    main = b"print('never')\n"
    info = tarfile.TarInfo("main.py")
    info.size = len(main)
    parts.append(c.compress(info.tobuf(tarfile.USTAR_FORMAT) + main + bytes(-len(main) % 512)
                            + bytes(1024)))
    parts.append(c.flush())
    return b"".join(parts)


def the_same_folder(name="./"):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def special(name, kind, linkname=""):
    """A tar member that is not a regular file."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, None


def zip_of(entries):
    """A zip of (name, bytes) pairs, or of (ZipInfo, bytes) pairs for odd members."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on a duplicate name, on purpose here
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def zip_symlink(name, target):
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the mode bits below are read
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@functools.lru_cache(maxsize=None)
def bomb_tar_gz(size=1 << 30):
    """A tar.gz holding main.py and ``size`` bytes of zeros as big.bin, compressed as
    it is made: about 1 MB, and never the whole in memory."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    main = b"print('never')\n"
    info = tarfile.TarInfo("main.py")
    info.size = len(main)
    parts = [c.compress(info.tobuf(tarfile.PAX_FORMAT) + main + bytes(-len(main) % 512))]
    info = tarfile.TarInfo("big.bin")
    info.size = size
    parts.append(c.compress(info.tobuf(tarfile.PAX_FORMAT)))
    zeros = bytes(MiB)
    for _ in range(size // MiB):
        parts.append(c.compress(zeros))
    parts.append(c.compress(bytes(1024)))  # the two empty blocks that end a tar
    parts.append(c.flush())
    return b"".join(parts)


@functools.lru_cache(maxsize=None)
def bomb_zip(size=1 << 30):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("main.py", "print('never')\n")
        with zf.open("big.bin", "w", force_zip64=True) as f:
            zeros = bytes(MiB)
            for _ in range(size // MiB):
                f.write(zeros)
    return buf.getvalue()


# -- helpers on the server ---------------------------------------------------------------


def sha(data):
    return hashlib.sha256(data).hexdigest()


def submit_project(server, archive, user="alice", expected_time=30, **cfg):
    return server.submit(archive, config=job_config(user, expected_time, **cfg), user=user)


def submit_project_ok(server, archive, **kw):
    r = submit_project(server, archive, **kw)
    assert r.status_code == 201, r.text
    return r.json()


def wait_outputs(server, job_id, timeout=120, user="alice"):
    """Wait for the job to end and its files to be brought back; its status."""
    server.wait(job_id, FINAL, timeout=timeout, user=user)
    return wait_for(lambda: (st := server.status(job_id, user=user))["outputs"] in OUTPUT_FINAL
                    and st, f"the outputs of {job_id} to be brought back", timeout=timeout)


def listing(server, job_id, user="alice", query=""):
    r = server.get(f"/api/outputs/{job_id}{query}", server.token(user))
    assert r.status_code == 200, r.text
    return r.json()


def file_url(server, job_id, path):
    return f"{server.url}/api/outputs/{job_id}/{quote(path)}"


def download(server, job_id, path, user="alice", headers=None):
    """(status, size, sha256) of one file, streamed (a 50 MB file is never held)."""
    h = {"Authorization": f"Bearer {server.token(user)}", **(headers or {})}
    with requests.get(file_url(server, job_id, path), headers=h, stream=True, timeout=120) as r:
        digest, size = hashlib.sha256(), 0
        for chunk in r.iter_content(MiB):
            digest.update(chunk)
            size += len(chunk)
        return r.status_code, size, digest.hexdigest()


def check_files(server, job_id, expected, user="alice"):
    """The listing holds exactly ``expected`` ({path: bytes or (size, sha256)}), and each
    file downloads with those bytes.  Returns the listing."""
    want = {p: (len(v), sha(v)) if isinstance(v, bytes) else tuple(v) for p, v in expected.items()}
    out = listing(server, job_id, user)
    assert out["job_id"] == job_id
    got = {f["path"]: (f["size"], f["sha256"]) for f in out["files"]}
    assert got == want, out
    for path, (size, digest) in want.items():
        assert download(server, job_id, path, user) == (200, size, digest), path
    return out


def spool_outside_incoming(server):
    return [p for p in server.spool_files() if not p.startswith("incoming")]


def job_count(server):
    return len(server.get("/api/jobs?limit=1000", server.token("root", admin=True)).json()["jobs"])


# -- 1. a project runs --------------------------------------------------------------------

PKG = {
    "pkg/__init__.py": b"from .util import shout\n",
    "pkg/util.py": b"def shout(s):\n    return s.strip().upper() + '!'\n",
    "data/x.txt": b"hello project\n",
}
PROJECT_MAIN = b"""import os, sys
sys.dont_write_bytecode = True
import pkg
print(pkg.shout(open(os.path.join("data", "x.txt")).read()))
out = os.environ["GPUQUEUE_OUTPUT_DIR"]
print(os.path.isabs(out), os.path.samefile(out, "outputs"), os.listdir(out))
print(sorted(set(os.listdir(".")) & {"pkg", "data", "outputs", "%s"}))
"""


@pytest.mark.parametrize("kind", ["tar.gz", "zip", "tar", "tar-dot"])
def test_a_project_runs_with_its_package_and_data(make_server, kind):
    server = make_server(nodes=2)
    script = "train.py" if kind != "zip" else "main.py"
    files = {**PKG, script: PROJECT_MAIN % script.encode()}
    cfg = {"entrypoint": "train.py"} if kind != "zip" else {}  # a zip: main.py by default
    if kind == "tar.gz":
        archive = tar_of(files.items())
    elif kind == "zip":
        archive = zip_of([("pkg/", b""), ("data/", b"")] + list(files.items()))
    elif kind == "tar":  # plain, with folder entries
        archive = tar_of([special("pkg", tarfile.DIRTYPE), special("data", tarfile.DIRTYPE)]
                         + list(files.items()), mode="w")
    else:  # what `tar czf p.tgz -C folder .` makes: ./ before every name
        archive = tar_of([special(".", tarfile.DIRTYPE)]
                         + [(f"./{k}", v) for k, v in files.items()])
    sub = submit_project_ok(server, archive, **cfg)
    st = server.wait(sub["job_id"])
    assert st["status"] == "completed", (st, server.results(sub["job_id"]))
    assert server.results(sub["job_id"])["stdout"] == \
        f"HELLO PROJECT!\nTrue True []\n{sorted(['data', 'outputs', 'pkg', script])}\n"


def test_entrypoint_mistakes_are_refused(server):
    project = tar_of([("main.py", b"print(1)\n"), *PKG.items()])
    before = spool_outside_incoming(server)
    r = submit_project(server, project, entrypoint="train.py")
    assert r.status_code == 400 and "train.py" in r.json()["error"], r.text
    r = submit_project(server, zip_of([("run.py", b"print(1)\n")]))  # no main.py, none named
    assert r.status_code == 400 and "main.py" in r.json()["error"], r.text
    r = submit_project(server, project, entrypoint="../main.py")
    assert r.status_code == 400 and r.json()["error"], r.text
    r = server.submit("print(1)\n", config=job_config("alice", 30, entrypoint="main.py"))
    assert r.status_code == 400 and "entrypoint" in r.json()["error"], r.text
    assert spool_outside_incoming(server) == before
    assert job_count(server) == 0
    # The same project with a right entrypoint runs.
    sub = submit_project_ok(server, project)
    assert server.wait(sub["job_id"])["status"] == "completed"
    assert server.results(sub["job_id"])["stdout"] == "1\n"


# -- 2. files back, whatever the end -----------------------------------------------------

SMALL = {"a.txt": b"alpha\n", "nested/deeper/b.bin": bytes(range(256)) * 40, "nested/empty": b""}
BIG_SIZE = 50 * MiB

WRITER = """import hashlib, os, random, sys, time
out = os.environ["GPUQUEUE_OUTPUT_DIR"]
assert os.listdir(out) == [], os.listdir(out)
os.makedirs(os.path.join(out, "nested", "deeper"))
for rel, data in {small!r}.items():
    with open(os.path.join(out, rel), "wb") as f:
        f.write(data)
if {big}:
    data = random.Random(23).randbytes({big})
    with open(os.path.join(out, "big.bin"), "wb") as f:
        f.write(data)
    print("big", hashlib.sha256(data).hexdigest())
print("written", flush=True)
open({marker!r}, "w").close()
{end}
"""


def writer(marker, end="", big=0, small=SMALL):
    return WRITER.format(small=small, big=big, marker=str(marker), end=end)


def big_sha(server, job_id):
    lines = [line for line in server.results(job_id)["stdout"].splitlines() if line.startswith("big ")]
    assert len(lines) == 1, server.results(job_id)
    return lines[0].split()[1]


@pytest.mark.parametrize("end", ["completed", "exit3", "timeout", "cancelled"])
def test_files_come_back_whatever_the_end(make_server, tmp_path, end):
    server = make_server(nodes=1, timeout_multiplier=2)
    marker = tmp_path / "written"
    code, expected_time, big = {
        "completed": ("", 30, BIG_SIZE),
        "exit3": ("sys.exit(3)", 30, 0),
        "timeout": ("time.sleep(120)", 1, 0),  # killed after 2 x 1 s
        "cancelled": ("time.sleep(120)", 60, 0),
    }[end]
    sub = server.submit_ok(writer(marker, code, big), expected_time=expected_time)
    job_id = sub["job_id"]
    if end == "cancelled":
        wait_for(marker.exists, "the job to write its files", timeout=60)
        # While it runs: what is on the node so far, without digests.
        live = listing(server, job_id)
        assert live["state"] == "running"
        assert {f["path"]: (f["size"], f["sha256"]) for f in live["files"]} == \
            {p: (len(b), None) for p, b in SMALL.items()}
        assert server.status(job_id)["outputs"] is None
        r = server.post(f"/api/cancel/{job_id}", server.token())
        assert r.status_code == 200, r.text
    st = wait_outputs(server, job_id)
    want_status = {"completed": ("completed", None), "exit3": ("failed", "exit code 3"),
                   "timeout": ("failed", "timeout"), "cancelled": ("cancelled", None)}[end]
    assert (st["status"], st["error"] if end != "cancelled" else None) == want_status, st
    assert st["outputs"] == "complete", st
    assert "written\n" in server.results(job_id)["stdout"]
    expected = dict(SMALL)
    if big:
        expected["big.bin"] = (big, big_sha(server, job_id))
    out = check_files(server, job_id, expected)
    assert out["state"] == "complete" and out["truncated"] is False and out["cut"] is None
    assert out["skipped"] == [] and out["error"] is None


# -- 3. caps, links and special files ------------------------------------------------------


def test_past_the_caps_what_fits_comes_back_and_the_cut_is_told(make_server, tmp_path):
    server = make_server(nodes=1, max_output_files=3, max_output_files_bytes=10000)
    many = {f"f{i}.txt": bytes([65 + i]) * 100 for i in range(5)}
    big = {"six.bin": b"6" * 6000, "seven.bin": b"7" * 7000}
    for written, kept in ((many, 3), (big, 1)):
        code = ("import os\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\n"
                f"for rel, data in {written!r}.items():\n"
                "    open(os.path.join(out, rel), 'wb').write(data)\n")
        sub = server.submit_ok(code)
        st = wait_outputs(server, sub["job_id"])
        assert st["status"] == "completed" and st["outputs"] == "truncated", st
        out = listing(server, sub["job_id"])
        assert out["state"] == "truncated" and out["truncated"] is True, out
        files = {f["path"]: f for f in out["files"]}
        assert len(files) == kept, out
        assert len(files) <= 3 and sum(f["size"] for f in files.values()) <= 10000
        for path, f in files.items():  # what came back is whole
            assert (f["size"], f["sha256"]) == (len(written[path]), sha(written[path]))
            assert download(server, sub["job_id"], path) == (200, f["size"], f["sha256"])
        left = set(written) - set(files)
        cut = out["cut"]
        assert (cut["files"], cut["bytes"]) == (len(left), sum(len(written[p]) for p in left)), out
        for path in left:
            r = server.get(f"/api/outputs/{sub['job_id']}/{path}", server.token())
            assert r.status_code == 404 and r.json()["error"], path


def test_links_and_special_files_in_outputs_are_skipped_never_followed(make_server, tmp_path):
    server = make_server(nodes=1)
    code = ("import os\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\n"
            "open(os.path.join(out, 'ok.txt'), 'w').write('fine\\n')\n"
            "os.symlink('/etc/passwd', os.path.join(out, 'passwd'))\n"
            "os.symlink('/etc', os.path.join(out, 'etcdir'))\n"
            "os.mkfifo(os.path.join(out, 'pipe'))\n")
    sub = server.submit_ok(code)
    st = wait_outputs(server, sub["job_id"])
    assert st["status"] == "completed" and st["outputs"] in ("complete", "truncated"), st
    out = check_files(server, sub["job_id"], {"ok.txt": b"fine\n"})
    skipped = {s["path"]: s["reason"] for s in out["skipped"]}
    assert set(skipped) == {"passwd", "etcdir", "pipe"}, out
    assert all(isinstance(r, str) and r for r in skipped.values()), out
    passwd = Path("/etc/passwd").read_bytes()
    for path in ("passwd", "etcdir/passwd", "pipe"):
        r = server.get(f"/api/outputs/{sub['job_id']}/{path}", server.token())
        assert r.status_code == 404 and passwd not in r.content, (path, r.status_code)
    r = server.get(f"/api/outputs/{sub['job_id']}?archive=tar", server.token())
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
        members = [m for m in tf.getmembers() if not m.isdir()]
        assert [m.name.removeprefix("./") for m in members] == ["ok.txt"]
        assert members[0].isfile() and tf.extractfile(members[0]).read() == b"fine\n"


# -- 4. Range, the tar, and who may read ----------------------------------------------------


def test_range_resumes_a_download_and_the_tar_holds_the_listing(make_server, tmp_path):
    server = make_server(nodes=1)
    data = random_bytes(300_000, seed=7)
    small = {**SMALL, "model.bin": data}
    code = writer(tmp_path / "m") + (
        "import random\nopen(os.path.join(out, 'model.bin'), 'wb')"
        ".write(random.Random(7).randbytes(300000))\n")
    sub = server.submit_ok(code)
    st = wait_outputs(server, sub["job_id"])
    assert st["status"] == "completed" and st["outputs"] == "complete", st
    out = check_files(server, sub["job_id"], small)
    job_id, auth = sub["job_id"], {"Authorization": f"Bearer {server.token()}"}
    for start in (0, 1, 123_457, len(data) - 1):
        r = requests.get(file_url(server, job_id, "model.bin"), timeout=60,
                         headers={**auth, "Range": f"bytes={start}-"})
        assert r.status_code == 206, (start, r.status_code)
        assert r.headers["Content-Range"] == f"bytes {start}-{len(data) - 1}/{len(data)}"
        assert r.content == data[start:]
    # A download cut short, then resumed where it stopped.
    with requests.get(file_url(server, job_id, "model.bin"), headers=auth, stream=True,
                      timeout=60) as r:
        assert r.status_code == 200
        head = r.raw.read(100_000)
    assert len(head) == 100_000
    r = requests.get(file_url(server, job_id, "model.bin"), timeout=60,
                     headers={**auth, "Range": f"bytes={len(head)}-"})
    assert r.status_code == 206 and sha(head + r.content) == sha(data)
    # The whole as one tar.
    r = server.get(f"/api/outputs/{job_id}?archive=tar", server.token())
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/x-tar")
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
        members = {m.name.removeprefix("./"): m for m in tf.getmembers() if not m.isdir()}
        assert set(members) == {f["path"] for f in out["files"]}
        for f in out["files"]:
            m = members[f["path"]]
            assert m.isfile() and m.size == f["size"]
            assert sha(tf.extractfile(m).read()) == f["sha256"]
    # Unknown paths, and paths that climb out, are not files of the job.
    for bad in ("nope.txt", "nested", "%2e%2e/job.json", "%2e%2e/%2e%2e/%2e%2e/gpuqueue.yaml",
                "nested/%2e%2e/%2e%2e/stdout"):
        r = requests.get(f"{server.url}/api/outputs/{job_id}/{bad}", headers=auth, timeout=30)
        assert r.status_code in (400, 404) and r.json()["error"], (bad, r.status_code)


def random_bytes(n, seed):
    return random.Random(seed).randbytes(n)


def test_outputs_access_pending_and_another_users_job(make_server, tmp_path):
    server = make_server(nodes=1)
    marker = tmp_path / "m"
    running = server.submit_ok(writer(marker, "time.sleep(120)"), expected_time=60)
    wait_for(marker.exists, "the first job to write its files", timeout=60)
    pending = server.submit_ok("print(1)\n")
    assert server.status(pending["job_id"])["status"] == "pending"
    r = server.get(f"/api/outputs/{pending['job_id']}", server.token())
    assert r.status_code == 409 and r.json()["error"], r.text
    assert server.status(pending["job_id"])["outputs"] is None
    for path in ("", "/a.txt"):
        r = server.get(f"/api/outputs/{running['job_id']}{path}", server.token("bob"))
        assert r.status_code == 404, r.text
    r = server.get(f"/api/outputs/{running['job_id']}", server.token("root", admin=True))
    assert r.status_code == 200 and r.json()["state"] == "running"
    # A file of the running job downloads from its node, whole or from a byte on.
    data = SMALL["a.txt"]
    r = server.get(f"/api/outputs/{running['job_id']}/a.txt", server.token())
    assert r.status_code == 200 and r.content == data, (r.status_code, r.text[:300])
    r = requests.get(file_url(server, running["job_id"], "a.txt"), timeout=30,
                     headers={"Authorization": f"Bearer {server.token()}", "Range": "bytes=2-"})
    assert r.status_code == 206 and r.content == data[2:], (r.status_code, r.text[:300])
    server.post(f"/api/cancel/{running['job_id']}", server.token())
    wait_outputs(server, running["job_id"])
    wait_outputs(server, pending["job_id"])
    for path in ("", "/a.txt", "?archive=tar"):
        r = server.get(f"/api/outputs/{running['job_id']}{path}", server.token("bob"))
        assert r.status_code == 404 and b"alpha" not in r.content, path
    assert listing(server, pending["job_id"])["files"] == []


# -- 5. hostile archives -----------------------------------------------------------------

EVIL = f"/tmp/gq-evil-{uuid.uuid4().hex}"
ESCAPE = f"gq-escape-{uuid.uuid4().hex}"
MAIN = ("main.py", b"print('never')\n")


@pytest.fixture(scope="module")
def attack_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    server = Server(root / "s", nodes=1, max_project_files=50, max_project_bytes=10 * MiB).start()
    yield server
    server.kill()
    kill_processes_under(root)


ATTACKS = [
    ("tar-dotdot", lambda: tar_of([MAIN, (f"../{ESCAPE}", b"x")]), "'..'", f"../{ESCAPE}"),
    ("tar-dotdot-inside", lambda: tar_of([MAIN, (f"pkg/../../{ESCAPE}", b"x")]), "'..'",
     f"pkg/../../{ESCAPE}"),
    ("tar-absolute", lambda: tar_of([MAIN, (EVIL, b"x")]), "absolute path", EVIL),
    ("tar-symlink", lambda: tar_of([MAIN, special("innocent.txt", tarfile.SYMTYPE, "/etc/passwd")]),
     "a link", "innocent.txt"),
    ("tar-symlink-folder", lambda: tar_of([MAIN, special("conf", tarfile.SYMTYPE, "/etc"),
                                           ("conf/gq-planted", b"x")]), "a link", "conf"),
    ("tar-hardlink", lambda: tar_of([MAIN, special("hard", tarfile.LNKTYPE, "/etc/passwd")]),
     "a link", "hard"),
    ("tar-hardlink-inside", lambda: tar_of([MAIN, special("again.py", tarfile.LNKTYPE, "main.py")]),
     "a link", "again.py"),
    ("tar-chardev", lambda: tar_of([MAIN, special("dev0", tarfile.CHRTYPE)]), "special file", "dev0"),
    ("tar-blockdev", lambda: tar_of([MAIN, special("blk0", tarfile.BLKTYPE)]), "special file", "blk0"),
    ("tar-fifo", lambda: tar_of([MAIN, special("pipe", tarfile.FIFOTYPE)]), "special file", "pipe"),
    ("tar-duplicate", lambda: tar_of([MAIN, ("dup.txt", b"1"), ("dup.txt", b"2")]), "given twice",
     "dup.txt"),
    ("tar-51-files", lambda: tar_of([MAIN] + [(f"f{i:02}.txt", b"x") for i in range(50)]),
     "more than 50 files", None),
    ("tar-many-empty-files", lambda: tar_of([MAIN] + [(f"e/{i:05}", b"") for i in range(20000)]),
     "more than 50 files", None),
    ("tar-name-too-long", lambda: tar_of([MAIN, ("a" * 5000, b"x")]), "longer than", None),
    # Entries that add nothing still cost reading: they count (100,000 in 100 KB).
    ("tar-the-same-folder-again", lambda: repeated_tar_gz(the_same_folder(), 100_000),
     "more than 50 files", None),
    ("tar-folder-again-by-name", lambda: repeated_tar_gz(the_same_folder("d/"), 100_000),
     "more than 50 files", None),
    ("tar-file-over-folder", lambda: tar_of([MAIN, ("a/b", b"x"), ("a", b"y")]),
     "a folder of that name", "'a'"),
    ("tar-file-with-no-name", lambda: tar_of([MAIN, ("./", b"data")]), "no name", None),
    ("zip-dotdot", lambda: zip_of([MAIN, (f"../{ESCAPE}", b"x")]), "'..'", f"../{ESCAPE}"),
    ("zip-absolute", lambda: zip_of([MAIN, (EVIL, b"x")]), "absolute path", EVIL),
    ("zip-symlink", lambda: zip_of([MAIN, zip_symlink("innocent.txt", "/etc/passwd")]), "a link",
     "innocent.txt"),
    ("zip-duplicate", lambda: zip_of([MAIN, ("dup.txt", b"1"), ("dup.txt", b"2")]), "given twice",
     "dup.txt"),
    ("zip-51-files", lambda: zip_of([MAIN] + [(f"f{i:02}.txt", b"x") for i in range(50)]),
     "more than 50 files", None),
    ("zip-file-over-folder", lambda: zip_of([MAIN, ("a/b", b"x"), ("a", b"y")]),
     "a folder of that name", "'a'"),
    ("gzip-garbage", lambda: b"\x1f\x8b\x08\x00" + os.urandom(4096), None, None),
]


def refused_cleanly(server, archive, phrase=None, entry=None, bound=20):
    """Submit ``archive``: a 400 within ``bound`` s that says ``phrase`` and names
    ``entry``, with nothing left on the spool and no job made.  The error."""
    before, jobs = spool_outside_incoming(server), job_count(server)
    began = time.monotonic()
    r = submit_project(server, archive)
    took = time.monotonic() - began
    assert r.status_code == 400, r.text[:2000]
    error = r.json()["error"]
    assert isinstance(error, str) and error
    assert phrase is None or phrase in error, error[:2000]
    assert entry is None or entry in error, error[:2000]
    assert took < bound, f"took {took:.1f} s"
    assert spool_outside_incoming(server) == before
    assert job_count(server) == jobs
    return error


@pytest.mark.parametrize("case, build, phrase, entry", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_a_hostile_archive_is_refused_fast_leaving_nothing(attack_server, case, build, phrase,
                                                          entry):
    refused_cleanly(attack_server, build(), phrase, entry)
    assert not os.path.lexists(EVIL)
    assert not list(attack_server.dir.rglob(f"{ESCAPE}*"))
    assert not list(attack_server.dir.rglob("gq-planted"))
    assert not list(Path("/etc").glob("gq-planted"))


def test_exactly_max_project_files_is_taken(attack_server):
    files = [("main.py", b"import os\nprint(len(os.listdir('d')))\n")]
    files += [(f"d/f{i:02}.txt", b"x") for i in range(49)]
    sub = submit_project_ok(attack_server, tar_of(files))
    st = attack_server.wait(sub["job_id"])
    assert st["status"] == "completed" and attack_server.results(sub["job_id"])["stdout"] == "49\n"


def vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_bomb_stops_at_max_project_bytes(attack_server, kind):
    archive = bomb_tar_gz() if kind == "tar.gz" else bomb_zip()
    assert len(archive) < 4 * MiB  # well under max_upload_bytes: only unpacking shows it
    rss_before = vm(attack_server.proc.pid, "VmRSS")
    refused_cleanly(attack_server, archive, "max_project_bytes", "big.bin")
    # The peak of the server's memory: nowhere near the gigabyte the bomb holds.
    assert vm(attack_server.proc.pid, "VmHWM") - rss_before < 300 * MiB


def test_a_header_that_claims_a_gigabyte_is_refused_unread(attack_server):
    """tarfile reads a pax header (or a long name) whole, at the size it states: the
    stream it reads stops any one read past a bound, before the bytes are held."""
    archive = pax_bomb_tar_gz()
    assert len(archive) < 4 * MiB
    rss_before = vm(attack_server.proc.pid, "VmRSS")
    refused_cleanly(attack_server, archive, "an entry's header")
    assert vm(attack_server.proc.pid, "VmHWM") - rss_before < 300 * MiB


# -- 6. env ------------------------------------------------------------------------------


def test_env_reaches_the_job_and_gpuqueues_own_names_are_refused(make_server):
    server = make_server(nodes=1)
    tricky = "a b $HOME 'q' \"d\" `true` ; x\\y"
    code = "import os\nprint(os.environ['MY_VAR'])\nprint(os.environ['TRICKY'])\n"
    r = server.submit(code, config=job_config("alice", 30, env={"MY_VAR": "hello", "TRICKY": tricky}))
    assert r.status_code == 201, r.text
    assert server.wait(r.json()["job_id"])["status"] == "completed"
    assert server.results(r.json()["job_id"])["stdout"] == f"hello\n{tricky}\n"
    for name in ("GPUQUEUE_JOB_ID", "GPUQUEUE_OUTPUT_DIR", "CUDA_VISIBLE_DEVICES",
                 "CUDA_DEVICE_ORDER", "PYTHONUNBUFFERED"):
        r = server.submit(code, config=job_config("alice", 30, env={name: "x"}))
        assert r.status_code == 400 and name in r.json()["error"], (name, r.text)
    for name in ("1BAD", "A-B", "A B", "É"):
        r = server.submit(code, config=job_config("alice", 30, env={name: "x", "MY_VAR": "y"}))
        assert r.status_code == 400 and name in r.json()["error"], (name, r.text)
    r = server.submit(code, config=job_config("alice", 30, env=["MY_VAR=x"]))
    assert r.status_code == 400, r.text
    assert job_count(server) == 1


# -- 7. environments ---------------------------------------------------------------------


def test_environments_by_name_per_node_and_the_default_python(make_server, tmp_path):
    server = make_server(
        nodes=[{"id": 0, "host": "local", "environments": ["sys", "broken"]},
               {"id": 1, "host": "local", "environments": ["sys"]}],
        environments={"sys": {"python": "/usr/bin/python3", "setup": "export GQ_SETUP=set-up"},
                      "broken": {"python": "/nonexistent/python"}})
    # Each node says which environments it has, and why one does not work.
    nodes = wait_for(lambda: (ns := server.get("/api/nodes").json()["nodes"])
                     and isinstance(ns[0].get("environments", {}).get("broken"), str) and ns,
                     "node 0 to report its broken environment", timeout=60)
    assert nodes[0]["environments"]["sys"] is None and nodes[0]["environments"]["broken"]
    assert nodes[1]["environments"] == {"sys": None}

    code = ("import os, sys\nprint(os.path.realpath(sys.executable))\n"
            "print(os.environ.get('GQ_SETUP'))\nprint(sys.prefix == sys.base_prefix)\n")
    r = server.submit(code, config=job_config("alice", 30, environment="nope"))
    assert r.status_code == 400, r.text
    assert "sys" in r.json()["error"] and "broken" in r.json()["error"], r.text
    for _ in range(2):  # one on each node, or both on one: either is the sys python
        sub = server.submit_ok(code, config=job_config("alice", 30, environment="sys"))
        assert server.wait(sub["job_id"])["status"] == "completed"
        assert server.results(sub["job_id"])["stdout"] == \
            f"{os.path.realpath('/usr/bin/python3')}\nset-up\nTrue\n"
    # No environment: the machine's python3, never the server's virtualenv.
    sub = server.submit_ok("import sys\nprint(sys.prefix == sys.base_prefix)\nprint(sys.prefix)\n")
    assert server.wait(sub["job_id"])["status"] == "completed"
    same, prefix = server.results(sub["job_id"])["stdout"].splitlines()
    assert same == "True" and not prefix.startswith(sys.prefix), (same, prefix)

    # Broken where it is listed: never run (refused, or kept waiting).
    ran = tmp_path / "broken-ran"
    r = server.submit(f"open({str(ran)!r}, 'w').write('x')\n",
                      config=job_config("alice", 30, environment="broken"))
    assert r.status_code in (201, 400), r.text
    if r.status_code == 400:
        assert "broken" in r.json()["error"], r.text
        return
    broken = r.json()["job_id"]
    for _ in range(3):  # the queue moves on meanwhile
        sub = server.submit_ok(code, config=job_config("alice", 30, environment="sys"))
        assert server.wait(sub["job_id"])["status"] == "completed"
    st = server.status(broken)
    assert st["status"] == "pending" and st["started_at"] is None, st
    assert not ran.exists()
    server.post(f"/api/cancel/{broken}", server.token())
    assert server.wait(broken)["status"] == "cancelled"
    assert not ran.exists()


def test_a_setup_line_that_fails_part_way_is_a_broken_environment_and_never_runs_a_job(
        make_server, tmp_path):
    """A command of an environment's setup that fails (a module that would not load)
    stops it there, though a later one succeeds: the node's check calls the
    environment broken, with the message; and a job whose setup fails when it starts
    fails with it, never run by the interpreter half set up."""
    flag = tmp_path / "no-module-now"
    server = make_server(
        nodes=[{"id": 0, "host": "local", "environments": ["half", "later"]}],
        environments={
            "half": {"python": "/usr/bin/python3", "setup": "no-such-module-gq\nexport X=1"},
            "later": {"python": "/usr/bin/python3",
                      "setup": f"test ! -e {flag}\nexport GQ_SETUP=set-up"}})
    node = wait_for(lambda: (ns := server.get("/api/nodes").json()["nodes"])
                    and isinstance(ns[0].get("environments", {}).get("half"), str) and ns[0],
                    "the node's check", timeout=60)
    assert node["environments"]["later"] is None, node
    why = node["environments"]["half"]
    assert isinstance(why, str) and "its setup line or" in why and "no-such-module-gq" in why
    job = "import os\nprint(os.environ.get('GQ_SETUP'))\n"
    sub = server.submit_ok(job, config=job_config(environment="later"))["job_id"]
    assert server.wait(sub)["status"] == "completed"
    assert server.results(sub)["stdout"] == "set-up\n"
    flag.touch()  # the setup fails from now on, after the check
    sub = server.submit_ok(job, config=job_config(environment="later"))["job_id"]
    st = server.wait(sub)
    assert (st["status"], st["exit_code"]) == ("failed", 1), st
    assert server.results(sub)["stdout"] == ""


def test_a_python3_launcher_is_asked_once_when_every_node_starts_its_first_job(
        make_server, tmp_path, monkeypatch):
    """A launcher first on PATH (a pyenv shim, say) is asked once which interpreter it
    is, not once by each node's thread: all eight ask at their first job, together.
    The launcher here takes a second to answer, so that every node asks meanwhile."""
    real = os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))
    asked = tmp_path / "asked"
    launcher = tmp_path / "launcher"
    launcher.mkdir()
    (launcher / "python3").write_text(
        f'#!/bin/sh\nif [ "$1" = -c ]; then echo asked >> {asked}; sleep 1; fi\n'
        f'exec {real} "$@"\n')
    (launcher / "python3").chmod(0o755)
    monkeypatch.setenv("PATH", f"{launcher}:{os.environ['PATH']}")
    server = make_server(nodes=8)
    arr = server.submit_ok("import os, sys\nprint(os.path.realpath(sys.executable))\n",
                           config=job_config(array=8))
    for job_id in arr["job_ids"]:
        assert server.wait(job_id)["status"] == "completed"
        assert server.results(job_id)["stdout"] == f"{real}\n"
    assert asked.read_text() == "asked\n"
    assert len({server.status(j)["node_id"] for j in arr["job_ids"]}) > 1  # asked together


# -- a project that takes a while to unpack ------------------------------------------------


def slow_unpacker(tmp_path, seconds):
    """An environment's python3 that waits ``seconds`` before it unpacks a project (a
    wrapper runs ``python3 <node program> unpack ...``) and is the machine's python3
    otherwise; the waiting shell names its own file, so a test can find it."""
    real = os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))
    path = tmp_path / "slow-python3"
    path.write_text(f'#!/bin/sh\nif [ "$2" = unpack ]; then sleep {seconds}; fi\n'
                    f'exec {real} "$@"\n')
    path.chmod(0o755)
    return path


def slow_server(make_server, tmp_path, seconds):
    python = slow_unpacker(tmp_path, seconds)
    return make_server(nodes=[{"id": 0, "host": "local", "environments": ["slow"]}],
                       environments={"slow": {"python": str(python)}})


def unpacking(python):
    """The pids of processes still running ``python``'s wait before an unpack."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if str(python).encode() in Path(f"/proc/{pid}/cmdline").read_bytes() \
                    and alive(int(pid)):
                found.append(int(pid))
    return found


def test_a_restart_while_a_started_project_unpacks_follows_it_to_its_end(make_server, tmp_path):
    """A project's wrapper claims the launch, then unpacks.  A server killed (-9) in
    between and started again must find that wrapper and follow it: the job runs once
    and completes, never called lost while it goes on."""
    server = slow_server(make_server, tmp_path, 6)
    ran = tmp_path / "ran"
    archive = tar_of([("main.py", f"open({str(ran)!r}, 'a').write('x')\nprint('done')\n"
                      .encode())])
    job_id = submit_project_ok(server, archive, entrypoint="main.py",
                               environment="slow")["job_id"]
    work = server.dir / "spool" / "nodes" / "0" / "work" / job_id
    wait_for((work / "launched").exists, "the launch to be claimed")
    assert not (work / "project").exists()  # still waiting to unpack
    server.kill()
    server.start()
    st = server.wait(job_id)
    assert st["status"] == "completed", (st, server.results(job_id))
    assert server.results(job_id)["stdout"] == "done\n"
    assert ran.read_text() == "x"


def test_a_cancel_after_a_prepared_project_got_its_go_still_stops_it(make_server, tmp_path):
    """A prepared project unpacks before it waits for its go.  When the job before it
    ends first, the go comes mid-unpack, and a cancel then finds nothing prepared to
    drop on the node: the job must be stopped once it starts, not run to its end."""
    server = slow_server(make_server, tmp_path, 4)
    gate = tmp_path / "gate"
    first = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                             "    time.sleep(0.05)\n", expected_time=5)["job_id"]
    server.wait(first, ("running",))
    marker = tmp_path / "ran-to-its-end"
    archive = tar_of([("main.py", f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w')"
                      ".write('x')\n".encode())])
    second = submit_project_ok(server, archive, entrypoint="main.py", environment="slow",
                               expected_time=5)["job_id"]
    wait_for(lambda: server.get("/api/nodes").json()["nodes"][0]["prepared_jobs"] == [second],
             "the project to be prepared")
    gate.touch()
    assert server.wait(first)["status"] == "completed"  # its end gave the go, mid-unpack
    r = server.post(f"/api/cancel/{second}", server.token())
    assert r.status_code == 200, r.text
    assert server.wait(second, timeout=90)["status"] == "cancelled"
    assert not marker.exists(), "a cancelled job ran to its end"


def test_a_dropped_prepared_project_stops_unpacking_and_leaves_no_folder(make_server, tmp_path):
    """A prepared project cancelled while it unpacks: its wrapper and unpack end at once
    (an unpack left going would fill the folder being removed), and its folder goes."""
    server = slow_server(make_server, tmp_path, 60)
    gate = tmp_path / "gate"
    first = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                             "    time.sleep(0.05)\n", expected_time=5)["job_id"]
    server.wait(first, ("running",))
    second = submit_project_ok(server, tar_of([("main.py", b"print(1)\n")]),
                               entrypoint="main.py", environment="slow",
                               expected_time=5)["job_id"]
    wait_for(lambda: server.get("/api/nodes").json()["nodes"][0]["prepared_jobs"] == [second],
             "the project to be prepared")
    python = tmp_path / "slow-python3"
    wait_for(lambda: unpacking(python), "its unpack to begin")
    r = server.post(f"/api/cancel/{second}", server.token())
    assert r.status_code == 200, r.text
    assert server.wait(second)["status"] == "cancelled"
    wait_for(lambda: not unpacking(python), "the unpack to end", timeout=15)
    work = server.dir / "spool" / "nodes" / "0" / "work" / second
    wait_for(lambda: not work.exists(), "its folder to be removed", timeout=15)
    gate.touch()
    assert server.wait(first)["status"] == "completed"


# -- 8. the client ------------------------------------------------------------------------

BARE_PYTHON = "/usr/bin/python3"


def bare_client(server, *args, cwd, token=None, timeout=120):
    """``python3 gpuqueue.py ARGS`` on the machine's python3, outside any venv, with the
    server and token from the environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "GPUQUEUE_CONFIG")}
    env.update(GPUQUEUE_URL=server.url, GPUQUEUE_TOKEN=token or server.token(),
               PYTHONNOUSERSITE="1")
    return subprocess.run([BARE_PYTHON, "-s", str(GPUQUEUE), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_tree(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


CLIENT_TRAIN = """import hashlib, json, os, sys
sys.dont_write_bytecode = True
seen = sorted(os.path.relpath(os.path.join(d, f), ".") for d, _, fs in os.walk(".")
              for f in fs)
out = os.environ["GPUQUEUE_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "model"))
with open(os.path.join(out, "listing.json"), "w") as f:
    json.dump(seen, f)
import random
with open(os.path.join(out, "model", "weights.out"), "wb") as f:
    f.write(random.Random(5).randbytes(300000))
import pkg.m
print(pkg.m.VALUE)
"""


def test_client_packs_a_folder_runs_it_and_brings_the_files_back(make_server, tmp_path):
    server = make_server(nodes=1)
    proj = tmp_path / "proj"
    write_tree(proj, {
        "train.py": CLIENT_TRAIN, "pkg/__init__.py": "", "pkg/m.py": "VALUE = 'from pkg'\n",
        "data/x.txt": "data\n", "notes.md": "# notes\n",
        ".git/HEAD": "ref: refs/heads/main\n", ".git/objects/ab/cdef": b"\0" * 100,
        "__pycache__/train.cpython-311.pyc": b"\0" * 10,
        "pkg/__pycache__/m.cpython-311.pyc": b"\0" * 10,
        ".venv/pyvenv.cfg": "home = /usr/bin\n", ".venv/lib/site.py": "x = 1\n",
        "myenv/pyvenv.cfg": "home = /usr/bin\n", "myenv/lib/mod.py": "x = 1\n",
        "venv/lib/other.py": "x = 1\n",
        "weights.bin": os.urandom(3 * MiB), "ckpt/a.ckpt": b"c" * 1000,
        ".gpuqueueignore": "# big things stay home\nweights.bin\n\n*.ckpt\n",
    })
    config = tmp_path / "config.yaml"
    config.write_text(job_config("alice", 60, entrypoint="train.py"))
    out_dir = tmp_path / "OUT"
    r = bare_client(server, "submit", str(proj), "-c", str(config), "--wait", "-o", str(out_dir),
                    cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr, server.log()[-3000:])
    assert r.stdout.splitlines()[-1:] == ["from pkg"], r.stdout
    assert re.search(r"packing\b.*\b\d+ files, [0-9.]+ ?MB", r.stderr), r.stderr
    jobs = server.get("/api/jobs", server.token()).json()["jobs"]
    assert len(jobs) == 1
    job_id = jobs[0]["job_id"]
    got = tree(out_dir)
    assert set(got) == {"listing.json", "model/weights.out"}, sorted(got)
    assert got["model/weights.out"] == random_bytes(300000, seed=5)
    check_files(server, job_id, got)  # byte for byte what the server has
    seen = set(json.loads(got["listing.json"]))
    assert {"train.py", "pkg/__init__.py", "pkg/m.py", "data/x.txt", "notes.md"} <= seen, seen
    for left_out in ("weights.bin", "ckpt/a.ckpt", ".git/HEAD", "__pycache__/train.cpython-311.pyc",
                     "pkg/__pycache__/m.cpython-311.pyc", ".venv/pyvenv.cfg", "myenv/pyvenv.cfg",
                     "myenv/lib/mod.py", "venv/lib/other.py", ".venv/lib/site.py"):
        assert left_out not in seen and not any(s.endswith("/" + left_out) for s in seen), left_out
    assert not any(part in (".git", "__pycache__", ".venv", "venv", "myenv")
                   for s in seen for part in Path(s).parts), seen

    # `outputs JOB -o DIR` fetches them again; without -o, lists them.
    again = tmp_path / "AGAIN"
    r = bare_client(server, "outputs", job_id, "-o", str(again), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tree(again) == got
    r = bare_client(server, "outputs", job_id, cwd=tmp_path)
    assert r.returncode == 0 and "listing.json" in r.stdout and "model/weights.out" in r.stdout, r


@pytest.mark.parametrize("limit", ["max_project_bytes", "max_upload_bytes"])
def test_client_refuses_a_folder_over_the_servers_limit_before_sending(make_server, tmp_path,
                                                                       limit):
    value = 100_000 if limit == "max_project_bytes" else 65536
    server = make_server(nodes=1, **{limit: value})
    proj = tmp_path / "proj"
    # Over max_project_bytes unpacked (zeros pack small); over max_upload_bytes packed.
    big = bytes(150_000) if limit == "max_project_bytes" else os.urandom(200_000)
    write_tree(proj, {"main.py": "print(1)\n", "big.dat": big, "mid.dat": b"m" * 20_000})
    config = tmp_path / "config.yaml"
    config.write_text(job_config("alice", 30))
    r = bare_client(server, "submit", str(proj), "-c", str(config), cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert limit in r.stderr or str(value) in r.stderr, r.stderr
    assert "big.dat" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert job_count(server) == 0


# -- 9. the drop folder ------------------------------------------------------------------


def test_a_project_copied_into_incoming_is_not_taken_while_it_grows_deep_down(make_server):
    """Copied straight in (no dot-name), a project's big file is still being written two
    folders down, where neither the folder's time nor its entries' move: it must not
    be taken until that file is whole."""
    server = make_server(nodes=1)
    incoming = server.dir / "spool" / "incoming"
    folder = incoming / "growing"
    write_tree(folder, {"config.yaml": job_config("alice", 30, token=server.token(),
                                                  entrypoint="run.py"),
                        "run.py": "import os\nprint(os.path.getsize('data/deep/big.bin'))\n",
                        "data/deep/big.bin": ""})
    big = folder / "data" / "deep" / "big.bin"
    with open(big, "ab") as f:
        end = time.monotonic() + 2.5
        while time.monotonic() < end:  # as a slow copy writes it
            f.write(b"x" * 1000)
            f.flush()
            assert folder.exists(), "taken while it was still being written"
            time.sleep(0.05)
    size = big.stat().st_size
    receipt = wait_for(lambda: next(incoming.glob("growing.*.receipt.json"), None)
                       or next(incoming.glob("growing.*.reason.txt"), None), "the receipt")
    assert receipt.name.endswith(".receipt.json"), receipt.read_text()
    job_id = json.loads(receipt.read_text())["job_id"]
    assert server.wait(job_id)["status"] == "completed"
    assert server.results(job_id)["stdout"] == f"{size}\n"


def test_a_dropped_project_runs_and_its_outputs_land_before_the_result(make_server):
    server = make_server(nodes=1)
    incoming = server.dir / "spool" / "incoming"
    tmp = incoming / ".proj"
    write_tree(tmp, {
        "config.yaml": job_config("alice", 30, token=server.token(), entrypoint="run.py"),
        "run.py": ("import os, sys\nsys.dont_write_bytecode = True\nfrom lib.helper import twice\n"
                   "out = os.environ['GPUQUEUE_OUTPUT_DIR']\n"
                   "os.makedirs(os.path.join(out, 'sub'))\n"
                   "text = open('data/in.txt').read()\n"
                   "open(os.path.join(out, 'out.txt'), 'w').write(twice(text))\n"
                   "open(os.path.join(out, 'sub', 'deep.bin'), 'wb').write(bytes(range(256)))\n"
                   "print('dropped', twice(text).strip())\n"),
        "other.py": "raise SystemExit('not this one')\n",
        "lib/__init__.py": "", "lib/helper.py": "def twice(s):\n    return s.strip() * 2 + '\\n'\n",
        "data/in.txt": "ab\n",
    })
    os.rename(tmp, incoming / "proj")
    receipt = wait_for(lambda: next(incoming.glob("proj.*.receipt.json"), None)
                       or next(incoming.glob("proj.*.reason.txt"), None), "the receipt", timeout=60)
    assert receipt.name.endswith(".receipt.json"), receipt.read_text()
    job_id = json.loads(receipt.read_text())["job_id"]
    result = incoming / f"proj.{job_id}.result.json"
    wait_for(result.exists, "the result", timeout=60)
    outputs = incoming / f"proj.{job_id}.outputs"
    want = {"out.txt": b"abab\n", "sub/deep.bin": bytes(range(256))}
    landed = tree(outputs)
    assert landed == want, sorted(landed)  # the job's files, whole, and nothing else
    r = json.loads(result.read_text())
    assert r["status"] == "completed" and r["outputs"]["state"] == "complete", r
    assert (incoming / f"proj.{job_id}.stdout").read_text() == "dropped abab\n"
    st = wait_outputs(server, job_id)
    assert st["outputs"] == "complete"
    check_files(server, job_id, want)


# -- the config -----------------------------------------------------------------------


def test_a_node_may_list_only_the_configs_environments(tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import gpuqueue
    cfg = {"environments": {"sys": {"python": "/usr/bin/python3"}},
           "nodes": [{"id": 0, "host": "local", "environments": ["sys"]}, {"id": 1, "host": "local"}]}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    c = gpuqueue.load_config(tmp_path / "ok.yaml")
    assert c.max_project_bytes == 256 * MiB and c.max_project_files == 10000
    assert c.max_output_files_bytes == 1024 * MiB and c.max_output_files == 1000
    cfg["nodes"][0]["environments"] = ["sys", "nope"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(gpuqueue.ConfigError, match="nope"):
        gpuqueue.load_config(tmp_path / "bad.yaml")


def test_files_the_spool_has_no_room_for_leave_the_result_and_stay_on_the_node(make_server,
                                                                               tmp_path):
    """The disk guard counts a job's files: with too little room they are not stored,
    the job keeps its result and the reason, its files stay on its node, and the node
    goes on to its next job."""
    disk = os.statvfs(tmp_path)
    free = disk.f_bavail * disk.f_frsize
    # Room for submits (a few KiB), none for the 200 MB the job writes. Its node's
    # workdir is on another disk (memory), so its files are copied, not moved, into
    # the spool.
    workdir = Path("/dev/shm") / f"gq-{uuid.uuid4().hex}"
    server = make_server(nodes=[{"id": 0, "host": "local", "workdir": str(workdir)}],
                         min_free_bytes=free - 100 * MiB, unreachable_grace=2)
    assert os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
    code = ("import os\nwith open(os.path.join(os.environ['GPUQUEUE_OUTPUT_DIR'], 'big.bin'),"
            " 'wb') as f:\n    f.write(bytes(200 << 20))\nprint('wrote')\n")
    job_id = server.submit_ok(code, expected_time=60)["job_id"]
    st = wait_outputs(server, job_id)
    assert st["status"] == "completed" and st["outputs"] == "lost", st
    assert server.results(job_id)["stdout"] == "wrote\n"
    lst = listing(server, job_id)
    assert lst["files"] == [] and "nearly full" in lst["error"] and "left on node 0" in lst["error"]
    kept = workdir / job_id / "outputs" / "big.bin"
    try:
        assert kept.stat().st_size == 200 << 20  # still on the node, as the error says
        kept.unlink()
        nxt = server.submit_ok("print('next')\n")["job_id"]  # the node was never stuck
        assert server.wait(nxt)["status"] == "completed"
    finally:
        server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_local_jobs_files_are_moved_into_the_spool_not_copied(server):
    """On a local node whose workdir is on the spool's disk (the default) the files are
    taken by a rename: the spool holds the very file the job wrote, no second copy."""
    code = ("import os\np = os.path.join(os.environ['GPUQUEUE_OUTPUT_DIR'], 'w.bin')\n"
            "open(p, 'wb').write(b'w' * 4096)\nprint(os.stat(p).st_ino)\n")
    job_id = server.submit_ok(code)["job_id"]
    assert wait_outputs(server, job_id)["outputs"] == "complete"
    inode = int(server.results(job_id)["stdout"])
    stored = server.dir / "spool" / "done" / job_id / "outputs" / "w.bin"
    assert stored.stat().st_ino == inode and stored.read_bytes() == b"w" * 4096
    assert listing(server, job_id)["files"] == [
        {"path": "w.bin", "size": 4096, "sha256": hashlib.sha256(b"w" * 4096).hexdigest()}]


@pytest.mark.parametrize("cut_at", ["after the move", "after the rename"])
def test_a_crash_while_a_local_jobs_files_are_taken_loses_none_of_them(make_server, cut_at):
    """A local job's files are moved, not copied, into the spool: they are nowhere else
    once moved.  A crash before the listing is written (made here by hand, as a kill -9
    would leave it) must find them again, not start a copy from a node that has none."""
    server = make_server(nodes=1)
    code = ("import os\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\nos.makedirs(out + '/d')\n"
            "open(out + '/d/a.bin', 'wb').write(b'a' * 5000)\n")
    job_id = server.submit_ok(code)["job_id"]
    assert wait_outputs(server, job_id)["outputs"] == "complete"
    server.kill()
    done = server.dir / "spool" / "done" / job_id
    (done / "outputs.json").unlink()
    # ...and with it the line done.index gets once the listing is written.
    index = server.dir / "spool" / "done.index"
    index.write_text("".join(line for line in index.read_text().splitlines(keepends=True)
                             if line != f"c {job_id}\n"))
    if cut_at == "after the move":
        os.rename(done / "outputs", done / ".outputs.tmp")
    server.start()
    st = wait_outputs(server, job_id)
    assert st["outputs"] == "complete", st
    check_files(server, job_id, {"d/a.bin": b"a" * 5000})


def test_a_job_whose_environment_broke_after_its_submit_says_so_while_it_waits(make_server,
                                                                               tmp_path):
    """A job queued while its environment worked, which a later check (its node's
    reconnect) finds broken, waits for a node where it works, and its status says
    so, never that it waits for a GPU or for jobs ahead of it."""
    flag = tmp_path / "broken-now"
    server = make_server(nodes=[{"id": 0, "host": "local", "environments": ["later"]}],
                         environments={"later": {"python": "/usr/bin/python3",
                                                 "setup": f"test ! -e {flag}"}})
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    first = server.submit_ok(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                             "    time.sleep(0.05)\n", expected_time=60)["job_id"]
    server.wait(first, ("running",))
    job_id = server.submit_ok(f"open({str(ran)!r}, 'w')\n",
                              config=job_config(environment="later"))["job_id"]
    assert "environment" not in server.status(job_id)["waiting"]  # (it works, so far)
    flag.touch()
    agent, = agent_pids(server.dir / "spool" / "nodes" / "0" / "work")
    os.kill(agent, signal.SIGKILL)  # its node reconnects, and checks again
    st = wait_for(lambda: "environment" in ((st := server.status(job_id)).get("waiting") or "")
                  and st, "the reason it waits", timeout=60)
    assert st["status"] == "pending" and "'later' does not work on node 0" in st["waiting"], st
    gate.touch()
    assert server.wait(first)["status"] == "completed"
    assert server.status(job_id)["status"] == "pending" and not ran.exists()

