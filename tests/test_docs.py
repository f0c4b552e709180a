"""The API's documentation: /openapi.json is a valid OpenAPI document whose numbers
come from the code's own tables and the server's config, and /docs is Swagger UI,
served from this server alone, in which a person can really try the API out
(headless Chromium against a real server)."""
import json
import re
import socket
import sys

import requests
from openapi_spec_validator import validate

from conftest import ROOT, job_config

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402  (its constants: what the document must say)

#: Every route the server has, as Swagger UI lists it.
ROUTES = [("get", "/"), ("post", "/api/submit"), ("get", "/api/status/{job_id}"),
          ("get", "/api/results/{job_id}"), ("post", "/api/cancel/{job_id}"),
          ("get", "/api/nodes"), ("get", "/api/jobs"), ("get", "/api/logs/{job_id}"),
          ("get", "/metrics")]
ASSETS = ("/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js", "/docs/init.js")


def walk(node):
    """Every dict in a JSON document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# -- /openapi.json -------------------------------------------------------------------


def test_the_document_is_valid_openapi(make_server):
    server = make_server(nodes=1)
    r = server.get("/openapi.json")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    validate(doc)  # raises on any fault
    assert doc["info"]["version"] == gpuqueue.__version__
    for method, path in ROUTES:
        assert method in doc["paths"][path], (method, path)


def test_the_documents_numbers_are_the_codes_and_the_configs(make_server):
    server = make_server(nodes=1, max_expected_time=1234)
    doc = server.get("/openapi.json").json()

    job_config_schema = doc["components"]["schemas"]["JobConfig"]
    assert set(job_config_schema["properties"]) == set(gpuqueue.JOB_KEYS)
    assert job_config_schema["additionalProperties"] is False
    assert sorted(job_config_schema["required"]) == sorted(
        k for k, spec in gpuqueue.JOB_KEYS.items() if spec["config"] == "required")
    priority = job_config_schema["properties"]["priority"]
    assert (priority["minimum"], priority["maximum"]) == gpuqueue.key_bounds(
        gpuqueue.JOB_KEYS["priority"], gpuqueue.load_config())
    expected_time = job_config_schema["properties"]["expected_time"]
    assert expected_time["maximum"] == 1234  # this server's max_expected_time, not the default
    assert "1234" in json.dumps(expected_time)

    params = {p["name"]: p for p in doc["paths"]["/api/jobs"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == gpuqueue.PAGE_MAX
    assert params["limit"]["schema"]["default"] == gpuqueue.PAGE_DEFAULT

    # Every pattern the document gives is the job id's, and a real job id matches it.
    patterns = {d["pattern"] for d in walk(doc) if isinstance(d.get("pattern"), str)}
    assert patterns == {f"^{gpuqueue.JOB_ID_PATTERN}$"}
    job_id = server.submit_ok("print('hi')\n")["job_id"]
    assert re.fullmatch(gpuqueue.JOB_ID_PATTERN, job_id)
    assert re.search(patterns.pop(), job_id)
    assert not re.search(f"^{gpuqueue.JOB_ID_PATTERN}$", job_id + "0")


def test_the_documented_limits_are_the_ones_the_server_enforces(make_server):
    """The bounds the document gives are where the server really draws its lines."""
    server = make_server(nodes=1, max_expected_time=1234)
    props = server.get("/openapi.json").json()["components"]["schemas"]["JobConfig"]["properties"]
    top, (lo, hi) = props["expected_time"]["maximum"], (props["priority"]["minimum"],
                                                        props["priority"]["maximum"])
    admin = server.token("root", admin=True)
    ok = [job_config("alice", top), job_config("root", 1, priority=hi),
          job_config("alice", 1, priority=lo)]
    bad = [job_config("alice", top + 1), job_config("root", 1, priority=hi + 1),
           job_config("alice", 1, priority=lo - 1)]
    for cfg in ok:
        token = admin if "root" in cfg else None
        assert server.submit("print(1)\n", config=cfg, token=token).status_code == 201, cfg
    for cfg in bad:
        token = admin if "root" in cfg else None
        r = server.submit("print(1)\n", config=cfg, token=token)
        assert r.status_code == 400, (cfg, r.text)
    r = server.get(f"/api/jobs?limit={gpuqueue.PAGE_MAX}", server.token())
    assert r.status_code == 200
    assert server.get(f"/api/jobs?limit={gpuqueue.PAGE_MAX + 1}", server.token()).status_code == 400


# -- /docs over plain HTTP --------------------------------------------------------------


def test_docs_are_served_from_this_server_alone(make_server):
    server = make_server(nodes=1)
    page = server.get("/docs")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    for asset in ASSETS:
        r = server.get(asset)
        assert r.status_code == 200, asset
        assert asset.rsplit("/", 1)[1] in page.text, asset  # the page uses each
        assert len(r.content) > 0
    assert server.get("/docs/swagger-ui.css").headers["Content-Type"].startswith("text/css")
    assert "javascript" in server.get("/docs/swagger-ui-bundle.js").headers["Content-Type"]
    # Nothing the page loads or runs first names another host.
    for text in (page.text, server.get("/docs/init.js").text):
        assert not re.search(r"https?://", text), text
        assert not re.search(r"""(?:src|href|url)\s*[=:]\s*["']?//""", text), text
    csp = page.headers.get("Content-Security-Policy", "")
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    init = server.get("/docs/init.js").text
    assert '"/openapi.json"' in init


