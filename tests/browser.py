"""Headless Chromium for the dashboard tests, driven over the DevTools protocol on a
pipe (--remote-debugging-pipe): no port is opened, so nothing listens anywhere.

Clicks and typing go through Input.* events, as a person's would; reads go
through Runtime.evaluate.
"""
import base64
import json
import os
import subprocess
import sys
import threading
import time

# The binary itself, not Debian's /usr/bin/chromium launcher script (which closes fds 3 and 4).
CHROMIUM = "/usr/lib/chromium/chromium"


class Browser:
    def __init__(self, profile_dir):
        if not os.path.exists(CHROMIUM):
            raise RuntimeError("chromium is missing: `make test` installs it (apt-get install chromium)")
        os.makedirs(profile_dir, exist_ok=True)
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={profile_dir}", "--window-size=1280,900", "about:blank"]
        # The pipe must be fds 3 and 4 in chromium: a two-line trampoline puts it there.
        trampoline = ("import os, sys\nos.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4)\n"
                      "os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(to_chrome_r), str(from_chrome_w), *args],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(profile_dir, "chromium.log"), "wb"))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._answers = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _read(self):
        buf = b""
        while True:
            data = os.read(self._from_chrome, 65536)
            if not data:
                break
            buf += data
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._answers[msg["id"]] = msg
                        self._cond.notify_all()
        with self._cond:
            self._answers[None] = {"error": {"message": "chromium went away"}}
            self._cond.notify_all()

    def _call(self, method, session=None, **params):
        with self._cond:
            self._next_id += 1
            i = self._next_id
        msg = {"id": i, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        with self._cond:
            assert self._cond.wait_for(lambda: i in self._answers or None in self._answers, 30), method
            answer = self._answers.pop(i, None) or self._answers[None]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def call(self, method, **params):
        return self._call(method, self.session, **params)

    # -- what a test does ------------------------------------------------------

    def open(self, url):
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && location.href === " + json.dumps(url))

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, timeout=30):
        """Poll a JavaScript expression until it is truthy (a generous bound)."""
        end = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            assert time.monotonic() < end, f"timed out waiting for {expression}; page text: " \
                                           f"{self.eval('document.body.innerText')!r}"
            time.sleep(0.1)

    def text(self, selector):
        return self.eval(f"(e => e ? e.textContent : null)(document.querySelector({json.dumps(selector)}))")

    def click(self, selector):
        """A real mouse click in the middle of the element, scrolled into view first
        (as a person scrolls to it: a click outside the window reaches nothing)."""
        self.wait(f"(e => e ? (e.scrollIntoView({{block: 'center'}}), true) : false)"
                  f"(document.querySelector({json.dumps(selector)}))")
        box = self.wait(f"(e => {{ if (!e || e.hidden) return null; const r = e.getBoundingClientRect();"
                        f" return r.width ? {{x: r.x + r.width / 2, y: r.y + r.height / 2}} : null; }})"
                        f"(document.querySelector({json.dumps(selector)}))")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"],
                      button="left", clickCount=1)

    def type(self, selector, text):
        self.click(selector)
        self.call("Input.insertText", text=text)

    def set_files(self, selector, *paths):
        """Choose files for the file inputs that ``selector`` matches, in order, as a
        person does in the file dialog (DOM.setFileInputFiles, which fires the
        inputs' change events)."""
        root = self.call("DOM.getDocument", depth=0)["root"]["nodeId"]
        nodes = self.call("DOM.querySelectorAll", nodeId=root, selector=selector)["nodeIds"]
        assert len(nodes) == len(paths), f"{selector}: {len(nodes)} inputs for {len(paths)} files"
        for node, path in zip(nodes, paths):
            self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self._call("Browser.close")
        except (RuntimeError, AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
