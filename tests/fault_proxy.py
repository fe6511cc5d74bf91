"""A fault-injecting reverse proxy for the tests: forwards HTTP to the S3 server (or the MLflow server) and, for a
seeded share of requests, answers 503 SlowDown, 403 ExpiredToken or 401 Unauthorized (S3 XML error bodies) or
resets the connection, before the response or in the middle of its body."""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

KINDS = ("slowdown", "expired_token", "reset", "cut_body")  # what an S3 store does; the default
ALL_KINDS = (*KINDS, "unauthorized")  # unauthorized: a 401, as a server behind a token check answers
# Hop-by-hop headers (RFC 9110) are the proxy's own business; `expect` is answered by the proxy itself.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "expect"}
ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "expired_token": (403, "Forbidden", "ExpiredToken", "The provided token has expired."),
    "unauthorized": (401, "Unauthorized", "Unauthorized", "The token has expired."),
}


def _unit(*parts) -> float:
    """A number in [0, 1) fixed by `parts`: the proxy's only source of randomness."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def request_identity(method: str, target: str, byte_range: str | None) -> str:
    """What makes two requests "the same request" (a client's retry of it included): method, path, the query
    without its signature parameters, and the byte range."""
    url = urlsplit(target)
    query = sorted((k, v) for k, v in parse_qsl(url.query, keep_blank_values=True)
                   if not k.lower().startswith("x-amz-"))
    return f"{method} {url.path} {query} {byte_range or ''}"


class FaultProxy:
    """Forwards to `upstream` (http://host:port). A request is faulty with probability `share`, decided by
    the seed and its identity, so the same requests are faulty in every run whatever the thread timing; a
    faulty request fails its first `repeats` times (a kind per attempt, from `kinds`) and then goes through,
    as a throttled or briefly unreachable store does. Requests for a path ending in one of `persistent`
    fail every time (an outage that outlasts any retry). `injected` counts the faults by kind."""

    def __init__(self, upstream: str, share: float = 0.0, repeats: int = 0, seed: int = 0,
                 kinds: tuple[str, ...] = KINDS, persistent: tuple[str, ...] = ()):
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds {sorted(unknown)} unknown; choose from {ALL_KINDS}")
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.share, self.repeats, self.seed, self.kinds = share, repeats, seed, tuple(kinds)
        self.persistent = tuple(persistent)
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fault_for(self, identity: str, path: str) -> str | None:
        """The fault this request gets now (None: forward it); counts the attempt."""
        persistent = any(path.endswith(suffix) for suffix in self.persistent)
        if not persistent and _unit(self.seed, identity) >= self.share:
            return None
        with self._lock:
            attempt = self._attempts[identity]
            self._attempts[identity] += 1
        if attempt >= self.repeats and not persistent:
            return None
        return self.kinds[int(_unit(self.seed, identity, attempt) * len(self.kinds))]

    def count(self, kind: str | None) -> None:
        with self._lock:
            if kind is None:
                self.forwarded += 1
            else:
                self.injected[kind] += 1

    def start(self) -> FaultProxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as S3 clients expect

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            # SO_LINGER 0 then close: the client sees a TCP reset, not an orderly end of stream.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _error(self, kind: str) -> None:
            status, reason, code, message = ERRORS[kind]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<Resource>{urlsplit(self.path).path}</Resource><RequestId>vq2-fault-proxy</RequestId></Error>")
            self.send_response_only(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body.encode())

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                sends_body = body or self.command in ("PUT", "POST")
                upstream.request(self.command, self.path, body=body if sends_body else None, headers=headers)
                response = upstream.getresponse()
                return response.status, response.reason, response.getheaders(), response.read()
            finally:
                upstream.close()

        def _handle(self) -> None:
            body = self._body()
            path = urlsplit(self.path).path
            kind = proxy.fault_for(request_identity(self.command, self.path, self.headers.get("Range")), path)
            if kind in ERRORS:
                proxy.count(kind)
                self._error(kind)
                return
            if kind == "reset":
                proxy.count(kind)
                self._reset()
                return
            status, reason, headers, payload = self._forward(body)
            cut = kind == "cut_body" and len(payload) >= 2
            proxy.count(kind if cut else None)
            self.send_response_only(status, reason)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP and (self.command == "HEAD" or name.lower() != "content-length"):
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if cut:
                self.wfile.write(payload[: len(payload) // 2])
                self._reset()
                return
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler
