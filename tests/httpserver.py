"""A small real HTTP server for tests, bound to 127.0.0.1 and run in a thread.

Routes are configured per test::

    def test_x(http_server):
        http_server.add("/mod.py", b"x = 1\\n")
        http_server.add("/gone.py", status=404)
        http_server.add("/cut.py", b"x = 1\\n", truncate=100)   # promises 100 more bytes
        http_server.add("/slow.py", b"x = 1\\n", delay=2.0)     # sleeps before answering
        http_server.add("/stall.py", b"x = 1\\n", delay=2.0, delay_at=3)  # stalls mid-body
        http_server.add("/drip.py", b"x = 1\\n", drip=1.0)   # one byte a second
        http_server.add("/big.py", b"#" * 10**6, length=False)  # no Content-Length
        requests.get(http_server.url("/mod.py"))
        assert http_server.hits["/mod.py"] == 1

Unknown paths answer 404. Use the ``http_server`` fixture (import it, or list this
module in ``pytest_plugins``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

__all__ = ["Route", "TestHTTPServer", "http_server"]


@dataclass
class Route:
    """How the server answers one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds to wait before sending anything (interrupted when the server stops)
    delay: float = 0.0
    #: if set, send headers and this many body bytes first, and only then wait ``delay``
    delay_at: int | None = None
    #: announce this many bytes more than the body holds, send the body, then hang up
    truncate: int = 0
    #: send the body one byte at a time, this many seconds apart
    drip: float = 0.0
    #: send a Content-Length header (else the body ends when the connection closes)
    length: bool = True


class _Handler(BaseHTTPRequestHandler):
    server: TestHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep test output quiet

    def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; return True (drop the request) if the server stops meanwhile."""
        return self.server.stopping.wait(seconds)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.hits[path] += 1
            route = self.server.routes.get(path)
        if route is None:
            route = Route(body=b"not found\n", status=404)
        try:
            if route.delay and route.delay_at is None and self._pause(route.delay):
                return
            self.send_response(route.status)
            headers = {"Content-Type": "text/x-python; charset=utf-8", **route.headers}
            for key, value in headers.items():
                self.send_header(key, value)
            if route.length:
                self.send_header("Content-Length", str(len(route.body) + route.truncate))
            if route.truncate or not route.length:
                self.send_header("Connection", "close")
            self.end_headers()
            if route.delay and route.delay_at is not None:
                self.wfile.write(route.body[: route.delay_at])
                self.wfile.flush()
                if self._pause(route.delay):
                    return
                self.wfile.write(route.body[route.delay_at :])
            elif route.drip:
                for offset in range(len(route.body)):
                    self.wfile.write(route.body[offset : offset + 1])
                    self.wfile.flush()
                    if self._pause(route.drip):
                        return
            else:
                self.wfile.write(route.body)
            self.wfile.flush()
            if route.truncate or not route.length:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. after its timeout)


class TestHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with configurable routes and a per-path request counter."""

    __test__ = False  # not a test class, despite the name
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def add(
        self,
        path: str,
        body: bytes | str = b"",
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        delay_at: int | None = None,
        truncate: int = 0,
        drip: float = 0.0,
        length: bool = True,
    ) -> str:
        """Serve ``body`` at ``path`` (see ``Route``); return the route's URL."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        path = path if path.startswith("/") else "/" + path
        with self.lock:
            self.routes[path] = Route(
                body, status, dict(headers or {}), delay, delay_at, truncate, drip, length
            )
        return self.url(path)

    def remove(self, path: str) -> None:
        """Stop serving ``path`` (it answers 404 again)."""
        with self.lock:
            self.routes.pop(path if path.startswith("/") else "/" + path, None)

    @property
    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())

    def start(self) -> TestHTTPServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


@pytest.fixture
def http_server() -> Iterator[TestHTTPServer]:
    """A running ``TestHTTPServer`` on 127.0.0.1, stopped after the test."""
    server = TestHTTPServer().start()
    try:
        yield server
    finally:
        server.stop()
