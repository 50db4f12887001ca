"""Remote catalogs: analysis code reads a served catalog over HTTP, without the storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from machinable import Field, Index
from machinable.catalog.remote import RemoteIndex, literal
from machinable.errors import QueryError, ReadOnlyCatalog, RemoteCatalogError

from catalogserver import TRACK, launch_tracks, running_server
from conftest import run_python, write_module

ANALYSIS = """
import json
from machinable import Index, get
from machinable.errors import ReadOnlyCatalog

run = get("track", {"lr": 0.2})
out = {
    "index": type(Index.get()).__name__,
    "cached": run.cached(),
    "loss": run.load_file("result.json")["loss"],
    "log": len(run.load_file("log.jsonl")),
    "missing": run.load_file("missing.txt", "fallback"),
    "all": sorted(r.config.lr for r in get("track").all()),
    "top": [r.config.lr for r in get("track").all(order_by="-config.lr", limit=2)],
    "where": sorted(r.config.lr for r in get("track").all("config.lr > 0.15")),
    "count": Index.get().count(),
    "find": Index.get().find(run.uuid).status,
    "relaunch": run.launch().uuid == run.uuid,
}
import requests
sent = []
send = requests.Session.send
requests.Session.send = lambda self, request, **kw: sent.append(request.url) or send(self, request, **kw)
frame = get("track").all().as_dataframe()
out["frame"] = sorted(frame["config.lr"])
out["frame_status"] = sorted(set(frame["status"]))
out["frame_requests"] = len(sent)
try:
    get("track", {"lr": 0.9}).launch()
except ReadOnlyCatalog as exc:
    out["launch"] = str(exc)
