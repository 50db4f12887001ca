"""The store protocol: ``RemoteStore``, a remote filesystem that holds copies of runs.

``RemoteStore(url, **storage_options)`` opens any fsspec filesystem. It is a context:
every run that finishes inside ``with RemoteStore(url):`` is also pushed to it.
Credentials come from the environment or fsspec's configuration, never from the index.

A backend that fsspec lacks subclasses ``RemoteStore`` and overrides the protocol
methods ``push``, ``fetch``, ``verify``, ``delete``, ``headers`` and ``read`` (and
``uri`` when it has no fsspec URL). Every method acts on runs as (uuid, directory)
pairs; none knows about the index. Results report a copy's content digest as their
``checksum``; ``fetch`` may take ``digests`` (else its result is checked after landing).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from machinable.context import Context, active
from machinable.errors import StoreError
from machinable.stores import transfer


class RemoteStore(Context):
    """A remote store for run data: an fsspec URL plus storage options."""

    def __init__(self, url: str, *, name: str | None = None, **storage_options: Any):
        if not isinstance(url, str) or not url:
            raise StoreError(f"a remote store needs a URL, not {url!r}")
        self.url = url
        self._name = name
        self.storage_options = storage_options
        self._opened: tuple[Any, str] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @classmethod
    def connected(cls) -> list[RemoteStore]:
        """The stores connected as contexts, outermost first."""
        return active(RemoteStore)

    def _fs(self) -> tuple[Any, str]:
        if self._opened is None:
            try:
                # A fresh filesystem object per store: fsspec's instance cache would hand
                # back one made earlier with other credentials or environment.
                options = {"skip_instance_cache": True, **self.storage_options}
                self._opened = transfer.open_store(self.url, **options)
            except (ImportError, ValueError) as exc:
                raise StoreError(f"cannot open store {self.url!r}: {exc}", store=self.url) from exc
        return self._opened

    @property
    def uri(self) -> str:
        """Canonical URI of the store (protocol and root; never options or credentials)."""
        fs, root = self._fs()
        return transfer.store_uri(fs, root)

    @property
    def name(self) -> str:
        return self._name or self.uri

    # The protocol a custom backend implements.

    def push(self, items: list[tuple[str, Path]], *, progress: bool = False) -> dict[str, transfer.TransferResult]:
        """Copy run directories into the store, verified; returns each run's copy."""
        fs, root = self._fs()
        return transfer.push_runs(items, fs, root, progress=progress)

    def fetch(
        self,
        items: list[tuple[str, Path]],
        *,
        progress: bool = False,
        digests: dict[str, str | None] | None = None,
    ) -> dict[str, transfer.TransferResult]:
        """Download runs to local directories that do not exist yet, verified; a copy
        whose digest is not the one ``digests`` names for its run is refused."""
        fs, root = self._fs()
        return transfer.fetch_runs(items, fs, root, progress=progress, digests=digests)

    def manifest(self, uuid: str) -> dict | None:
        """The store's manifest of a run, read now; None if it has no complete copy."""
        fs, root = self._fs()
        return transfer.read_manifest(fs, root, uuid)

    def verify(self, uuid: str, expected_manifest: dict | None = None) -> transfer.RemoteState:
        """Check the store's copy of a run file by file; its ``checksum`` is the copy's
        digest, and with ``expected_manifest`` another digest is a ``conflict``."""
        fs, root = self._fs()
        return transfer.verify_remote(fs, root, uuid, expected_manifest)

    def delete(self, uuid: str) -> None:
        fs, root = self._fs()
        transfer.delete_remote(fs, root, uuid)

    def headers(self) -> Iterator[tuple[str, dict, bool]]:
        """(uuid, id.json, complete) for every run in the store."""
        fs, root = self._fs()
        return transfer.list_remote_headers(fs, root)

    def read(self, uuid: str, names: list[str]) -> dict[str, bytes | None]:
        """Small files of one run's copy (headers, markers); missing ones read as None."""
        fs, root = self._fs()
        paths = {name: transfer.join(root, uuid, name) for name in names}
        got = transfer.read_many(fs, list(paths.values()))
        return {name: got[path] for name, path in paths.items()}
