"""``run_as``: a local node's jobs run as another user and cannot reach the queue.

The tests run as root and create that user.  Every folder above the server's own
is opened to everyone first, so that nothing but gpuqueue's own permissions stands
between the job and the spool, the config and the tokens file."""
import json
import os
import pwd
import subprocess

import pytest

from conftest import job_config, wait_for
from sshcluster import open_to_nodes

JOB_USER = "gqjob"

#: A job that tries every way into the queue it can think of, and reports.
PROBE = r'''
import json, os
spool, config, tokens = SPOOL, CONFIG, TOKENS
report = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
          "home": os.environ.get("HOME")}

def attempt(name, fn):
    try:
        fn()
        report[name] = "allowed"
    except OSError as exc:
        report[name] = type(exc).__name__

attempt("list spool", lambda: os.listdir(spool))
attempt("read config", lambda: open(config).read())
attempt("read tokens", lambda: open(tokens).read())
attempt("append tokens", lambda: open(tokens, "a").write("- {user: x, admin: true}\n"))
attempt("list done", lambda: os.listdir(os.path.join(spool, "done")))
attempt("list pending", lambda: os.listdir(os.path.join(spool, "nodes", "0", "pending")))
attempt("write control", lambda: open(os.path.join(spool, "control", "0" * 24 + ".request.json"),
                                      "w").write('{"op": "cancel"}'))
attempt("write incoming", lambda: os.mkdir(os.path.join(spool, "incoming", "x")))
attempt("replace agent", lambda: open(os.path.join("..", "planted.py"), "w").write("x"))
attempt("own folder", lambda: open("mine.txt", "w").write("ok"))
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def job_user():
    try:
        pwd.getpwnam(JOB_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", JOB_USER], check=True)
    return pwd.getpwnam(JOB_USER)


def test_a_run_as_job_cannot_reach_the_spool_the_config_or_the_tokens(make_server, tmp_path,
                                                                      job_user):
    open_to_nodes(tmp_path, writable=False)
    server = make_server(start=False, nodes=[{"id": 0, "host": "local", "run_as": JOB_USER,
                                              "python": "/usr/bin/python3"}])
    os.chmod(server.dir, 0o755)  # as an admin's folder would be: its files are the point
    server.start()
    spool, config, tokens = server.dir / "spool", server.config_path, server.dir / "tokens.yaml"
    token = server.token("alice")
    assert not (os.stat(config).st_mode & 0o077) and not (os.stat(tokens).st_mode & 0o077)
    code = f"SPOOL, CONFIG, TOKENS = {str(spool)!r}, {str(config)!r}, {str(tokens)!r}\n" + PROBE
    sub = server.submit_ok(code, token=token)
    st = server.wait(sub["job_id"])
    out = server.results(sub["job_id"])
    report = json.loads(out["stdout"].splitlines()[0])
    assert (report["uid"], report["gid"], report["groups"]) == (job_user.pw_uid, job_user.pw_gid, [])
    assert report["own folder"] == "allowed", report
    refused = {k: v for k, v in report.items() if k not in ("uid", "gid", "groups", "home", "own folder")}
    assert all(v == "PermissionError" for v in refused.values()), report
    assert st["status"] in ("completed", "failed")
    assert "sha256" not in out["stdout"] + out["stderr"]
    assert not list((spool / "control").glob("*.request.json"))
    assert server.status(sub["job_id"], token=token)["user_id"] == "alice"


def test_a_job_that_plants_a_link_as_its_output_gets_no_one_elses_file(make_server, tmp_path,
                                                                       job_user):
    open_to_nodes(tmp_path, writable=False)
    server = make_server(start=False, nodes=[{"id": 0, "host": "local", "run_as": JOB_USER,
                                              "python": "/usr/bin/python3"}])
    server.start()
    secret = server.dir / "tokens.yaml"
    token = server.token("alice")
    # The wrapper holds stdout open; the job swaps the name for a link to the token file.
    code = (f"import os\nos.remove('stdout')\nos.symlink({str(secret)!r}, 'stdout')\n"
            "print('x' * 200000)\n")
    sub = server.submit_ok(code, token=token)
    server.wait(sub["job_id"])
    out = server.results(sub["job_id"])
    assert "sha256" not in out["stdout"] + out["stderr"]


def test_run_as_is_refused_for_ssh_nodes_and_unknown_users(make_server):
    server = make_server(start=False, nodes=[{"id": 0, "host": "local", "run_as": "no-such-user"}])
    r = server.cli("serve", check=False)
    assert r.returncode != 0 and "no user 'no-such-user'" in r.stderr
    server = make_server(start=False, nodes=[{"id": 0, "host": "gpu1.example.com",
                                              "run_as": JOB_USER}])
    r = server.cli("nodes", "list", check=False)
    assert r.returncode != 0 and "'run_as' is for local nodes" in r.stderr


def test_a_run_as_project_unpacks_as_the_job_user_and_its_links_are_never_followed(
        make_server, tmp_path, job_user):
    """The project is unpacked by the job's user (its files are the job's to change),
    and what the job leaves in its outputs comes back without the server following
    any link it made there: to the token file, or to the server's own folder."""
    import io
    import tarfile
    open_to_nodes(tmp_path, writable=False)
    server = make_server(start=False, nodes=[{"id": 0, "host": "local", "run_as": JOB_USER,
                                              "python": "/usr/bin/python3"}])
    server.start()
    secret = server.dir / "tokens.yaml"
    main = (f"import os, json\nout = os.environ['GPUQUEUE_OUTPUT_DIR']\n"
            "owners = {p: os.stat(p).st_uid for p in ('main.py', 'pkg', 'pkg/data.txt', out)}\n"
            "open('pkg/data.txt', 'a').write('changed')\n"
            "open(os.path.join(out, 'mine.txt'), 'w').write(json.dumps(owners))\n"
            f"os.symlink({str(secret)!r}, os.path.join(out, 'tokens'))\n"
            f"os.symlink({str(server.dir)!r}, os.path.join(out, 'server'))\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("main.py", main.encode()), ("pkg/data.txt", b"d")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    token = server.token("alice")
    r = server.post("/api/submit", token, files={"code": ("p.tgz", buf.getvalue()),
                                                 "config_file": ("c.yaml", job_config())})
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    st = server.wait(job_id)
    assert st["status"] == "completed", server.results(job_id)
    listing = server.get(f"/api/outputs/{job_id}", token).json()
    assert [f["path"] for f in listing["files"]] == ["mine.txt"]
    assert sorted(s["path"] for s in listing["skipped"]) == ["server", "tokens"]
    owners = json.loads(server.get(f"/api/outputs/{job_id}/mine.txt", token).content)
    assert set(owners.values()) == {job_user.pw_uid}, owners
    tar = server.get(f"/api/outputs/{job_id}?archive=tar", token).content
    assert b"sha256" not in tar and secret.read_bytes()[:40] not in tar


def test_environments_are_checked_as_the_run_as_user(make_server, tmp_path, job_user):
    """A node's check of its environments runs each as its jobs will, as the run_as
    user: an interpreter only the server's user may reach shows as broken, with the
    reason, rather than as working and then failing every job."""
    open_to_nodes(tmp_path, writable=False)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # root's alone, as a pyenv under /root would be
    (private / "python3").write_text('#!/bin/sh\nexec /usr/bin/python3 "$@"\n')
    (private / "python3").chmod(0o755)
    server = make_server(
        nodes=[{"id": 0, "host": "local", "run_as": JOB_USER, "python": "/usr/bin/python3",
                "environments": ["sys", "private"]}],
        environments={"sys": {"python": "/usr/bin/python3", "setup": "export X=1"},
                      "private": {"python": str(private / "python3")}})
    node = wait_for(lambda: (ns := server.get("/api/nodes").json()["nodes"])
                    and isinstance(ns[0].get("environments", {}).get("private"), str)
                    and ns[0], "the node's check", timeout=60)
    assert node["environments"]["sys"] is None, node
    why = node["environments"]["private"]
    assert isinstance(why, str) and str(private / "python3") in why, node
    sub = server.submit_ok("import os\nprint(os.getuid())\n", config=job_config(environment="sys"))
    assert server.wait(sub["job_id"])["status"] == "completed"
    assert server.results(sub["job_id"])["stdout"] == f"{job_user.pw_uid}\n"
