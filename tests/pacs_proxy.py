"""A fault-injecting HTTP proxy on loopback in front of Orthanc (a test double at the network
boundary): it forwards every request, records what was asked, and answers the requests that
match a rule with the rule's fault instead, a given number of times."""

from __future__ import annotations

import http.server
import threading
import uuid
from urllib.parse import urlsplit

import httpx

__all__ = ["FaultProxy"]

# (method, a fragment of the path, fault, how many times): fault is an HTTP status, or
# "text-part": a 200 multipart/related answer whose one part is plain text, not DICOM
Rule = tuple[str, str, int | str, int]


class FaultProxy:
    def __init__(self, upstream: str, rules: list[Rule] | None = None) -> None:
        proxy = self
        self.rules = list(rules or [])
        self.hits = [0] * len(self.rules)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, query)
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _fault(self) -> int | str | None:
                parts = urlsplit(self.path)
                with proxy._lock:
                    proxy.requests.append((self.command, parts.path, parts.query))
                    for i, (method, fragment, fault, times) in enumerate(proxy.rules):
                        hit = method == self.command and fragment in parts.path
                        if hit and proxy.hits[i] < times:
                            proxy.hits[i] += 1
                            return fault
                return None

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = self._fault()
                if fault == "text-part":
                    boundary = uuid.uuid4().hex
                    part = b"this part is plain text, not a DICOM file\r\n"
                    payload = (
                        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n".encode()
                        + part
                        + f"\r\n--{boundary}--\r\n".encode()
                    )
                    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
                    self._send(200, payload, {"Content-Type": ctype})
                    return
                if isinstance(fault, int):
                    headers = {"Content-Type": "text/plain"}
                    if fault == 401:
                        headers["WWW-Authenticate"] = 'Basic realm="test"'
                    self._send(fault, f"injected {fault}".encode(), headers)
                    return
                forwarded = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "transfer-encoding")
                }
                resp = httpx.request(
                    self.command, upstream + self.path, headers=forwarded, content=body, timeout=60
                )
                hop = {"transfer-encoding", "connection", "content-encoding", "content-length"}
                self._send(
                    resp.status_code,
                    resp.content,
                    {k: v for k, v in resp.headers.items() if k.lower() not in hop},
                )

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
