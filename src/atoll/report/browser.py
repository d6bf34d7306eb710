"""Open a page in headless Chromium and talk to it over the Chrome DevTools protocol.

The protocol runs over a pipe (``--remote-debugging-pipe``: Chromium reads NUL-terminated JSON
commands on fd 3 and writes responses and events on fd 4), so no websocket client and no
Playwright download is needed: Debian's ``chromium`` package is enough. Used by `atoll report
--screenshot` and by the report's browser test (which checks script errors, plots and lanes).

Chromium runs with ``--no-sandbox`` when we are root (its sandbox refuses root), in a temporary
profile that is removed afterwards. Every wait has a deadline; `BrowserError` says what failed.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll.errors import AtollError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class BrowserError(AtollError):
    """Chromium is missing, did not start, or did not answer in time."""


def find_chromium() -> str | None:
    """The path of a Chromium-family browser ($ATOLL_CHROMIUM first), or None."""
    given = os.environ.get("ATOLL_CHROMIUM")
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    """What a page did while it loaded: uncaught exceptions, console errors, and the value of
    the expression the caller asked to evaluate."""

    exceptions: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    value: Any = None

    @property
    def errors(self) -> list[str]:
        return self.exceptions + self.console_errors


class DevTools:
    """A headless Chromium and one page target, driven over the DevTools pipe. Use as a context
    manager; `command` blocks until the answer (or `timeout_seconds`)."""

    def __init__(self, *, width: int = 1240, height: int = 900, timeout_seconds: float = 60.0) -> None:
        exe = find_chromium()
        if exe is None:
            raise BrowserError(
                "no Chromium found: install Debian's chromium (`make debian-deps` as root) or set ATOLL_CHROMIUM"
            )
        self.timeout = timeout_seconds
        self._profile = tempfile.mkdtemp(prefix="atoll-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        argv = [
            exe,
            "--headless",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
        ]
        if os.geteuid() == 0:
            argv.append("--no-sandbox")
        # The child must find the pipe on fds 3 and 4: moved there after fork. close_fds stays
        # off because it would close them; our other descriptors are close-on-exec (PEP 446).
        self._proc = subprocess.Popen(
            argv + ["about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=_dup_to(to_child_r, from_child_w),
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def __enter__(self) -> DevTools:
        targets = self.command("Target.getTargets")["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        target = page["targetId"] if page else self.command("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.command(f"{domain}.enable", session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send({"id": -1, "method": "Browser.close"})
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._to_child, json.dumps(message).encode() + b"\0")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer within {self.timeout:.0f} s")
            ready, _, _ = select.select([self._from_child], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed the DevTools pipe (exit code {self._proc.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)  # type: ignore[no-any-return]

    def command(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and wait for its result; events that arrive meanwhile are
        kept in `events`. Raises BrowserError on a protocol error or a timeout."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self._send(msg)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"DevTools {method}: {reply['error'].get('message')}")
                return reply.get("result", {})  # type: ignore[no-any-return]
            if "method" in reply:
                self.events.append(reply)

    def wait_for_event(self, method: str) -> dict[str, Any]:
        """Block until the page sends `method` (or one already arrived)."""
        for i, event in enumerate(self.events):
            if event["method"] == method:
                return self.events.pop(i)
        deadline = time.monotonic() + self.timeout
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            if "method" in event:
                self.events.append(event)

    def open(self, path: Path, *, expression: str | None = None) -> PageResult:
        """Load the file at `path`, wait for its load event, evaluate `expression` (by value)."""
        self.events.clear()
        self.command("Page.navigate", session=True, url=Path(path).resolve().as_uri())
        self.wait_for_event("Page.loadEventFired")
        result = PageResult()
        if expression is not None:
            answer = self.command(
                "Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True
            )
            if "exceptionDetails" in answer:
                result.exceptions.append(f"evaluating the check: {answer['exceptionDetails'].get('text')}")
            result.value = answer.get("result", {}).get("value")
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                result.exceptions.append(str(text))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                result.console_errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                result.console_errors.append(str(params["entry"].get("text")))
        return result

    def screenshot(self, out: Path, *, height: int | None = None) -> Path:
        """A PNG of the whole page (not only the window) at `out`, or of its top `height` pixels."""
        metrics = self.command("Page.getLayoutMetrics", session=True)
        size = dict(metrics.get("cssContentSize") or metrics["contentSize"])
        if height is not None:
            size["height"] = min(size["height"], height)
        shot = self.command(
            "Page.captureScreenshot",
            session=True,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        return out


def _dup_to(to_child_r: int, from_child_w: int) -> Any:
    """A preexec function that puts the pipe's child ends on fds 3 (read) and 4 (write)."""

    def move() -> None:
        r, w = os.dup(to_child_r), os.dup(from_child_w)  # above 4, so dup2 below cannot clobber them
        os.dup2(r, 3)
        os.dup2(w, 4)
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)

    return move


def screenshot(page: Path, out: Path, *, width: int = 1240, height: int | None = None) -> Path:
    """Open `page` in headless Chromium and save a PNG of it (its top `height` pixels, or all of
    it) at `out`. Raises BrowserError when Chromium is missing or fails, or the page raised."""
    with DevTools(width=width) as browser:
        result = browser.open(page)
        if result.exceptions:
            raise BrowserError(f"{page} raised in Chromium: {'; '.join(result.exceptions)}")
        return browser.screenshot(out, height=height)
