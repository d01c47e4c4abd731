"""Drive headless Chromium through the DevTools protocol over a pipe (no extra package).

``chromium --remote-debugging-pipe`` reads protocol commands (JSON, each ended by a NUL
byte) on its file descriptor 3 and writes answers and events on 4. That is enough to open
a page, set a file input (a real upload, as a person choosing a file), read the page's
state, collect console errors and take a screenshot. Used by the service's browser test
and by ``tests/support/service_screenshot.py``.

>>> with Browser("/usr/bin/chromium") as page:
...     page.navigate("http://127.0.0.1:8000/")
...     page.set_files("#photo-input", ["photo.jpg"])
...     page.wait_for("document.getElementById('status').dataset.state === 'done'")
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe")


def _pipe_above_4() -> tuple[int, int]:
    """A pipe (read end, write end) whose descriptors are both above 4, so moving them to 3 and 4
    in the child never overwrites one with the other or leaves one close-on-exec."""
    ends = []
    for end in os.pipe():
        ends.append(fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(end)
    return ends[0], ends[1]


class BrowserError(RuntimeError):
    """Chromium answered a command with an error, or did not answer in time."""


class Browser:
    """One headless Chromium with one page; a context manager that closes it.

    console_errors: console.error calls, uncaught exceptions and error log entries (failed
    loads) seen so far, as text.
    """

    def __init__(self, chromium: str, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.timeout = timeout
        self.console_errors: list[str] = []
        self._profile = tempfile.TemporaryDirectory(prefix="delf-chromium-")
        commands_read, self._commands = _pipe_above_4()
        self._answers, answers_write = _pipe_above_4()

        def as_fds_3_and_4() -> None:  # runs in the child before exec; dup2 to another number clears close-on-exec
            os.dup2(commands_read, 3)
            os.dup2(answers_write, 4)

        args = [chromium, *FLAGS, f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}",
                "about:blank"]
        self._process = subprocess.Popen(args, preexec_fn=as_fds_3_and_4, close_fds=False,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(answers_write)
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self._arrived = threading.Condition()
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",  # the viewport itself, whatever the window's frame takes
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._call("Browser.close", timeout=10)
        except (BrowserError, OSError):
            self._process.kill()
        self._process.wait(timeout=30)
        os.close(self._commands)
        self._profile.cleanup()

    # ------------------------------------------------------------ protocol

    def call(self, method: str, params: dict | None = None) -> dict:
        """A command to the page's session; returns its result."""
        return self._call(method, params, session=True)

    def _call(self, method: str, params: dict | None = None, session: bool = False,
              timeout: float | None = None) -> dict:
        self._next_id += 1
        number = self._next_id
        message = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._arrived:
            while number not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._process.poll() is not None:
                    raise BrowserError(f"no answer from Chromium to {method}")
                self._arrived.wait(left)
            reply = self._replies.pop(number)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def _read(self) -> None:
        """Background reader: answers by id, events into the event list and console errors."""
        buffer = b""
        while chunk := os.read(self._answers, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                with self._arrived:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self._note_event(message)
                    self._arrived.notify_all()
        os.close(self._answers)

    def _note_event(self, event: dict) -> None:
        self._events.append(event)
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif event.get("method") == "Runtime.exceptionThrown":
            self.console_errors.append(params["exceptionDetails"].get("text", "exception"))
        elif event.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.console_errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}".strip())

    # ------------------------------------------------------------ page actions

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait until its load event."""
        self._events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float | None = None) -> None:
        """Poll a JavaScript condition until it is true; BrowserError after ``timeout`` seconds."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.evaluate(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {condition}")
            time.sleep(0.1)

    def set_files(self, selector: str, files: list[str | Path]) -> None:
        """Choose ``files`` in the file input at ``selector`` (fires its change event)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise BrowserError(f"no element matches {selector!r}")
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(Path(f).resolve()) for f in files]})

    def screenshot(self, path: str | Path) -> Path:
        """The page's viewport at ``path``: JPEG (quality 85) for a .jpg name, else PNG."""
        jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
        options = {"format": "jpeg", "quality": 85} if jpeg else {"format": "png"}
        data = self.call("Page.captureScreenshot", options)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
