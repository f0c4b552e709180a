"""Authentication, token handling, input checking and the OpenAPI document, over real HTTP.

Every refused request must answer 4xx JSON ``{"error": ...}``, write nothing to the
spool, and leave the server answering.  Tests that only send bad input share one
server (``shared``), which never runs a job, so its spool stays still between checks.
"""
import http.client
import json
import os
import re
import stat
import sys
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from conftest import ROOT, Server, job_config, kill_processes_under

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402  (only for Api.ROUTES; the server under test is a subprocess)


UNKNOWN_ID = "0" * 24
SLEEPER = "import time\ntime.sleep(120)\n"
PROTECTED = [("POST", "/api/submit"), ("GET", "/api/status/{id}"), ("GET", "/api/results/{id}"),
             ("POST", "/api/cancel/{id}"), ("GET", "/api/jobs")]
BASE_CONFIG = "competition_id: comp123\nproject_id: proj456\nuser_id: alice\n"


# -- helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the tests that send only bad input; no job ever runs on it."""
    base = tmp_path_factory.mktemp("shared")
    s = Server(base / "s", nodes=2).start()
    for user, admin in (("alice", False), ("bob", False), ("root", True)):
        s.token(user, admin=admin)
    yield s
    s.kill()
    kill_processes_under(base)


def raw(server, method, path, headers=None, body=None):
    """Send ``path`` byte for byte (no client-side normalising of '..' or '%')."""
    host = urlsplit(server.url).netloc
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def error_of(status, content_type, body, expected):
    """Check a refusal: expected status, JSON ``{"error": <non-empty text>}``; return the text."""
    assert status in expected, (status, body[:300])
    assert content_type.startswith("application/json"), (content_type, body[:300])
    data = json.loads(body)
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert isinstance(data["error"], str) and data["error"].strip(), data
    return data["error"]


def refused(r, *expected):
    return error_of(r.status_code, r.headers.get("Content-Type", ""), r.content, expected)


def still_answers(server):
    r = server.get("/")
    assert r.status_code == 200 and r.json()["name"] == "gpuqueue", r.text


def send(server, method, path, auth_header=None, **kw):
    """A request with exactly the Authorization header given (or none)."""
    headers = {"Authorization": auth_header} if auth_header is not None else {}
    return requests.request(method, server.url + path, headers=headers, timeout=60, **kw)


def upload(code="print(1)\n", config=None):
    config = config if config is not None else job_config("alice", 5)
    return {"code": ("job.py", code), "config_file": ("config.yaml", config)}


def fingerprint_of(server, user):
    """The fingerprint `tokens list` shows for ``user`` (exactly one token expected)."""
    rows = [line.split() for line in server.cli("tokens", "list").stdout.splitlines()[1:]]
    fps = [row[0] for row in rows if row[1] == user]
    assert len(fps) == 1, rows
    assert re.fullmatch(r"[0-9a-f]{12}", fps[0]), fps
    return fps[0]


def rewrite_tokens_file(server, edit):
    """Edit the token records the way an admin's script would, then publish by rename."""
    path = server.dir / "tokens.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data["tokens"])
    tmp = path.with_name("tokens.yaml.new")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def poll_status(server, path, token, want, bound=5.0):
    """GET ``path`` until it answers ``want`` (a generous bound, not a timing test)."""
    end = time.monotonic() + bound
    while True:
        r = server.get(path, token)
        if r.status_code == want or time.monotonic() > end:
            return r
        time.sleep(0.05)


# -- 1. authentication -------------------------------------------------------


