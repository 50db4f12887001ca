"""What a server serves: its projects, its roots, its tokens; checked once at start.

A project is served under its directory's name. The server never imports a project's
code, so a name set by a project provider (``interface/project.py``) is not seen; with a
shared index (``MACHINABLE_INDEX`` set for the server) a project's runs are those the
index records under the directory's name.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from machinable.catalog.engine import to_url
from machinable.errors import ServeError
from machinable.settings import index_setting

INDEX_FILE = ".machinable.sqlite"
MAX_TOKEN_FILE = 1 << 20
# A project name is one path segment: no separators, no dot-dot, no control characters,
# no percent sign (so no encoded form can be decoded a second time into something else).
_BAD_NAME = re.compile(r"[/\\%\x00-\x1f\x7f]|\.\.")


class InvalidName(ValueError):
    """A project name that could leave its root."""


def check_name(name: str) -> str:
    """The name itself if it is one safe path segment, else raise InvalidName."""
    if not name or len(name) > 255 or name.startswith(".") or _BAD_NAME.search(name):
        raise InvalidName(f"invalid project name {name[:80]!r}: a name is one folder name, without '/', '\\' or '..'")
    return name


@dataclass(frozen=True)
class ServedProject:
    """One project as the server reads it: its index and, for a shared index, its name there."""

    name: str
    path: Path
    index_url: str
    #: the ``runs.project`` value to filter by (a shared index), or None (the project's own index)
    scope: str | None


@dataclass(frozen=True)
class Token:
    secret: bytes
    #: projects this token reaches; None for every project
    projects: frozenset[str] | None


@dataclass
class ServerConfig:
    """The projects, roots and tokens one server was started with."""

    projects: dict[str, Path] = field(default_factory=dict)
    roots: list[Path] = field(default_factory=list)
    tokens: list[Token] | None = None
    shared_index: str | None = None

    def project(self, name: str) -> ServedProject | None:
        """The served project of this name, or None; never looks outside the given dirs."""
        check_name(name)
        path = self.projects.get(name)
        if path is None:
            for root in self.roots:
                candidate = root / name
                # The folder must lie directly in the root once links are resolved.
                real = Path(os.path.realpath(candidate))
                if real.parent == root and real.is_dir() and self._has_catalog(real):
                    path = real
                    break
        if path is None:
            return None
        if self.shared_index:
            return ServedProject(name, path, self.shared_index, name)
        return ServedProject(name, path, to_url(path / INDEX_FILE), None)

    def _has_catalog(self, path: Path) -> bool:
        return bool(self.shared_index) or (path / INDEX_FILE).is_file()

    def names(self) -> list[str]:
        """Every project name the server serves now (roots are listed afresh each time)."""
        names = set(self.projects)
        for root in self.roots:
            try:
                entries = list(os.scandir(root))
            except OSError:
                continue
            for entry in entries:
                try:
                    check_name(entry.name)
                except InvalidName:
                    continue
                if entry.is_dir(follow_symlinks=False) and self._has_catalog(Path(entry.path)):
                    names.add(entry.name)
        return sorted(names)


def read_token_file(path: str | os.PathLike[str]) -> list[Token]:
    """Tokens, one per line, each optionally followed by the project names it may reach.

    Blank lines and lines starting with ``#`` are ignored. The tokens themselves never
    appear in an error message.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise ServeError(f"cannot read the token file {os.fspath(path)!r}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_TOKEN_FILE:
        raise ServeError(f"the token file {os.fspath(path)!r} is larger than 1 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServeError(f"the token file {os.fspath(path)!r} is not UTF-8 text") from exc
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        secret, names = parts[0], parts[1:]
        if len(secret) < 16:
            raise ServeError(
                f"{os.fspath(path)}: the token on line {number} is shorter than 16 characters"
            )
        for name in names:
            try:
                check_name(name)
            except InvalidName as exc:
                raise ServeError(f"{os.fspath(path)}: line {number}: {exc}") from exc
        tokens.append(Token(secret.encode("utf-8"), frozenset(names) if names else None))
    if not tokens:
        raise ServeError(f"the token file {os.fspath(path)!r} holds no token")
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_config(
    projects: list[str | os.PathLike[str]],
    roots: list[str | os.PathLike[str]],
    *,
    host: str = "127.0.0.1",
    token_file: str | os.PathLike[str] | None = None,
) -> ServerConfig:
    """Check the flags of ``machinable serve`` and build what the app needs."""
    if not is_loopback(host) and token_file is None:
        raise ServeError(
            f"refusing to serve on {host}, which other machines can reach, without --token-file"
        )
    shared = index_setting()
    if shared is not None:
        shared = to_url(shared)
        if shared.split("://", 1)[0] in ("http", "https"):
            raise ServeError("MACHINABLE_INDEX names another catalog server; serve its index directly")
    config = ServerConfig(shared_index=shared)
    if not projects and not roots:
        projects = [os.getcwd()]
    for spec in projects:
        path = Path(os.path.realpath(os.path.expanduser(os.fspath(spec))))
        if not path.is_dir():
            raise ServeError(f"--project {os.fspath(spec)!r} is not a directory")
        try:
            name = check_name(path.name)
        except InvalidName as exc:
            raise ServeError(f"--project {os.fspath(spec)!r}: {exc}") from exc
        if name in config.projects and config.projects[name] != path:
            raise ServeError(f"two projects are named {name!r}: {config.projects[name]} and {path}")
        config.projects[name] = path
    for spec in roots:
        path = Path(os.path.realpath(os.path.expanduser(os.fspath(spec))))
        if not path.is_dir():
            raise ServeError(f"--root {os.fspath(spec)!r} is not a directory")
        config.roots.append(path)
    if token_file is not None:
        config.tokens = read_token_file(token_file)
    return config
