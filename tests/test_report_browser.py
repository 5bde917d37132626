"""The report rendered in headless Chromium: no console errors, every image loads, sorting works, not blank.

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe` (JSON messages ending in
NUL on file descriptors 3 and 4), so no websocket client or extra package is needed. A control page with
an external image and a script error proves that the checks can fail.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixtures import build_audit

from ssim_ray.config import AuditConfig, ReportConfig
from ssim_ray.report import make_report

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--remote-debugging-pipe")
DEADLINE_S = 30.0


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium is required: install Debian's `chromium` package (.ci/run does)")


def _above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class DevTools:
    """A minimal DevTools-protocol client over Chromium's pipe, attached to one page."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Above 9, so the shell's 3<& and 4>& redirections cannot clobber one pipe end with the other.
        to_chrome_r, from_chrome_w = _above_nine(to_chrome_r), _above_nine(from_chrome_w)
        # bash (dash takes single-digit descriptors only) puts our pipe ends on descriptors 3 and 4, where
        # --remote-debugging-pipe expects them.
        script = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.process = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", script, _chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id, self.events, self.session = b"", 0, [], None
        self.deadline = time.monotonic() + DEADLINE_S
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_chrome], [], [], remaining)[0]:
                raise TimeoutError(f"Chromium did not answer within {DEADLINE_S} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        while True:
            found = next((e for e in self.events if e.get("method") == method), None)
            if found:
                return found
            self.events.append(self._message())

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw {result['exceptionDetails']}")
        return result["result"].get("value")  # absent for undefined

    def errors(self) -> list:
        """Console errors, uncaught exceptions and error log entries (CSP violations among them)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(params["args"])
            elif method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def requested_urls(self) -> list:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def screenshot(self) -> Image.Image:
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": 1280, "height": min(int(size["height"]), 12000), "scale": 1}
        data = self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        return Image.open(io.BytesIO(base64.b64decode(data["data"])))

    def close(self) -> None:
        try:
            os.write(self._to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)


@pytest.fixture
def browser(tmp_path):
    tools = DevTools(tmp_path / "profile")
    try:
        yield tools
    finally:
        tools.close()


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    out = build_audit(tmp_path_factory.mktemp("audit"), audit=AuditConfig(min_ssim=0.5))
    return Path(make_report(out, report_cfg=ReportConfig(worst_k=4)).html_path)


IMAGES = "Array.from(document.images).map(function (i) { return [i.complete, i.naturalWidth, i.alt]; })"
GROUP_MEANS = ("Array.from(document.querySelectorAll('table.groups tbody tr'))"
               ".map(function (r) { return r.cells[3].getAttribute('data-sort'); })")
CLICK_MEAN = "document.querySelectorAll('table.groups th')[3].click()"
PSNR_MEANS = ("Array.from(document.querySelectorAll('table.metric-groups.psnr tbody tr'))"
              ".map(function (r) { return r.cells[3].getAttribute('data-sort'); })")
CLICK_PSNR_MEAN = "document.querySelectorAll('table.metric-groups.psnr th')[3].click()"


@pytest.mark.slow  # starts Chromium: ~5 s
def test_report_renders_without_errors_and_every_image_loads(browser, report_path):
    browser.open(report_path.as_uri())
    images = browser.evaluate(IMAGES)
    assert len(images) > 20
    assert [alt for complete, width, alt in images if not complete or width == 0] == []
    assert browser.errors() == []
    assert {url.split(":", 1)[0] for url in browser.requested_urls()} <= {"file", "data"}
    browser.evaluate(CLICK_MEAN)
    ascending = browser.evaluate(GROUP_MEANS)
    numbers = [float(v) if v is not None else -np.inf for v in ascending]
    assert numbers == sorted(numbers) and len(numbers) == 8
    browser.evaluate(CLICK_MEAN)
    assert [float(v) if v is not None else -np.inf for v in browser.evaluate(GROUP_MEANS)] == sorted(numbers, reverse=True)
    browser.evaluate(CLICK_PSNR_MEAN)  # the PSNR section's group table sorts the same way
    psnr_means = [float(v) if v is not None else -np.inf for v in browser.evaluate(PSNR_MEANS)]
    assert psnr_means == sorted(psnr_means) and len(psnr_means) == 8
    shot = np.asarray(browser.screenshot().convert("L"), dtype=np.float64)
    assert shot.shape[0] > 2000  # the whole page, not only the first screen
    assert shot.std() > 20 and len(np.unique(shot)) > 64  # text, plots and photos, not a blank page


@pytest.mark.slow  # starts Chromium: ~5 s
def test_the_checks_catch_a_broken_page(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                    "content=\"default-src 'none'; img-src data:; script-src 'unsafe-inline'\"></head><body>"
                    '<img src="http://127.0.0.1:9/x.png" alt="external"><script>undefined_function()</script>'
                    "</body></html>")
    browser.open(page.as_uri())
    images = browser.evaluate(IMAGES)
    assert images == [[True, 0, "external"]]
    errors = [json.dumps(error) for error in browser.errors()]
    assert any("violates the following Content Security Policy directive" in e for e in errors)
    assert any("undefined_function is not defined" in e for e in errors)
