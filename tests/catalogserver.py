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

from machinable import get

from conftest import write_module


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


TRACK = """
from pydantic import BaseModel
from machinable import Interface


class Track(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        steps: int = 20

    def __call__(self):
        rows = [{"step": i, "loss": 1 / (1 + self.config.lr * i)} for i in range(self.config.steps)]
        self.save_file("log.jsonl", rows)
        self.save_file("result.json", {"loss": rows[-1]["loss"]})
        self.save_file("notes/readme.txt", "lr " + str(self.config.lr))
"""


def launch_tracks(project: Path, lrs: list[float]) -> list[str]:
    write_module(project, "track", TRACK)
    return [get("track", {"lr": lr}).launch().uuid for lr in lrs]
