"""The dashboard at /ui, in real headless Chromium (Debian's package, installed by
`make test`) against a real server: enter the token once, watch a job go pending ->
running -> completed, follow a job's live output and cancel it from its page."""
import json
import re
import time

from conftest import job_config


def gate_job(tmp_path, name, text="done"):
    """A job that waits for the test to create a file; its path, and the code."""
    gate = tmp_path / f"{name}.gate"
    return gate, (f"import os, time\nprint('waiting for {name}', flush=True)\n"
                  f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)\nprint({text!r})\n")


def row_status(browser, job_id):
    return browser.text(f'#jobs tr[data-job="{job_id}"] td.status')


def wait_row(browser, job_id, status):
    browser.wait(f"(e => e && e.textContent === {json.dumps(status)})"
                 f"(document.querySelector('#jobs tr[data-job=\"{job_id}\"] td.status'))")


def test_token_once_then_watch_a_job_go_pending_running_completed(make_server, browser, tmp_path):
    server = make_server(nodes=1)
    browser.open(server.url + "/ui")
    # Rendered by the server: the node is there before any token.
    assert browser.eval("document.querySelectorAll('#nodes tbody tr').length") == 1
    assert "online" in browser.text("#nodes tbody tr")
    assert "Enter your token" in browser.text("#error")

    browser.type("#token", server.token())
    browser.click("#save")
    browser.wait("document.querySelector('#who').textContent === 'token set'")
    assert browser.eval("localStorage.getItem('gpuqueue.token')") == server.token()

    first_gate, first = gate_job(tmp_path, "first")
    second_gate, second = gate_job(tmp_path, "second", "second done")
    a = server.submit_ok(first)
    server.wait(a["job_id"], ("running",))
    b = server.submit_ok(second)
    wait_row(browser, b["job_id"], "pending")
    assert browser.text(f'#jobs tr[data-job="{b["job_id"]}"] td:nth-child(5)').startswith("next")
    wait_row(browser, a["job_id"], "running")
    first_gate.write_text("go")
    wait_row(browser, b["job_id"], "running")
    wait_row(browser, a["job_id"], "completed")
    second_gate.write_text("go")
    wait_row(browser, b["job_id"], "completed")

    # The token stays: a reload shows the jobs without asking again.
    browser.open(server.url + "/ui")
    wait_row(browser, b["job_id"], "completed")
    # Each row links to the job's page, which shows its output.
    browser.click(f'#jobs tr[data-job="{b["job_id"]}"] a')
    browser.wait(f"location.pathname === '/ui/job/{b['job_id']}'")
    browser.wait("document.querySelector('#stdout').textContent === 'waiting for second\\nsecond done\\n'")
    assert browser.text("#job-status") == "completed"
    assert browser.eval("document.querySelector('#cancel').hidden") is True


def test_job_page_shows_live_output_and_cancels(make_server, browser, tmp_path):
    server = make_server(nodes=1)
    hostile = "<img src=x onerror=\"document.title='owned'\">"
    gate = tmp_path / "more.gate"
    sub = server.submit_ok(f"import os, time\nprint({hostile!r}, flush=True)\n"
                           f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)\n"
                           "print('more', flush=True)\ntime.sleep(120)\n", expected_time=300)
    server.wait(sub["job_id"], ("running",))
    browser.open(server.url + f"/ui/job/{sub['job_id']}")
    browser.type("#token", server.token())
    browser.click("#save")
    browser.wait("document.querySelector('#job-status') && "
                 "document.querySelector('#job-status').textContent === 'running'")
    # Live output, read from the node while the job runs; shown as text, never as HTML.
    browser.wait(f"document.querySelector('#stdout').textContent === {json.dumps(hostile + chr(10))}")
    assert browser.eval("document.querySelector('#stdout img')") is None
    assert browser.eval("document.title") != "owned"
    # Refreshes that overlap (a click beside the timer, a slow server) add new output once:
    # with every request slowed, three asked for at once would each read the same offset.
    browser.eval("window.realFetch = window.fetch; window.fetch = (...a) => new Promise("
                 "r => setTimeout(r, 700)).then(() => window.realFetch(...a)); true")
    browser.eval("refresh(); refresh(); refresh(); true")
    gate.write_text("go")
    browser.wait("document.querySelector('#stdout').textContent.endsWith('more\\n')")
    browser.eval("new Promise(r => setTimeout(() => r(true), 1500))")  # what else was under way
    browser.eval("window.fetch = window.realFetch; true")
    assert browser.text("#stdout") == hostile + "\nmore\n"

    browser.click("#cancel")
    browser.wait("document.querySelector('#job-status').textContent === 'cancelled'")
    assert server.status(sub["job_id"])["status"] == "cancelled"
    assert browser.text("#job-error") == "cancelled while running"


