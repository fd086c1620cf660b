"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): no port to pick or
race for, no client library; Chromium from the machine's packages (`scripts/setup.sh screenshots`).

The protocol over a pipe: Chromium reads commands on fd 3 and writes replies and events on fd 4, each message one
JSON object terminated by a NUL byte. One page (a target attached with `flatten`) is all a screenshot needs.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


class BrowserError(Exception):
    """Chromium missing, crashed, or a page that never showed what was waited for: one line for the user."""


def find_chromium(explicit: str | None = None) -> str:
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise BrowserError(f"chromium not found at {explicit}")
        return found
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError("chromium is not installed: run `bash scripts/setup.sh screenshots` (Debian's chromium package)")


class Page:
    """One browser tab of `width` x `height` CSS pixels (device scale 1, so a screenshot has exactly that size)."""

    def __init__(self, chromium: str, width: int, height: int, timeout_s: float = 60.0):
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: Chromium's chatter must never block it
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium's ends moved above 9 first, so that putting them at 3 and 4 cannot overwrite one another.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
        os.close(to_browser_r)
        os.close(from_browser_w)
        args = [
            "--headless=new",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={self._profile.name}",
            f"--window-size={width},{height}",
        ]
        if os.geteuid() == 0:  # Chromium refuses to run as root with its sandbox on (containers, CI)
            args.append("--no-sandbox")
        # bash (not sh: fds above 9) puts the pipe ends at the numbers Chromium expects: 3 commands in, 4 replies out.
        wrapper = 'exec "$0" "$@" 3<&{0} 4>&{1} {0}<&- {1}>&-'.format(*ends)
        self._proc = subprocess.Popen(
            ["bash", "-c", wrapper, chromium, *args, "about:blank"],
            pass_fds=ends,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        for fd in ends:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            attached = self.send("Target.attachToTarget", targetId=target, flatten=True, session=False)
            self._session = attached["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
        except BaseException:
            self.close()  # a failed start leaves no browser process or profile behind
            raise

    # --- the protocol ---
    def send(self, method: str, *, session: bool = True, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self._session:
            message["sessionId"] = self._session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise BrowserError(f"chromium exited ({self._stderr_tail()})") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"chromium: {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium did not answer within {self.timeout_s:.0f} s")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited ({self._stderr_tail()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def _stderr_tail(self) -> str:
        try:
            self._proc.wait(timeout=5)
            self._log.seek(0)
            err = self._log.read().decode(errors="replace").strip().splitlines()
        except subprocess.TimeoutExpired:
            err = []
        useful = [line for line in err if "dbus" not in line.lower()]  # headless always complains about D-Bus
        return (
            f"exit status {self._proc.returncode}: {useful[-1][:200]}"
            if useful
            else f"exit status {self._proc.returncode}"
        )

    # --- what a screenshot needs ---
    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"page script failed: {str(text).splitlines()[0][:200]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float | None = None) -> None:
        """Poll `expression` until it is truthy (a throw counts as not yet: the page may still be empty); `what` names
        the awaited content in the error."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        guarded = f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"
        while not self.evaluate(guarded):
            if time.monotonic() > deadline:
                raise BrowserError(f"the page never showed {what} within {timeout_s or self.timeout_s:.0f} s")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            self._profile.cleanup()

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
