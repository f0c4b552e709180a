"""`make screenshot`: take the README's picture of the dashboard (docs/dashboard.png)
from the real dashboard, in headless Chromium, against a real server on 127.0.0.1
with four local nodes and jobs pending, running and finished, so that it can be taken
again whenever the dashboard changes."""
import sys
import tempfile
import time
from pathlib import Path

from browser import Browser
from conftest import ROOT, Server, job_config, kill_processes_under, wait_for


def main(out):
    root = Path(tempfile.mkdtemp(prefix="gpuqueue-screenshot-"))
    server = Server(root / "server", nodes=[{"id": n, "host": "local", "gpus": gpus}
                                            for n, gpus in ((0, "0,1"), (1, "2,3"), (2, "4"),
                                                            (3, "5"))]).start()
    browser = Browser(root / "chromium-profile")
    try:
        alice, bob = server.token("alice"), server.token("bob")
        for code, user, seconds, extra in (
                ("print('loss 0.213')\n", "alice", 60, {}),
                ("import sys\nsys.exit(3)\n", "bob", 60, {}),
                ("import time\ntime.sleep(600)\n", "alice", 1800, {"gpus": 2}),
                ("import time\ntime.sleep(600)\n", "bob", 900, {}),
                ("import time\ntime.sleep(600)\n", "alice", 1200, {}),
                ("import time\ntime.sleep(600)\n", "bob", 600, {"gpus": 2}),
                ("import time\ntime.sleep(600)\n", "alice", 300, {}),
                ("import time\ntime.sleep(600)\n", "bob", 3600, {})):
            server.submit_ok(code, token=alice if user == "alice" else bob,
                             config=job_config(user, seconds, **extra))
            time.sleep(0.3)
        wait_for(lambda: sum(len(n["running_jobs"])
                             for n in server.get("/api/nodes").json()["nodes"]) >= 4,
                 "four jobs running", timeout=60)
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=820,
                     deviceScaleFactor=1, mobile=False)
        browser.open(server.url + "/ui")
        browser.type("#token", server.token("root", admin=True))
        browser.click("#save")
        browser.wait("document.querySelectorAll('#jobs tbody tr').length >= 8")
        time.sleep(1)  # the next refresh: every figure filled in
        browser.screenshot(out)
    finally:
        browser.close()
        server.kill()
        kill_processes_under(root)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "dashboard.png"))
