"""A fault-injecting HTTP proxy for tests: on 127.0.0.1, in front of one upstream (the moto
S3 server), forwarding every request, and injecting a fault into requests that match a rule
(method and path pattern) up to the rule's count:

- ``reset_before``: the connection is reset (RST) before the request is forwarded;
- ``reset_after``: the request is forwarded and applied upstream, then the connection is
  reset instead of answering (the client cannot know whether it was applied);
- ``503``: a ``503 SlowDown`` answer without forwarding;
- ``truncated``: the request is forwarded, the answer's headers go out with the full
  ``Content-Length`` but only the first half of the body follows, then the connection closes;
- ``stall``: the answer is held for ``seconds`` (at most :data:`MAX_STALL`), then sent whole.

Bounded: each rule fires at most ``times`` times, every upstream call has a timeout, a stall
lasts at most :data:`MAX_STALL` seconds.

The proxy runs in a process of its own (:class:`FaultProxy` starts it): deltalake's calls
hold the GIL while they wait for the store, so a proxy thread in the test's process would
never get to answer them.
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

MAX_STALL = 30.0  # seconds


@dataclass
class Fault:
    method: str
    path: str  # regular expression searched in the request path (query included)
    kind: str  # "reset_before" | "reset_after" | "503" | "truncated" | "stall"
    times: int = 1
    seconds: float = 0.0  # how long a "stall" holds the answer
    fired: int = 0


class FaultProxy:
    """The proxy in a child process; ``url`` to point clients at, :meth:`fired` for the
    faults injected so far (method, path, kind)."""

    def __init__(self, upstream: str, faults: list[Fault], *, log_file: str | Path):
        self.log_file = Path(log_file)
        self.args = [sys.executable, __file__, upstream, json.dumps([asdict(f) for f in faults]),
                     str(self.log_file)]

    def __enter__(self):  # -> FaultProxy
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()  # printed once it listens
        if not self.url.startswith("http://127.0.0.1:"):
            self.proc.kill()
            raise RuntimeError(f"fault proxy did not start: {self.url!r}")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def fired(self) -> list[list[str]]:
        if not self.log_file.exists():
            return []
        return [json.loads(ln) for ln in self.log_file.read_text().splitlines() if ln]


class _Proxy:
    def __init__(self, upstream: str, faults: list[Fault], log_file: str):
        self.upstream = urlsplit(upstream)
        self.faults = faults
        self.lock = threading.Lock()
        self.log_file = log_file
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _pick(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.fired < f.times and f.method == method and re.search(f.path, path):
                    f.fired += 1
                    with open(self.log_file, "a") as fh:
                        fh.write(json.dumps([method, path, f.kind]) + "\n")
                    return f
        return None

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        rule = self._pick(h.command, h.path)
        fault = rule.kind if rule else ""
        if fault == "stall":
            time.sleep(min(MAX_STALL, max(0.0, rule.seconds)))
        if fault == "reset_before":
            return _reset(h)
        if fault == "503":
            msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            h.send_response(503)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            h.wfile.write(msg)
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                          timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items()
                       if k.lower() not in ("transfer-encoding", "connection")}
            if body or h.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if fault == "reset_after":
            return _reset(h)
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        # HEAD: the object's size, as upstream said; else the body we send.
        size = resp.getheader("Content-Length", "0") if h.command == "HEAD" else len(data)
        h.send_header("Content-Length", str(size))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncated":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)


def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = b""
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                h.rfile.readline()
                return out
            out += h.rfile.read(size)
            h.rfile.readline()
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n) if n else b""


def _reset(h: http.server.BaseHTTPRequestHandler) -> None:
    """Close with SO_LINGER 0: the client sees 'connection reset by peer'."""
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.close_connection = True
    h.connection.close()


if __name__ == "__main__":
    upstream, rules, log_file = sys.argv[1:4]
    proxy = _Proxy(upstream, [Fault(**r) for r in json.loads(rules)], log_file)
    print(proxy.url, flush=True)
    proxy.server.serve_forever()