print(json.dumps(out))
"""


def checkout(tmp_path: Path) -> Path:
    """Another checkout of the same project: the code, no storage, no index."""
    laptop = tmp_path / "laptop" / "study"
    laptop.mkdir(parents=True)
    write_module(laptop, "track", TRACK)
    return laptop


def test_analysis_code_reads_a_served_catalog(project: Path, tmp_path: Path) -> None:
    uuids = launch_tracks(project, [0.1, 0.2, 0.3])
    laptop = checkout(tmp_path)
    cache = tmp_path / "cache"
    with running_server("--project", str(project)) as server:
        env = {"MACHINABLE_INDEX": server.url("/api/v1/projects/study"), "MACHINABLE_CACHE": str(cache)}
        result = run_python(ANALYSIS, laptop, env)
        out = json.loads(result.stdout)
    assert out["index"] == "RemoteIndex"
    assert out["cached"] is True
    assert out["loss"] == pytest.approx(1 / (1 + 0.2 * 19))
    assert out["log"] == 20 and out["missing"] == "fallback"
    assert out["all"] == [0.1, 0.2, 0.3] and out["top"] == [0.3, 0.2] and out["where"] == [0.2, 0.3]
    assert out["count"] == 3 and out["find"] == "finished" and out["relaunch"] is True
    # a data frame of every run reads pages of runs, not one request per run
    assert out["frame"] == [0.1, 0.2, 0.3] and out["frame_status"] == ["finished"]
    assert out["frame_requests"] == 1
    assert "read-only remote catalog" in out["launch"] and "cannot be launched" in out["launch"]
    assert not (laptop / "storage").exists() and not (laptop / ".machinable.sqlite").exists()
    assert {p.name for p in cache.rglob("*") if p.is_file()} == {"result.json", "log.jsonl"}
    assert any(uuids[1] in str(p) for p in cache.rglob("result.json"))

    # The server is gone: files read once are read from the cache.
    later = run_python(
        """
        from machinable import get
        print(get("track", {"lr": 0.2}).load_file("result.json")["loss"])
        """,
        laptop,
        {"MACHINABLE_INDEX": server.url("/api/v1/projects/study"), "MACHINABLE_CACHE": str(cache)},
    )
    assert float(later.stdout) == pytest.approx(out["loss"])
    gone = run_python(
        "from machinable import get\nget('track', {'lr': 0.2}).load_file('log.jsonl')\n",
        laptop,
        {"MACHINABLE_INDEX": server.url("/api/v1/projects/study"), "MACHINABLE_CACHE": str(tmp_path / "empty")},
        check=False,
    )
    assert gone.returncode != 0 and "RemoteCatalogError: cannot reach the catalog" in gone.stderr


def test_remote_search_matches_local_search(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from machinable.catalog import remote as remote_module

    launch_tracks(project, [0.1, 0.2, 0.3, 0.4, 0.5])
    monkeypatch.setattr(remote_module, "PAGE", 2)  # several pages, continued by cursor
    local = Index.get()
    expressions = [
        None,
        "config.lr >= 0.2 and config.lr < 0.4",
        {"config.lr": 0.3},
        Field("config.lr").isin([0.1, 0.4, 0.5]),
        Field("config.lr").isin([]),
        ~(Field("config.lr") > 0.25) | (Field("module") == "track") & (Field("status") != "failed"),
        Field("status") == "it's \"quoted\" \\ and ünïcode",
        Field("module").contains("rac"),
        Field("config.steps") == None,  # noqa: E711
    ]
    with running_server("--project", str(project)) as server:
        remote = Index(server.url("/api/v1/projects/study"))
        assert isinstance(remote, RemoteIndex)
        for expr in expressions:
            expected = [r.uuid for r in local.search(expr, order_by="config.lr desc")]
            assert [r.uuid for r in remote.search(expr, order_by="config.lr desc")] == expected, expr
            assert remote.count(expr) == len(expected), expr
        for limit, offset in ((2, 1), (3, 1), (None, 2), (5, 0)):
            assert [r.uuid for r in remote.search(order_by="config.lr", limit=limit, offset=offset)] == [
                r.uuid for r in local.search(order_by="config.lr", limit=limit, offset=offset)
            ], (limit, offset)
        with pytest.raises(QueryError, match="expected a value at the end"):
            remote.search("config.lr >")
        with pytest.raises(ReadOnlyCatalog):
            remote.reindex()
        with pytest.raises(RemoteCatalogError, match="no database"):
            _ = remote.engine
        with pytest.raises(RemoteCatalogError, match="no project 'nothere'"):
            Index(server.url("/api/v1/projects/nothere")).count()
    with pytest.raises(RemoteCatalogError, match="not a catalog URL"):
        Index("http://127.0.0.1:1/somewhere")


def test_remote_catalog_sends_the_token_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from machinable import Project, get

    project = tmp_path / "study"
    project.mkdir()
    with Project(project), Index(project / ".machinable.sqlite"):
        launch_tracks(project, [0.5])
    tokens = tmp_path / "tokens"
    token = "remote-analysis-token-42"
    tokens.write_text(f"{token} study\n")
    laptop = checkout(tmp_path)
    monkeypatch.setenv("MACHINABLE_CACHE", str(tmp_path / "cache"))
    with running_server("--project", str(project), "--token-file", str(tokens)) as server:
        url = server.url("/api/v1/projects/study")
        monkeypatch.delenv("MACHINABLE_TOKEN", raising=False)
        with pytest.raises(RemoteCatalogError, match="needs a token: set MACHINABLE_TOKEN") as caught:
            Index(url).count()
        assert caught.value.status == 401
        monkeypatch.setenv("MACHINABLE_TOKEN", "wrong-token-for-this-server")
        with pytest.raises(RemoteCatalogError, match="needs a token"):
            Index(url).count()
        monkeypatch.setenv("MACHINABLE_TOKEN", token)
        with Project(laptop), Index(url):
            run = get("track", {"lr": 0.5})
            assert run.cached() and run.load_file("result.json")["loss"] == pytest.approx(1 / (1 + 0.5 * 19))
    assert token not in server.output()


def test_pickles_from_a_remote_catalog_are_not_unpickled(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from machinable import get

    (uuid,) = launch_tracks(project, [0.1])
    get("track", {"lr": 0.1}).save_file("payload.p", {"x": 1})
    assert pickle.loads((get("track", {"lr": 0.1}).local_directory() / "payload.p").read_bytes()) == {"x": 1}
    monkeypatch.setenv("MACHINABLE_CACHE", str(tmp_path / "cache"))
    with running_server("--project", str(project)) as server:
        remote = Index(server.url("/api/v1/projects/study"))
        with pytest.raises(RemoteCatalogError, match="not unpickled"):
            remote.load_file(uuid, "payload.p")
        assert remote.load_file(uuid, "result.json")["loss"] > 0
        with pytest.raises(ValueError, match="outside the run directory"):
            remote.fetch_file(uuid, "../../escape.txt")


def test_literals_round_trip_through_the_parser() -> None:
    from machinable.catalog.query import Compare, parse

    for value in [0, -3, 2.5, 1e-7, 1e300, True, False, None, "", "a'b", 'a"b', "back\\slash", "tab\there", "ünï"]:
        assert parse(f"config.x = {literal(value, 'config.x')}") == Compare("config.x", "==", value), value
    with pytest.raises(QueryError, match="cannot be searched"):
        literal({"a": 1}, "config.x")
    with pytest.raises(QueryError, match="NaN"):
        literal(float("nan"), "config.x")
