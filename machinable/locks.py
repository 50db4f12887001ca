"""Inter-process locks on files that are never followed through a link.

Lock files live in places other people can write to (a shared storage, a project a
collaborator sent). ``filelock`` opened them with ``O_TRUNC`` and followed symbolic
links up to 3.12.x, so a link planted at a lock's path truncated whatever it pointed
at. These locks open with ``O_NOFOLLOW``, never truncate or write, check that what they
opened is a regular file, and then take an ``flock`` on it: the same lock ``filelock``
takes on Unix, so the two interoperate, whatever version of it is installed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from types import TracebackType

from machinable.errors import LockTimeout, UnsafeFileError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

POLL_SECONDS = 0.05
logger = logging.getLogger(__name__)


def open_regular(
    path: str | os.PathLike[str],
    flags: int = os.O_RDONLY,
    *,
    create: bool = False,
    dir_fd: int | None = None,
    follow: bool = False,
) -> int:
    """Open ``path`` only if it is a regular file (and, unless ``follow``, not a
    symbolic link at its last component); FIFOs and devices are refused without
    blocking on them."""
    flags |= os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= os.O_NOFOLLOW
    if create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise UnsafeFileError(
                f"{path} is a symbolic link; machinable does not follow links here", path=path
            ) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file ({_kind(info.st_mode)})", path=path)
        if not create:
            # Reads block as usual from here on; only the open had to be non-blocking.
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


class FileLock:
    """An exclusive lock on ``path`` (created if missing, never followed if a link).

    ``timeout`` is in seconds: negative waits forever, 0 tries once. Raises
    ``LockTimeout`` when the lock stays held, ``UnsafeFileError`` when the path is a
    link or not a regular file. Usable as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = -1) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._fd: int | None = None

    @property
    def is_locked(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float | None = None) -> FileLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this FileLock")
        wait = self.timeout if timeout is None else timeout
        fd = open_regular(self.path, os.O_RDWR, create=True)
        deadline = time.monotonic() + wait if wait >= 0 else None
        waited = False
        try:
            while True:
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout(f"{self.path} is held by another process", path=self.path)
                if not waited:
                    logger.debug("lock %s not acquired: held by another process, waiting", self.path)
                    waited = True
                time.sleep(POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def is_held(path: str | os.PathLike[str]) -> bool:
    """True when another process holds the lock at ``path`` (a missing file: False)."""
    if not os.path.lexists(path):
        return False
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except LockTimeout:
        return True
    lock.release()
    return False