def test_auth_matrix_on_every_protected_route(server):
    alice, bob = server.token("alice"), server.token("bob")
    admin = server.token("root", admin=True)
    expired = server.token("old")
    revoked = server.token("gone")
    rewrite_tokens_file(server, lambda recs: [r.update(expires="2001-01-01T00:00:00+00:00")
                                              for r in recs if r["user"] == "old"])
    # "--": a generated token may begin with "-" (token_urlsafe), which click takes for an option.
    server.cli("tokens", "revoke", "--", revoked)

    done = server.submit_ok("print(1)\n", token=alice)
    server.wait(done["job_id"])
    bobs = server.submit_ok("print(2)\n", user="bob", token=bob)
    server.wait(bobs["job_id"], token=bob)
    before = server.spool_files()

    bad = {
        "no header": None,
        "Bearer alone": "Bearer",
        "Bearer and spaces": "Bearer    ",
        "Basic scheme": "Basic xyz",
        "Basic with a real token": f"Basic {alice}",
        "token without scheme": alice,
        "wrong token": "Bearer " + "x" * 43,
        "expired token": f"Bearer {expired}",
        "revoked token": f"Bearer {revoked}",
    }
    for name, header in bad.items():
        for method, route in PROTECTED:
            path = route.format(id=done["job_id"])
            kw = {"files": upload()} if route == "/api/submit" else {}
            msg = refused(send(server, method, path, header, **kw), 401)
            if name == "expired token":
                assert "expired" in msg, msg
            if name == "revoked token":
                assert "revoked" in msg, msg
    assert server.spool_files() == before, "a refused request wrote to the spool"

    # User B on user A's job: 404, the same answer as for a job that does not exist.
    unknown = refused(server.get(f"/api/status/{UNKNOWN_ID}", bob), 404)
    for method, route in PROTECTED[1:4]:
        assert refused(send(server, method, route.format(id=done["job_id"]), f"Bearer {bob}"),
                       404) == unknown
    listed = [j["job_id"] for j in server.get("/api/jobs", bob).json()["jobs"]]
    assert listed == [bobs["job_id"]]

    # User A on their own job; the admin on everyone's.
    for tok in (alice, admin):
        assert server.get(f"/api/status/{done['job_id']}", tok).json()["status"] == "completed"
        assert server.get(f"/api/results/{done['job_id']}", tok).json()["stdout"] == "1\n"
    assert server.get(f"/api/results/{bobs['job_id']}", admin).json()["stdout"] == "2\n"
    everyone = {j["job_id"] for j in server.get("/api/jobs", admin).json()["jobs"]}
    assert everyone == {done["job_id"], bobs["job_id"]}
    only_bob = server.get("/api/jobs?user_id=bob", admin).json()["jobs"]
    assert [j["job_id"] for j in only_bob] == [bobs["job_id"]]
    r = server.post(f"/api/cancel/{done['job_id']}", alice)
    assert "completed" in refused(r, 409)

    # Cancel: bob cannot touch alice's running job, the admin can.
    running = server.submit_ok(SLEEPER, token=alice)
    server.wait(running["job_id"], ("running",))
    assert "running" in refused(server.get(f"/api/results/{running['job_id']}", alice), 409)
    refused(server.post(f"/api/cancel/{running['job_id']}", bob), 404)
    assert server.status(running["job_id"])["status"] == "running"
    r = server.post(f"/api/cancel/{running['job_id']}", admin)
    assert r.status_code == 200, r.text
    assert r.json()["cancel_requested"]
    assert server.wait(running["job_id"], token=alice)["status"] == "cancelled"

    # The scheme name is case-insensitive.
    assert send(server, "GET", "/api/jobs", f"bearer {alice}").status_code == 200

    # No token needed for these.
    for path in ("/", "/api/nodes", "/openapi.json", "/docs"):
        assert requests.get(server.url + path, timeout=30).status_code == 200, path


def test_submit_user_id_must_be_the_tokens_user_unless_admin(server):
    alice, admin = server.token("alice"), server.token("root", admin=True)
    before = server.spool_files()
    r = server.submit("print(1)\n", config=job_config("bob"), token=alice)
    assert "user_id" in refused(r, 403)
    assert server.spool_files() == before
    sub = server.submit_ok("print(1)\n", config=job_config("bob"), token=admin)
    st = server.wait(sub["job_id"], token=admin)
    assert st["user_id"] == "bob" and st["status"] == "completed"
    # The job belongs to bob: bob sees it, alice does not.
    assert server.status(sub["job_id"], user="bob")["user_id"] == "bob"
    refused(server.get(f"/api/status/{sub['job_id']}", alice), 404)


def test_token_in_config_works_without_header(server):
    alice, bob = server.token("alice"), server.token("bob")
    r = server.post("/api/submit", files=upload(config=job_config("alice", 5, token=alice)))
    assert r.status_code == 201, r.text
    assert server.wait(r.json()["job_id"])["status"] == "completed"
    before = server.spool_files()
    # A wrong token in the config is refused like one in the header.
    r = server.post("/api/submit", files=upload(config=job_config("alice", 5, token="y" * 43)))
    assert "invalid" in refused(r, 401)
    # A header takes precedence over the config's token.
    r = server.post("/api/submit", bob, files=upload(config=job_config("alice", 5, token=alice)))
    refused(r, 403)
    r = send(server, "POST", "/api/submit", "Bearer " + "z" * 43,
             files=upload(config=job_config("alice", 5, token=alice)))
    refused(r, 401)
    assert server.spool_files() == before


