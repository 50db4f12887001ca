"""A real ``machinable serve`` in a subprocess on 127.0.0.1, for the server tests.

    with running_server("--project", str(project)) as server:
        requests.get(server.url("/api/v1/projects"))
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    base: str
    process: subprocess.Popen
    log: Path

    def url(self, path: str) -> str:
        return self.base + path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[Server]:
    """Start ``machinable serve ARGS --port <free>`` and wait until it answers."""
    port = free_port()
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"machinable-serve-{port}.log"
    handle = open(log, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "machinable", "serve", *args, "--port", str(port)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"machinable serve exited with {process.returncode}: {server.output()}")
            try:
                requests.get(server.url("/"), timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"machinable serve never answered: {server.output()}") from None
                time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        handle.close()
