"""Headless Chromium driven over the DevTools protocol (CDP, via `websockets`): open a page of
the Prefect UI, wait for what it renders, click like a user (real pointer events: the UI's
menus open on pointer-down), read the DOM and take a screenshot."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from simulator.process import free_port, stop

__all__ = ["CHROMIUM_FLAGS", "Browser", "chromium", "open_browser"]

# headless, no sandbox (containers), nothing fetched from the network, no first-run dialogs
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One page of a headless Chromium; ``call`` sends a CDP command and returns its result."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict:
        n = next(self._ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == n:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, js: str) -> Any:
        result = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{js[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, what: str, js: str, timeout: float = 60.0) -> Any:
        """Poll ``js`` in the page until it is truthy (the page's state, not a sleep)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(js)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(0.25)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, what: str, js_element: str, timeout: float = 60.0) -> None:
        """Press and release the mouse at the centre of the element ``js_element`` finds."""
        rect = self.wait_for(
            what,
            f"(() => {{ const e = {js_element}; if (!e) return null; e.scrollIntoView();"
            " const r = e.getBoundingClientRect(); return r.width ? [r.x + r.width / 2,"
            " r.y + r.height / 2] : null; })()",
            timeout,
        )
        x, y = rect
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def open_browser(profile: Path, width: int = 1400, height: int = 1100) -> Iterator[Browser]:
    """Start Chromium (headless, its own profile folder, a free loopback debugging port) and
    yield its first page; stop it afterwards."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    port = free_port()
    cmd = [
        exe,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--remote-debugging-address=127.0.0.1",
        f"--remote-debugging-port={port}",
        "about:blank",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        pages: list[dict] = []
        while not pages:  # start-up polling with a deadline
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError, ValueError):
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                pages = [t for t in targets if t.get("type") == "page"]
            if time.monotonic() > deadline:
                raise TimeoutError("chromium's DevTools endpoint did not answer within 60 s")
            time.sleep(0.2)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
            browser = Browser(ws)
            browser.call("Page.enable")
            browser.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield browser
    finally:
        stop(proc, grace=5)