def test_expired_token_is_refused_and_a_future_expiry_still_works(server):
    token = server.token("alice")
    assert server.get("/api/jobs", token).status_code == 200
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat(timespec="seconds")
    rewrite_tokens_file(server, lambda recs: recs[0].update(expires=past))
    r = poll_status(server, "/api/jobs", token, 401)
    assert "expired" in refused(r, 401)
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat(timespec="seconds")
    rewrite_tokens_file(server, lambda recs: recs[0].update(expires=future))
    assert poll_status(server, "/api/jobs", token, 200).status_code == 200


@pytest.mark.parametrize("written, valid", [
    ("2001-01-01T00:00:00+00:00", False),   # unquoted: YAML reads a timestamp, not a string
    ("2999-01-01T00:00:00+00:00", True),
    ("'2001-01-01T00:00:00'", False),       # no zone: read as UTC
    ("2001-01-01", False),                  # a date: YAML reads a date
])
def test_hand_edited_expires_is_understood_not_a_500(server, written, valid):
    """An admin who edits `expires:` by hand in tokens.yaml gets 401 or 200, never 500."""
    token = server.token("alice")
    path = server.dir / "tokens.yaml"
    text = re.sub(r"(?m)^(\s+expires:).*$", lambda m: f"{m.group(1)} {written}", path.read_text())
    tmp = path.with_name("tokens.yaml.new")
    tmp.write_text(text)
    os.replace(tmp, path)
    r = server.get("/api/jobs", token)
    if valid:
        assert r.status_code == 200, r.text
    else:
        assert "expired" in refused(r, 401)


def test_cli_token_changes_reach_a_running_server_without_restart(server):
    alice = server.token("alice")
    # A token created while the server runs works at once.
    fresh = server.cli("tokens", "create", "carol", "--days", "1").stdout.split()[-1]
    assert poll_status(server, "/api/jobs", fresh, 200).status_code == 200
    # Revoked by the token itself.
    server.cli("tokens", "revoke", "--", fresh)
    assert "revoked" in refused(poll_status(server, "/api/jobs", fresh, 401), 401)
    # Revoked by the fingerprint `tokens list` shows.
    dave = server.cli("tokens", "create", "dave", "--days", "1").stdout.split()[-1]
    assert poll_status(server, "/api/jobs", dave, 200).status_code == 200
    fp = fingerprint_of(server, "dave")
    out = server.cli("tokens", "revoke", fp).stdout
    assert fp in out and dave not in out
    assert "revoked" in refused(poll_status(server, "/api/jobs", dave, 401), 401)
    listing = server.cli("tokens", "list").stdout
    assert [line for line in listing.splitlines() if line.startswith(fp)][0].split()[-1] != "-"
    # Other tokens are untouched.
    assert server.get("/api/jobs", alice).status_code == 200
    # Revoking what does not exist fails loudly.
    r = server.cli("tokens", "revoke", "ffffffffffff", check=False)
    assert r.returncode != 0 and "no such token" in r.stderr


# -- 2. the tokens file ------------------------------------------------------


def test_tokens_file_is_private_hashed_and_never_shown(server):
    generated = server.token("alice")
    chosen = "chosen-token-0123456789"
    out = server.cli("tokens", "create", "bob", chosen, "--days", "2")
    assert chosen not in out.stdout + out.stderr
    admin = server.token("root", admin=True)

    path = server.dir / "tokens.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    for tok in (generated, chosen, admin):
        assert tok not in text
    records = yaml.safe_load(text)["tokens"]
    assert {r["user"] for r in records} == {"alice", "bob", "root"}
    for r in records:
        assert set(r) == {"sha256", "user", "admin", "created", "expires", "revoked"}
        assert re.fullmatch(r"[0-9a-f]{64}", r["sha256"])

    listing = server.cli("tokens", "list")
    for tok in (generated, chosen, admin):
        assert tok not in listing.stdout + listing.stderr
    assert len(listing.stdout.strip().splitlines()) == 4

    # A chosen token of 16+ characters works; one under 8 is refused and not stored.
    assert server.get("/api/jobs", chosen).status_code == 200
    for short in ("short", "x" * 7):
        r = server.cli("tokens", "create", "eve", short, check=False)
        assert r.returncode != 0 and "at least 8" in r.stderr, r.stderr
    assert "eve" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    refused(server.get("/api/jobs", "x" * 7), 401)