def test_unknown_docs_files_and_path_tricks_are_404s(make_server):
    server = make_server(nodes=1)
    source = (ROOT / "gpuqueue.py").read_text()
    for path in ("/docs/xyz", "/docs/index.html", "/docs/swagger-initializer.js",
                 "/docs/..%2Fgpuqueue.py", "/docs/..%2F..%2Fgpuqueue.py",
                 "/docs/%2e%2e%2fgpuqueue.py", "/docs/..%5cgpuqueue.py",
                 "/docs/swagger-ui-bundle.js.map"):
        r = server.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert r.headers["Content-Type"].startswith("application/json"), path
        assert set(r.json()) == {"error"}, path
        assert "__version__" not in r.text and "def " not in r.text, path
    # Also raw, as a client that does not normalise the path would send it.
    host, port = server.url.split("//")[1].split(":")
    for target in ("/docs/../gpuqueue.py", "/docs/..%2Fgpuqueue.py", "/docs/%2e%2e/gpuqueue.py"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.split()[1] in (b"400", b"404"), (target, head)
        assert source[:2000].encode() not in body and b"import " not in body, target


# -- /docs in a real browser ------------------------------------------------------------


def open_docs(server, browser):
    """/docs rendered by Swagger UI: its operations listed."""
    browser.open(server.url + "/docs")
    browser.wait("document.querySelectorAll('.opblock').length > 0 || "
                 "document.body.innerText.includes('Unable to render')", timeout=60)
    problem = browser.eval("document.body.innerText.includes('Unable to render') ? "
                           "document.body.innerText : null")
    assert problem is None, f"Swagger UI could not render /openapi.json: {problem}"


def opblock(method, path):
    """The CSS selector of the operation's block in Swagger UI."""
    return (f".opblock.opblock-{method}:has(.opblock-summary-path[data-path={json.dumps(path)}])")


def authorize(browser, token):
    browser.eval(f"window.ui.preauthorizeApiKey('bearer', {json.dumps(token)}), true")
    assert browser.eval("window.ui.authSelectors.authorized().toJS().bearer.value") == token


def execute(browser, op):
    """Expand ``op``, put it in try-it-out mode (already on here), run it; the status
    and body Swagger UI then shows."""
    if not browser.eval(f"!!document.querySelector({json.dumps(op + ' .opblock-body')})"):
        browser.click(op + " .opblock-summary")
    browser.wait(f"!!document.querySelector({json.dumps(op + ' .opblock-body')})")
    try_it = op + " .try-out__btn:not(.cancel):not(.reset)"  # "Try it out" (else "Cancel")
    if browser.eval(f"!!document.querySelector({json.dumps(try_it)})"):
        browser.click(try_it)
    browser.wait(f"!!document.querySelector({json.dumps(op + ' .execute')})")


def response_shown(browser, op):
    cell = op + " .live-responses-table .response .response-col_status"
    browser.wait(f"!!document.querySelector({json.dumps(cell)})", timeout=60)
    status = browser.text(cell).strip()
    body = browser.text(op + " .live-responses-table .response-col_description pre.microlight,"
                             f" {op} .live-responses-table .response-col_description pre")
    return status, body


def test_docs_render_every_route(make_server, browser):
    server = make_server(nodes=1)
    open_docs(server, browser)
    browser.wait("document.querySelectorAll('.opblock').length >= %d" % len(ROUTES))
    shown = browser.eval("[...document.querySelectorAll('.opblock')].map(e => "
                         "[e.querySelector('.opblock-summary-method').textContent.toLowerCase(), "
                         "e.querySelector('.opblock-summary-path').getAttribute('data-path')])")
    for method, path in ROUTES:
        assert [method, path] in shown, (method, path, shown)
    assert browser.eval(f"document.querySelectorAll({json.dumps(opblock('post', '/api/submit'))}).length") == 1
    # The models section lists the JobConfig schema.
    assert "JobConfig" in browser.eval("document.body.innerText")


def test_try_it_out_submits_a_job_with_two_files(make_server, browser, tmp_path):
    server = make_server(nodes=1)
    token = server.token()
    code = tmp_path / "job.py"
    code.write_text("print('hello from the docs page')\n")
    config = tmp_path / "config.yaml"
    config.write_text(job_config("alice", 30))
    open_docs(server, browser)
    authorize(browser, token)
    op = opblock("post", "/api/submit")
    execute(browser, op)
    browser.wait(f"document.querySelectorAll({json.dumps(op + ' input[type=file]')}).length === 2")
    names = browser.eval(f"[...document.querySelectorAll({json.dumps(op + ' input[type=file]')})]"
                         ".map(e => e.closest('tr').querySelector('.parameter__name').textContent)")
    assert [n.split()[0].rstrip("*\xa0") for n in names] == ["code", "config_file"], names
    browser.set_files(op + " input[type=file]", code, config)
    browser.click(op + " .execute")
    status, body = response_shown(browser, op)
    assert status == "201", f"the UI showed {status}: {body}"
    job_id = json.loads(body)["job_id"]
    # The job is real: the server has it, under alice, and it runs to its end.
    st = server.status(job_id)
    assert st["user_id"] == "alice"
    assert server.wait(job_id)["status"] == "completed"
    assert server.results(job_id)["stdout"] == "hello from the docs page\n"


def test_try_it_out_reads_a_jobs_status(make_server, browser):
    server = make_server(nodes=1)
    token = server.token()
    job_id = server.submit_ok("print('over plain HTTP')\n")["job_id"]
    server.wait(job_id)
    open_docs(server, browser)
    op = opblock("get", "/api/status/{job_id}")
    # Without a token the server says 401, and the UI shows it.
    execute(browser, op)
    browser.type(op + " input[placeholder=job_id]", job_id)
    browser.click(op + " .execute")
    status, body = response_shown(browser, op)
    assert status == "401", body
    # With one, the job.
    authorize(browser, token)
    browser.click(op + " .btn-clear")
    browser.wait(f"!document.querySelector({json.dumps(op + ' .live-responses-table')})")
    browser.click(op + " .execute")
    status, body = response_shown(browser, op)
    assert status == "200", body
    shown = json.loads(body)
    assert shown["job_id"] == job_id and shown["status"] == "completed"
    assert shown == requests.get(f"{server.url}/api/status/{job_id}",
                                 headers={"Authorization": f"Bearer {token}"}, timeout=30).json()


def test_an_upload_with_a_browsers_boundary_is_accepted(make_server):
    """Browsers choose multipart boundaries with capitals (Chromium:
    ----WebKitFormBoundary + mixed case); a boundary is case-sensitive, so the
    server must use it as sent: this is what try-it-out and any HTML form send."""
    server = make_server(nodes=1)
    for boundary in ("----WebKitFormBoundaryAbCdEfGh12345678", "0123abcdef"):
        body = b""
        for name, data in (("code", b"print('ok')\n"), ("config_file", job_config().encode())):
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                     f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                     ).encode() + data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        r = requests.post(server.url + "/api/submit", data=body, timeout=60,
                          headers={"Authorization": f"Bearer {server.token()}",
                                   "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 201, (boundary, r.text)
        assert server.wait(r.json()["job_id"])["status"] == "completed"