def test_a_wrong_token_and_someone_elses_job_show_errors(make_server, browser):
    server = make_server(nodes=1)
    sub = server.submit_ok("print('bob was here')\n", user="bob")
    browser.open(server.url + f"/ui/job/{sub['job_id']}")
    browser.type("#token", "not-a-real-token-0123456789")
    browser.click("#save")
    # Refused: the page forgets the token at once and asks for another.
    browser.wait("document.querySelector('#error').textContent.includes('enter a new token')")
    assert browser.eval("document.querySelector('#forget').hidden") is True
    assert browser.text("#who") == "no token"
    browser.type("#token", server.token("alice"))
    browser.click("#save")
    browser.wait("document.querySelector('#error').textContent === 'no such job'")
    assert browser.text("#stdout") == ""


def test_the_page_needs_nothing_from_elsewhere(make_server):
    server = make_server(nodes=1)
    r = server.get("/ui")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", r.text)
    nonces = set(re.findall(r'nonce="([^"]+)"', r.text))
    assert len(nonces) == 1 and f"'nonce-{nonces.pop()}'" in csp
    assert server.get("/ui").headers["Content-Security-Policy"] != csp  # a new nonce each time
    assert server.get("/ui/job/not-a-job").status_code == 404


def test_a_revoked_token_stops_the_polling_and_asks_for_a_new_one(make_server, browser):
    server = make_server(nodes=1)
    token = server.token("carol")
    browser.open(server.url + "/ui")
    browser.type("#token", token)
    browser.click("#save")
    browser.wait("document.querySelector('#who').textContent === 'token set'")
    server.cli("tokens", "revoke", token)
    browser.wait("document.querySelector('#who').textContent === 'no token'")
    assert "token revoked" in browser.text("#error") and "new token" in browser.text("#error")
    assert browser.eval("localStorage.getItem('gpuqueue.token')") is None
    refused = server.log().count("401 user=-")
    time.sleep(4.5)  # two of the page's refresh periods: nothing may happen in them
    assert server.log().count("401 user=-") == refused, "the page kept presenting the token"


def test_an_array_is_one_row_that_opens_and_a_jobs_files_are_listed(make_server, browser):
    server = make_server(nodes=2)
    token = server.token()
    arr = server.submit("import os\nopen(os.path.join(os.environ['GPUQUEUE_OUTPUT_DIR'], "
                        "'r.txt'), 'w').write('r')\n", config=job_config(array=3)).json()
    for job_id in arr["job_ids"]:
        server.wait(job_id)
    browser.open(server.url + "/ui")
    browser.type("#token", token)
    browser.click("#save")
    head = f'#jobs tr[data-array="{arr["array_id"]}"]'
    browser.wait(f"!!document.querySelector('{head}')")
    assert "3 jobs: 3 completed" in browser.text(head)
    assert browser.eval("document.querySelectorAll('#jobs tr[data-job]').length") == 0
    browser.click(f"{head} button")
    browser.wait("document.querySelectorAll('#jobs tr[data-job]').length === 3")
    # A job's page lists its files, each a link.
    browser.click(f'#jobs tr[data-job="{arr["job_ids"][0]}"] a')
    browser.wait("document.querySelectorAll('#files tbody tr').length === 1")
    assert "r.txt" in browser.text("#files tbody tr") and browser.text("#files-state") == "complete"