# -- 3. bad input ------------------------------------------------------------


def _cfg(expected_time="5", **override):
    lines = {"competition_id": "comp123", "project_id": "proj456", "user_id": "alice",
             "expected_time": expected_time, **override}
    return "".join(f"{k}: {v}\n" for k, v in lines.items() if v is not None)


def _bomb():
    """Billion laughs under a known key: nine levels of nine references each."""
    levels = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        levels.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return _cfg(competition_id="[" + ", ".join(levels) + "]")


# (id, multipart parts or None for a config-only case, config, expected statuses, words in error)
CONFIG_CASES = [
    ("yaml-syntax", "competition_id: [unclosed\nproject_id: p\n", (400,), ["yaml", "line"]),
    ("yaml-list", "- competition_id\n- project_id\n", (400,), ["mapping"]),
    ("yaml-scalar", "just some words\n", (400,), ["mapping"]),
    ("yaml-empty", "", (400,), ["mapping"]),
    ("missing-competition_id", _cfg(competition_id=None), (400,), ["missing", "competition_id"]),
    ("missing-project_id", _cfg(project_id=None), (400,), ["missing", "project_id"]),
    ("missing-user_id", _cfg(user_id=None), (400,), ["missing", "user_id"]),
    ("missing-expected_time", _cfg(expected_time=None), (400,), ["missing", "expected_time"]),
    ("unknown-key", _cfg(gpu_count=4), (400,), ["unknown", "gpu_count"]),
    ("expected_time-quoted", _cfg('"10"'), (400,), ["expected_time", "number"]),
    ("user_id-int", _cfg(user_id=5), (400,), ["user_id", "string"]),
    ("user_id-yaml-bool", _cfg(user_id="no"), (400,), ["user_id", "string"]),
    ("user_id-empty", _cfg(user_id='""'), (400,), ["user_id"]),
    ("competition_id-list", _cfg(competition_id="[1]"), (400,), ["competition_id"]),
    ("project_id-null", _cfg(project_id="null"), (400,), ["project_id"]),
    ("project_id-too-long", _cfg(project_id="a" * 201), (400,), ["project_id"]),
    ("project_id-control-char", _cfg(project_id='"a\\x07b"'), (400,), ["project_id"]),
    ("token-int", _cfg(token=12345678901234567890), (400,), ["token"]),
    ("expected_time-nan", _cfg(".nan"), (400,), ["expected_time"]),
    ("expected_time-inf", _cfg(".inf"), (400,), ["expected_time"]),
    ("expected_time-minus-inf", _cfg("-.inf"), (400,), ["expected_time"]),
    ("expected_time-zero", _cfg("0"), (400,), ["expected_time"]),
    ("expected_time-zero-float", _cfg("0.0"), (400,), ["expected_time"]),
    ("expected_time-negative", _cfg("-1"), (400,), ["expected_time"]),
    ("expected_time-above-max", _cfg("86401"), (400,), ["expected_time", "86400"]),
    ("expected_time-bool", _cfg("true"), (400,), ["expected_time"]),
    ("expected_time-huge-int", _cfg("9" * 400), (400,), ["expected_time"]),
    ("python-tag-document", '!!python/object/apply:os.system ["touch {marker}"]\n', (400,), []),
    ("python-tag-value", _cfg(competition_id='!!python/object/apply:os.system ["touch {marker}"]'),
     (400,), []),
    ("alias-bomb", _bomb(), (400,), ["competition_id"]),
    ("deep-nesting", _cfg(competition_id="[" * 20000 + "]" * 20000), (400,), []),
]


