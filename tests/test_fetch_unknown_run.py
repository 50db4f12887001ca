"""Fetching a run from a store into an index that has never heard of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from machinable import Index, RemoteStore, Storage, get
from machinable import stores as store_api


@pytest.mark.parametrize("many", [False, True], ids=["fetch", "fetch_many"])
def test_fetch_into_an_index_that_does_not_know_the_run(
    project: Path, tmp_path: Path, fresh_index, many: bool
) -> None:
    url = (tmp_path / "store").as_uri()
    runs = [get("optimize", {"lr": lr}).launch() for lr in (0.2, 0.5)]
    for run in runs:
        run.push(RemoteStore(url))

    # another machine: its own storage folder and an empty index
    with fresh_index("other"), Storage(tmp_path / "elsewhere"):
        wanted = [get("optimize", {"lr": lr}) for lr in (0.2, 0.5)]
        assert all(Index.get().find(run.uuid) is None for run in wanted)
        if many:
            fetched = store_api.fetch_many([run._ref() for run in wanted], RemoteStore(url))
            assert sorted(fetched) == sorted(run.uuid for run in wanted)
        else:
            for run in wanted:
                run.fetch(RemoteStore(url))
        for run, original in zip(wanted, runs, strict=True):
            assert run.is_mounted()
            assert run.local_directory().parent == tmp_path / "elsewhere"
            assert run.loss() == original.loss()
            record = Index.get().find(run.uuid)
            assert record is not None and record.status == "finished"
            assert record.directories == (str(run.local_directory()),)
            states = {copy.url: copy.state for copy in run.availability()}
            assert "present" in states.values(), states
            assert run.cached()
