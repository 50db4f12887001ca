"""Rebuild what the index knows about store copies by listing the stores.

``Index.reindex()`` rebuilds rows from local record directories; ``reindex_stores``
adds the other half after an index was lost: every store the index knows and every
connected one is listed, runs found only in a store are added (evicted here until
fetched), and availability rows are written.
"""

from __future__ import annotations

import json

from machinable.catalog.index import Index, ReindexReport
from machinable.catalog.rows import row_values
from machinable.errors import MachinableError
from machinable.record import MODEL_FILE, parse_timestamp, validate_headers
from machinable.stores import RemoteStore, known_stores, record_copies, register, resolve_store


def reindex_stores(index: Index, report: ReindexReport | None = None) -> dict[str, dict[str, int]]:
    """List every known and connected store into the index; counts per store.

    Stores that cannot be listed are added to ``report.skipped`` when a report is given.
    """
    counts: dict[str, dict[str, int]] = {}
    listed: set[str] = set()

    def skip(url: str, exc: Exception) -> None:
        if report is not None:
            report.skipped.append((url, f"store not listed: {exc}"))

    for name, url in known_stores(index):
        listed.add(url)
        try:
            counts[name] = reindex_store(index, resolve_store(index, url))
        except (MachinableError, OSError) as exc:
            skip(url, exc)
    # Connected stores the index does not know (yet, or any more: a deleted index).
    for store in RemoteStore.connected():
        try:
            if store.uri in listed:
                continue
            listed.add(store.uri)
            counts[store.name] = reindex_store(index, store)
        except (MachinableError, OSError) as exc:
            skip(store.url, exc)
    if report is not None:
        report.stores.update(counts)
    return counts


def reindex_store(index: Index, store: RemoteStore) -> dict[str, int]:
    """Rebuild the availability rows of one store by listing its id.json headers.

    Runs the index does not know yet are added from the store's model.json and markers
    (without a local location: they are evicted here until fetched).
    """
    remote_id = register(index, store)
    listed = list(store.headers())
    unknown = [uuid for uuid, _, _ in listed if index.status(uuid) is None]
    headers = {uuid: header for uuid, header, _ in listed}
    added = 0
    rows = []
    for uuid in unknown:
        names = [MODEL_FILE, "started_at", "finished_at", "failed_at", "updated_at"]
        raw = store.read(uuid, names)
        try:
            model = json.loads(raw[MODEL_FILE] or b"null")
        except ValueError:
            continue
        if validate_headers(headers[uuid], model, uuid):
            continue
        markers = {
            name: parse_timestamp(raw[name].decode("utf-8", "replace"))
            for name in names[1:]
            if raw.get(name) is not None
        }
        rows.append(row_values(headers[uuid], model, markers))
    if rows:
        index.add_rows(rows)
        added = len(rows)
    valid = {row["uuid"] for row in rows} | {uuid for uuid, _, _ in listed if uuid not in unknown}
    states = {
        uuid: {"state": "present" if complete else "partial"}
        for uuid, _, complete in listed
        if uuid in valid
    }
    record_copies(index, remote_id, states)
    return {"listed": len(listed), "added": added, "present": sum(1 for s in states.values() if s["state"] == "present")}