def _parts_cases():
    good_cfg = ("config.yaml", job_config("alice", 5))
    return [
        ("missing-code", [("config_file", good_cfg)], (400,), ["code"]),
        ("missing-config_file", [("code", ("job.py", "print(1)\n"))], (400,), ["config_file"]),
        ("duplicate-code", [("code", ("a.py", "print(1)\n")), ("code", ("b.py", "print(2)\n")),
                            ("config_file", good_cfg)], (400,), ["code"]),
        ("duplicate-config_file", [("code", ("a.py", "print(1)\n")), ("config_file", good_cfg),
                                   ("config_file", good_cfg)], (400,), ["config_file"]),
        ("extra-part", [("code", ("a.py", "print(1)\n")), ("config_file", good_cfg),
                        ("extra", ("x.txt", "x"))], (400,), ["part"]),
        ("extra-plain-field", [("code", ("a.py", "print(1)\n")), ("config_file", good_cfg),
                               ("note", (None, "hello"))], (400,), ["part"]),
        ("empty-code", [("code", ("a.py", "")), ("config_file", good_cfg)], (400,), ["empty"]),
        ("blank-code", [("code", ("a.py", "  \n\t\n")), ("config_file", good_cfg)], (400,),
         ["empty"]),
        ("non-utf8-code", [("code", ("a.py", b"\xff\xfe")), ("config_file", good_cfg)], (400,),
         ["utf-8"]),
        ("non-utf8-code-plain-field", [("code", (None, b"print(1)#\xff\xfe\n")),
                                       ("config_file", good_cfg)], (400,), []),
        ("non-utf8-config", [("code", ("a.py", "print(1)\n")),
                             ("config_file", ("c.yaml", BASE_CONFIG.encode() + b"expected_time: 5\n"
                                              b"# \xff\xfe\n"))], (400,), ["utf-8"]),
    ]


PARTS_CASES = _parts_cases()


@pytest.mark.parametrize("name, parts, expected, words", PARTS_CASES,
                         ids=[c[0] for c in PARTS_CASES])
def test_bad_multipart_upload_is_refused(shared, name, parts, expected, words):
    before = shared.spool_files()
    r = shared.post("/api/submit", shared.token("alice"), files=parts)
    msg = refused(r, *expected)
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert shared.spool_files() == before
    still_answers(shared)


