"""An HTTP proxy on 127.0.0.1 that forwards to an S3 server and injects faults on a fixed schedule.

Faults (on object GETs, and with ``fault_writes`` also on PUTs, POSTs and DELETEs): ``503`` SlowDown, ``500``
InternalError, ``reset`` (the connection closes with no response), ``truncate`` (the headers promise the whole body,
half of it arrives, the connection closes; a write gets its answer cut so) and ``slow`` (a delay before answering).
Everything else is forwarded unchanged. Every request is logged in
``requests`` as ``(monotonic arrival time, method, path)``, so tests can count what reached the server and when.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_BODY = ("<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message>"
              "<RequestId>fault</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream_port: int, schedule: list[str], slow_seconds: float = 0.05,
                 fault_writes: bool = False):
        self.upstream_port = upstream_port
        self.fault_writes = fault_writes
        self.schedule = itertools.cycle(schedule)
        self.slow_seconds = slow_seconds
        self.lock = threading.Lock()
        self.injected: dict[str, int] = {}
        self.requests: list[tuple[float, str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                proxy.handle(self, "GET")

            def do_HEAD(self) -> None:
                proxy.handle(self, "HEAD")

            def do_PUT(self) -> None:
                proxy.handle(self, "PUT")

            def do_POST(self) -> None:
                proxy.handle(self, "POST")

            def do_DELETE(self) -> None:
                proxy.handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self, method: str, path: str) -> str:
        is_read = method == "GET" and "?" not in path  # object reads, not listings
        if not (is_read or (self.fault_writes and method in ("PUT", "POST", "DELETE"))):
            return "ok"
        with self.lock:
            fault = next(self.schedule)
            self.injected[fault] = self.injected.get(fault, 0) + 1
        return fault

    def object_gets(self) -> list[float]:
        """Arrival times of the object reads (GETs that are not listings) so far."""
        with self.lock:
            return [t for t, method, path in self.requests if method == "GET" and "?" not in path]

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        with self.lock:
            self.requests.append((time.monotonic(), method, request.path))
        fault = self._next_fault(method, request.path)
        if fault in ("503", "500"):
            code = "SlowDown" if fault == "503" else "InternalError"
            body = ERROR_BODY.format(code=code).encode()
            request.send_response(int(fault))
            request.send_header("Content-Type", "application/xml")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
            return
        if fault == "reset":
            # SO_LINGER 0: close with a TCP reset, as a dropped connection looks to the client.
            request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close_connection = True
            request.connection.close()
            return
        if fault == "slow":
            time.sleep(self.slow_seconds)
        length = int(request.headers.get("Content-Length") or 0)
        payload = request.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        headers["Host"] = f"127.0.0.1:{self.upstream_port}"
        upstream.request(method, request.path, body=payload, headers=headers)
        response = upstream.getresponse()
        body = response.read()
        request.send_response(response.status)
        for key, value in response.getheaders():
            # A HEAD answer keeps the object's Content-Length; bodies are re-framed with their own length.
            if key.lower() not in ("transfer-encoding", "connection") and (method == "HEAD" or
                                                                          key.lower() != "content-length"):
                request.send_header(key, value)
        if method != "HEAD":
            request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if method == "HEAD":
            return
        if fault == "truncate" and len(body) > 1:
            request.wfile.write(body[: len(body) // 2])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(socket.SHUT_RDWR)
            return
        request.wfile.write(body)
        upstream.close()