@pytest.mark.parametrize("name, config, expected, words", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused(shared, tmp_path, name, config, expected, words):
    marker = tmp_path / "pwned"
    config = config.replace("{marker}", str(marker))
    before = shared.spool_files()
    r = shared.post("/api/submit", shared.token("alice"),
                    files=upload("print(1)\n", config.encode()))
    msg = refused(r, *expected)
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert shared.spool_files() == before
    assert not marker.exists(), "a YAML tag ran a command"
    still_answers(shared)


NON_MULTIPART = [
    ("json", {"json": {"code": "print(1)", "config_file": "x"}}, (415,)),
    ("urlencoded", {"data": {"code": "print(1)", "config_file": "x"}}, (415,)),
    ("text-plain", {"data": b"print(1)", "headers": {"Content-Type": "text/plain"}}, (415,)),
    ("no-content-type", {"data": b"print(1)"}, (415,)),
    ("multipart-no-boundary", {"data": b"garbage",
                               "headers": {"Content-Type": "multipart/form-data"}}, (400,)),
    ("multipart-garbage", {"data": b"garbage\r\n--xx\r\nno headers",
                           "headers": {"Content-Type": "multipart/form-data; boundary=xx"}},
     (400,)),
]


@pytest.mark.parametrize("name, kw, expected", NON_MULTIPART, ids=[c[0] for c in NON_MULTIPART])
def test_non_multipart_body_is_refused(shared, name, kw, expected):
    before = shared.spool_files()
    headers = {"Authorization": f"Bearer {shared.token('alice')}", **kw.pop("headers", {})}
    r = requests.post(shared.url + "/api/submit", headers=headers, timeout=60, **kw)
    msg = refused(r, *expected)
    if r.status_code == 415:
        assert "multipart/form-data" in msg
    assert shared.spool_files() == before
    still_answers(shared)


def test_upload_over_max_upload_bytes_is_413(make_server):
    server = make_server(max_upload_bytes=4096)
    before = server.spool_files()
    msg = refused(server.submit("#" + "x" * 10_000 + "\nprint(1)\n"), 413)
    assert "4096" in msg
    # Sent chunked, without a Content-Length: still refused.
    body = iter([b"x" * 5000, b"y" * 5000])
    headers = {"Authorization": f"Bearer {server.token()}",
               "Content-Type": "multipart/form-data; boundary=xx"}
    r = requests.post(server.url + "/api/submit", data=body, headers=headers, timeout=60)
    refused(r, 411, 413)
    assert server.spool_files() == before
    still_answers(server)
    # Under the limit is fine.
    sub = server.submit_ok("print(1)\n")
    assert server.wait(sub["job_id"])["status"] == "completed"


def test_upload_far_over_max_upload_bytes_is_413_json(make_server):
    """Well past the limit (beyond the HTTP server's own body cap) the answer is still JSON."""
    server = make_server(max_upload_bytes=4096)
    before = server.spool_files()
    refused(server.submit("#" + "x" * 100_000 + "\nprint(1)\n"), 413)
    assert server.spool_files() == before
    still_answers(server)


def test_plain_form_fields_keep_non_ascii_text(server):
    """Parts sent without a filename (curl -F 'config_file=<config.yaml') are UTF-8 text too."""
    code = "print('café → ok')\n"
    cfg = job_config("alice", 5, project_id="projé→")
    r = server.post("/api/submit", server.token(),
                    files={"code": (None, code), "config_file": (None, cfg)})
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    st = server.wait(job_id)
    assert st["project_id"] == "projé→"
    assert (server.dir / "spool" / "done" / job_id / "code.py").read_text() == code
    assert server.results(job_id)["stdout"] == "café → ok\n"


BAD_IDS = [
    ("unknown", UNKNOWN_ID),
    ("unknown-2", "deadbeef" * 3),
    ("uppercase-hex", "ABCDEF0123456789ABCDEF01"),
    ("short", "ABC"),
    ("dotdot-raw", "../etc"),
    ("dotdot-encoded", "..%2Fetc"),
    ("dotdot-deep", "..%2F..%2F..%2Fetc%2Fpasswd"),
    ("long", "a" * 5000),
    ("nul", "%00"),
    ("nul-suffix", UNKNOWN_ID + "%00"),
    ("latin1", "%ff"),
    ("space", "%20"),
    ("newline", UNKNOWN_ID + "%0A"),
]


@pytest.mark.parametrize("method, route", [("GET", "status"), ("GET", "results"),
                                           ("POST", "cancel")])
@pytest.mark.parametrize("name, job_id", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_unknown_or_malformed_job_id(shared, method, route, name, job_id):
    before = shared.spool_files()
    for token in (shared.token("alice"), shared.token("root", admin=True)):
        status, ctype, body = raw(shared, method, f"/api/{route}/{job_id}",
                                  {"Authorization": f"Bearer {token}", "Content-Length": "0"})
        expected = (404,) if name.startswith("unknown") else (400, 404)
        error_of(status, ctype, body, expected)
    assert shared.spool_files() == before
    still_answers(shared)


JOBS_QUERIES = [
    ("status=bogus", 400, "status"),
    ("status=", 400, "status"),
    ("limit=0", 400, "limit"),
    ("limit=-1", 400, "limit"),
    ("limit=abc", 400, "limit"),
    ("limit=1.5", 400, "limit"),
    ("limit=100000", 400, "limit"),
    ("limit=1001", 400, "limit"),
    ("limit=", 400, "limit"),
    ("limit=%B2", 400, "limit"),          # '²': str.isdigit() says yes, int() says no
    ("limit=%C2%B2", 400, "limit"),
    ("cursor=xyz", 400, "cursor"),
    ("cursor=..%2F..%2Fetc", 400, "cursor"),
    ("cursor=" + "A" * 24, 400, "cursor"),
    ("foo=1", 400, "parameter"),
    ("user_id=alice&page=2", 400, "parameter"),
    ("user_id=bob", 403, "own"),
    ("user_id=", 403, "own"),
]


@pytest.mark.parametrize("query, expected, word", JOBS_QUERIES, ids=[q[0] for q in JOBS_QUERIES])
def test_bad_jobs_query(shared, query, expected, word):
    status, ctype, body = raw(shared, "GET", f"/api/jobs?{query}",
                              {"Authorization": f"Bearer {shared.token('alice')}"})
    assert word in error_of(status, ctype, body, (expected,))
    still_answers(shared)


def test_good_jobs_queries(shared):
    alice, admin = shared.token("alice"), shared.token("root", admin=True)
    for q in ("", "?limit=1", "?limit=1000", "?status=completed", "?user_id=alice",
              f"?cursor={UNKNOWN_ID}", "?status=pending&limit=5&user_id=alice"):
        r = shared.get("/api/jobs" + q, alice)
        assert r.status_code == 200 and r.json() == {"jobs": [], "next_cursor": None}, (q, r.text)
    assert shared.get("/api/jobs?user_id=bob", admin).status_code == 200
    # Authentication comes before query checks: no token, bad query -> 401.
    refused(shared.get("/api/jobs?limit=0"), 401)


ROUTE_ERRORS = [
    ("GET", "/api/nope", 404),
    ("GET", "/api", 404),
    ("GET", "/api/status", 404),
    ("GET", "/api/status/", 404),
    ("GET", "/favicon.ico", 404),
    ("GET", "/api/submit", 405),
    ("PUT", "/api/submit", 405),
    ("POST", "/api/nodes", 405),
    ("POST", "/api/jobs", 405),
    ("DELETE", f"/api/status/{UNKNOWN_ID}", 405),
    ("GET", f"/api/cancel/{UNKNOWN_ID}", 405),
    ("POST", "/openapi.json", 405),
]


@pytest.mark.parametrize("method, path, expected", ROUTE_ERRORS,
                         ids=[f"{m} {p[:30]}" for m, p, _ in ROUTE_ERRORS])
def test_unknown_route_and_wrong_method_are_json(shared, method, path, expected):
    status, ctype, body = raw(shared, method, path, {"Content-Length": "0"})
    error_of(status, ctype, body, (expected,))


# -- 4. OpenAPI ----------------------------------------------------------------

EXPECTED_PATHS = {"/", "/api/submit", "/api/status/{job_id}", "/api/results/{job_id}",
                  "/api/cancel/{job_id}", "/api/nodes", "/api/jobs", "/api/logs/{job_id}",
                  "/api/outputs/{job_id}", "/api/outputs/{job_id}/{path}",
                  "/api/arrays/{array_id}",
                  "/metrics", "/openapi.json", "/docs"}

#: Response codes the tests in this file (and test_api_flow) see from each operation.
SEEN_CODES = {
    ("get", "/"): {200},
    ("post", "/api/submit"): {201, 400, 401, 403, 413, 415},
    ("get", "/api/status/{job_id}"): {200, 401, 404},
    ("get", "/api/results/{job_id}"): {200, 401, 404, 409},
    ("post", "/api/cancel/{job_id}"): {200, 401, 404, 409},
    ("get", "/api/nodes"): {200},
    ("get", "/api/jobs"): {200, 400, 401, 403},
    ("get", "/api/logs/{job_id}"): {200, 400, 404},  # tests/test_client.py
    ("get", "/api/outputs/{job_id}"): {200, 404, 409},  # tests/test_projects.py
    ("get", "/api/arrays/{array_id}"): {200, 404},  # tests/test_pipelines.py
    ("get", "/api/outputs/{job_id}/{path}"): {200, 206, 404},
    ("get", "/metrics"): {200},
    ("get", "/openapi.json"): {200},
    ("get", "/docs"): {200},
}
PUBLIC = {("get", "/"), ("get", "/api/nodes"), ("get", "/metrics"), ("get", "/openapi.json"),
          ("get", "/docs")}


def _server_routes():
    routes = {(m.lower(), re.sub(r"<(\w+)(?::\w+)?>", r"{\1}", p)) for m, p, _ in gpuqueue.Api.ROUTES}
    return routes | {("get", "/docs"), ("get", "/openapi.json")}


def test_openapi_document_matches_the_routes(shared):
    r = requests.get(shared.url + "/openapi.json", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    assert str(doc["openapi"]).startswith("3")
    assert doc["info"]["version"] == gpuqueue.__version__
    assert set(doc["paths"]) == EXPECTED_PATHS
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops
                  if m in ("get", "post", "put", "delete", "patch", "head", "options")}
    assert documented == _server_routes()
    assert set(SEEN_CODES) == documented

    for (method, path), codes in SEEN_CODES.items():
        op = doc["paths"][path][method]
        assert op.get("summary"), (method, path)
        listed = {int(c) for c in op["responses"]}
        assert codes <= listed, (method, path, codes - listed)
        for code, resp in op["responses"].items():
            assert resp.get("description"), (method, path, code)
            for media in resp.get("content", {}).values():
                _resolve(doc, media["schema"])        # every $ref resolves
            if int(code) >= 400:
                schema = resp["content"]["application/json"]["schema"]
                assert _resolve(doc, schema) == doc["components"]["schemas"]["Error"]
        secured = any("bearer" in s for s in op.get("security", []))
        assert secured == ((method, path) not in PUBLIC), (method, path)
        if "{job_id}" in path:  # each {name} in the path is a path parameter, in order
            assert [p["name"] for p in op["parameters"] if p["in"] == "path"] == \
                re.findall(r"{(\w+)}", path)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_docs_page_is_self_contained(shared):
    r = requests.get(shared.url + "/docs", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    html = r.text + requests.get(shared.url + "/docs/init.js", timeout=30).text
    assert "/openapi.json" in html and "<html" in html.lower()
    external = re.findall(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*""", html,
                          re.I)
    external += re.findall(r"""(?:url\(|@import|fetch\()\s*["']?\s*(?:https?:)?//""", html, re.I)
    external += re.findall(r"""fetch\(\s*["']https?:""", html, re.I)
    assert external == [], external


# -- 5. real answers against the document's schemas ---------------------------


def _resolve(doc, schema):
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name):
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(doc, schema, value, where="$"):
    """The few JSON Schema words the document uses: $ref, type, required, properties,
    items, enum, const, format date-time.  Also: no keys the schema does not describe."""
    schema = _resolve(doc, schema)
    if "type" in schema:
        types = [schema["type"]] + (["null"] if schema.get("nullable") else [])
        assert any(_is_type(value, t) for t in types), f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{where}: {value!r} != {schema['const']!r}"
    if schema.get("format") == "date-time" and isinstance(value, str):
        assert value.endswith("Z"), f"{where}: {value!r}"
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dict) and "properties" in schema:
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{where}: missing {sorted(missing)}"
        undocumented = set(value) - set(schema["properties"])
        assert not undocumented, f"{where}: undocumented keys {sorted(undocumented)}"
        for key, sub in schema["properties"].items():
            if key in value:
                validate(doc, sub, value[key], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(doc, schema["items"], item, f"{where}[{i}]")


def check(doc, r, method, path):
    """Validate response ``r`` against what the document says ``method path`` answers."""
    resp = doc["paths"][path][method]["responses"][str(r.status_code)]
    schema = resp["content"]["application/json"]["schema"]
    validate(doc, schema, r.json())


def test_real_answers_match_the_schemas(make_server):
    server = make_server(nodes=1)
    doc = server.get("/openapi.json").json()
    alice, admin = server.token("alice"), server.token("root", admin=True)

    running = server.post("/api/submit", alice, files=upload(SLEEPER))
    check(doc, running, "post", "/api/submit")
    running = running.json()
    pending = server.post("/api/submit", alice, files=upload("print('hi')\n"))
    check(doc, pending, "post", "/api/submit")
    pending = pending.json()
    server.wait(running["job_id"], ("running",))

    r = server.get(f"/api/status/{pending['job_id']}", alice)
    check(doc, r, "get", "/api/status/{job_id}")
    assert r.json()["status"] == "pending" and r.json()["queue_position"] == 0
    r = server.get(f"/api/status/{running['job_id']}", alice)
    check(doc, r, "get", "/api/status/{job_id}")
    assert r.json()["started_at"] is not None

    nodes = server.get("/api/nodes")
    check(doc, nodes, "get", "/api/nodes")
    assert nodes.json()["nodes"][0]["running_job"] == running["job_id"]
    check(doc, server.get("/"), "get", "/")
    check(doc, server.get("/api/jobs?limit=1", alice), "get", "/api/jobs")

    check(doc, server.get(f"/api/results/{running['job_id']}", alice), "get",
          "/api/results/{job_id}")                                              # 409
    r = server.post(f"/api/cancel/{running['job_id']}", admin)
    check(doc, r, "post", "/api/cancel/{job_id}")
    assert r.json()["cancel_requested"]
    server.wait(running["job_id"], token=admin)
    server.wait(pending["job_id"])

    for job_id in (running["job_id"], pending["job_id"]):
        check(doc, server.get(f"/api/status/{job_id}", alice), "get", "/api/status/{job_id}")
        check(doc, server.get(f"/api/results/{job_id}", alice), "get", "/api/results/{job_id}")
        check(doc, server.get(f"/api/outputs/{job_id}", alice), "get", "/api/outputs/{job_id}")
    page = server.get("/api/jobs", admin)
    check(doc, page, "get", "/api/jobs")
    assert len(page.json()["jobs"]) == 2
    check(doc, server.get("/api/nodes"), "get", "/api/nodes")

    # Errors, too.
    check(doc, server.get(f"/api/status/{UNKNOWN_ID}", alice), "get", "/api/status/{job_id}")
    check(doc, server.get("/api/jobs"), "get", "/api/jobs")
    check(doc, server.get("/api/jobs?limit=0", alice), "get", "/api/jobs")
    check(doc, server.post(f"/api/cancel/{pending['job_id']}", alice), "post",
          "/api/cancel/{job_id}")                                               # 409
    check(doc, server.post("/api/submit", alice, json={}), "post", "/api/submit")  # 415
