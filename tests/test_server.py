"""The catalog server over real HTTP: a ``machinable serve`` subprocess on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests

from machinable import Index, get

from catalogserver import TRACK, launch_tracks, running_server
from conftest import invoke, one_line_error, write_module

RUN_KEYS = {
    "uuid", "module", "config", "version", "predicate", "status",
    "created_at", "started_at", "finished_at", "digest", "copies",
}


def raw_get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """GET a path exactly as written (no client-side normalisation of '..' or '%2F')."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, json.loads(body) if body.startswith(b"{") else {"raw": body}


def test_api_serves_projects_runs_files(project: Path, tmp_path: Path) -> None:
    uuids = launch_tracks(project, [0.1, 0.2, 0.3, 0.4])
    archive = tmp_path / "archive"
    archive.mkdir()
    get("track", {"lr": 0.1}).push(f"file://{archive}")
    with running_server("--project", str(project)) as server:
        listed = requests.get(server.url("/api/v1/projects"), timeout=10).json()
        assert listed == {"projects": [{"name": "study", "runs": 4}]}

        page = requests.get(
            server.url("/api/v1/projects/study/runs"),
            params={"where": "config.lr >= 0.2", "order_by": "config.lr desc", "limit": 2, "offset": 1},
            timeout=10,
        ).json()
        assert page["count"] == 3 and page["limit"] == 2 and page["offset"] == 1
        assert [run["config"]["lr"] for run in page["runs"]] == [0.3, 0.2]
        assert all(set(run) == RUN_KEYS for run in page["runs"])
        assert requests.get(server.url("/api/v1/projects/study/runs"), timeout=10).json()["limit"] == 100

        detail = requests.get(server.url(f"/api/v1/projects/study/runs/{uuids[0]}"), timeout=10).json()
        assert set(detail) == RUN_KEYS
        assert detail["uuid"] == uuids[0] and detail["module"] == "track"
        assert detail["config"] == {"lr": 0.1, "steps": 20} and detail["status"] == "finished"
        assert detail["version"] == [{"lr": 0.1}] and detail["predicate"] == {}
        assert detail["finished_at"] >= detail["started_at"] >= detail["created_at"][:10]
        local, stored = detail["copies"]
        assert local["store"] == "local" and local["state"] == "present"
        assert local["url"] == str(get("track", {"lr": 0.1}).local_directory())
        assert stored["url"] == f"file://{archive}" and stored["state"] == "present"
        assert stored["size"] > 0 and stored["verified_at"][:4] == detail["finished_at"][:4]
        # Pushing recorded the run's digest (sha256 of its manifest); the API serves it.
        assert isinstance(detail["digest"], str) and len(detail["digest"]) == 64
        assert int(detail["digest"], 16) >= 0
        listed = {run["uuid"]: run for run in requests.get(server.url("/api/v1/projects/study/runs"), timeout=10).json()["runs"]}
        assert listed[uuids[0]]["copies"] == detail["copies"]
        assert len(listed[uuids[1]]["copies"]) == 1
        assert set(local) == set(stored) == {"store", "url", "state", "size", "checksum", "verified_at"}

        files = requests.get(server.url(f"/api/v1/projects/study/runs/{uuids[0]}/files"), timeout=10).json()
        paths = {item["path"]: item["size"] for item in files["files"]}
        assert {"log.jsonl", "result.json", "notes/readme.txt", "id.json", "model.json"} <= set(paths)
        assert ".machinable" not in paths
        directory = get("track", {"lr": 0.1}).local_directory()
        assert paths["log.jsonl"] == (directory / "log.jsonl").stat().st_size

        whole = requests.get(server.url(f"/api/v1/projects/study/runs/{uuids[0]}/files/log.jsonl"), timeout=10)
        assert whole.status_code == 200 and whole.content == (directory / "log.jsonl").read_bytes()
        part = requests.get(
            server.url(f"/api/v1/projects/study/runs/{uuids[0]}/files/notes/readme.txt"),
            headers={"Range": "bytes=3-5"},
            timeout=10,
        )
        assert part.status_code == 206 and part.content == b"0.1"
        assert part.headers["content-range"] == "bytes 3-5/6"

        get("track", {"lr": 0.1}).evict()  # the server sees the local copy go (the store keeps one)
        again = requests.get(server.url(f"/api/v1/projects/study/runs/{uuids[0]}"), timeout=10).json()
        assert [(copy["store"], copy["state"]) for copy in again["copies"]] == [(stored["store"], "present")]
        # A directory the index still lists but whose sentinel is gone (an eviction cut
        # short) is listed as an evicted local copy.
        (get("track", {"lr": 0.2}).local_directory() / ".machinable").unlink()
        second = requests.get(server.url(f"/api/v1/projects/study/runs/{uuids[1]}"), timeout=10).json()
        assert [(copy["store"], copy["state"]) for copy in second["copies"]] == [("local", "evicted")]


def test_api_errors_are_one_line_json(project: Path) -> None:
    (uuid,) = launch_tracks(project, [0.1])
    base = "/api/v1/projects/study"
    cases = {
        f"{base}/runs?where=config.lr%20%3E": (400, "expected a value at the end"),
        f"{base}/runs?where=nonsense.x%20%3D%201": (400, "unknown field"),
        f"{base}/runs?order_by=config.lr%20sideways": (400, "cannot order by"),
        f"{base}/runs?limit=1001": (400, "at most 1000"),
        f"{base}/runs?limit=-1": (400, "negative"),
        f"{base}/runs?offset=x": (400, "offset"),
        "/api/v1/projects/nothere/runs": (404, "no project 'nothere'"),
        f"{base}/runs/{'0' * 32}": (404, "no run"),
        f"{base}/runs/{uuid}/files/missing.txt": (404, "no file"),
    }
    with running_server("--project", str(project)) as server:
        for path, (status, needle) in cases.items():
            got, body = raw_get(server.base, path)
            assert got == status, (path, body)
            assert set(body) == {"detail"} and needle in body["detail"] and "\n" not in body["detail"], path
        # the schema is served; no page that would load scripts from a CDN is
        assert raw_get(server.base, "/openapi.json")[0] == 200
        for path in ("/docs", "/redoc"):
            assert raw_get(server.base, path)[0] == 404, path


def test_runs_launched_while_serving_appear(project: Path) -> None:
    launch_tracks(project, [0.1])
    with running_server("--project", str(project)) as server:
        url = server.url("/api/v1/projects/study/runs")
        assert requests.get(url, timeout=10).json()["count"] == 1
        later = get("track", {"lr": 0.7}).launch()
        page = requests.get(url, params={"where": "config.lr = 0.7"}, timeout=10).json()
        assert [run["uuid"] for run in page["runs"]] == [later.uuid]
        assert requests.get(server.url("/api/v1/projects"), timeout=10).json()["projects"][0]["runs"] == 2
        files = requests.get(server.url(f"/api/v1/projects/study/runs/{later.uuid}/files"), timeout=10)
        assert files.status_code == 200


def test_paging_covers_every_run_once(project: Path, index_backend: str) -> None:
    launch_tracks(project, [0.1])
    # 250 more rows, as a store reindex would add them (no directories); every seventh has
    # no lr at all, every eleventh a string or a boolean, and lrs repeat, so sorting meets
    # missing values, mixed kinds and ties.
    template = Index.get().find(get("track", {"lr": 0.1}).uuid)
    assert template is not None
    rows = []
    for i in range(250):
        row = {k: v for k, v in template.__dict__.items() if k != "directories"}
        config = {"steps": 20} if i % 7 == 0 else {"lr": (i % 40) / 100, "steps": 20}
        if i % 11 == 0:
            config["lr"] = ("fast", "slow", True, False)[i % 4]
        row.update(uuid=f"{i:032x}", config_key=f"{i:032x}", config=config, status=("failed", "finished")[i % 3 > 0])
        rows.append(row)
    Index.get().add_rows(rows)
    url = "/api/v1/projects/study/runs"
    with running_server("--project", str(project)) as server:
        cases = [(None, order) for order in (None, "-config.lr", "config.lr", "status desc", "-created_at")]
        cases += [("config.lr >= 0.1", "config.lr"), ("status = 'finished'", "config.lr, -config.steps")]
        # descending by a path that holds only numbers: walked along the leaves index
        cases += [(None, "-config.steps"), ("status = 'finished'", "-config.steps, config.lr")]
        for where, order in cases:
            params = {"order_by": order} if order else {}
            if where:
                params["where"] = where
            whole = requests.get(server.url(url), params={**params, "limit": 1000}, timeout=10).json()
            expected = [run["uuid"] for run in whole["runs"]]
            size = Index.get().count(where)
            assert len(expected) == len(set(expected)) == whole["count"] == size
            if not where:
                assert size == 251
            # the server lists what the catalog's own search lists, in its order
            listed = Index.get().search(where, order_by=order.split(",") if order else None, limit=1000)
            assert expected == [record.uuid for record in listed], (where, order)
            assert whole["next"] is None
            # without the total, the same page and cursor; the total alone with limit=0
            uncounted = requests.get(server.url(url), params={**params, "limit": 60, "count": "false"}, timeout=10).json()
            assert uncounted["count"] is None and [run["uuid"] for run in uncounted["runs"]] == expected[:60]
            counted = requests.get(server.url(url), params={**params, "limit": 0}, timeout=10).json()
            assert counted["count"] == size and counted["runs"] == []
            by_offset: list[str] = []
            by_cursor: list[str] = []
            cursor = None
            for offset in range(0, size + 60, 60):  # one page past the end
                page = requests.get(server.url(url), params={**params, "limit": 60, "offset": offset}, timeout=10).json()
                assert page["count"] == size
                by_offset += [run["uuid"] for run in page["runs"]]
            while True:
                page = requests.get(
                    server.url(url), params={**params, "limit": 60, **({"after": cursor} if cursor else {})}, timeout=10
                ).json()
                by_cursor += [run["uuid"] for run in page["runs"]]
                cursor = page["next"]
                if cursor is None:
                    break
                assert len(by_cursor) <= size, (where, order)
            assert by_offset == expected, (where, order)
            assert by_cursor == expected, (where, order)
        where = {"where": "config.lr >= 0.2", "order_by": "-config.lr", "limit": 50}
        first = requests.get(server.url(url), params=where, timeout=10).json()
        foreign = requests.get(server.url(url), params={"after": first["next"], "limit": 50}, timeout=10)
        assert foreign.status_code == 400 and "another where/order_by" in foreign.json()["detail"]
        for bad in ("xyz", "e30", first["next"][:-3]):
            answer = requests.get(server.url(url), params={**where, "after": bad}, timeout=10)
            assert answer.status_code == 400 and "after" in answer.json()["detail"], bad
        both = requests.get(server.url(url), params={**where, "after": first["next"], "offset": 5}, timeout=10)
        assert both.status_code == 400
        # A run known only from a store has no files here: a clear 404, not a crash.
        status, body = raw_get(server.base, f"/api/v1/projects/study/runs/{0:032x}/files")
        assert status == 404 and "not present on this server" in body["detail"]


# Security.

TOKEN_ALL = "all-projects-token-0123456789"
TOKEN_ALPHA = "alpha-only-token-0123456789"


def make_root(tmp_path: Path) -> Path:
    """A root with two projects, alpha and beta, each with its own index and one run."""
    from machinable import Project

    root = tmp_path / "lab"
    for name in ("alpha", "beta"):
        path = root / name
        path.mkdir(parents=True)
        write_module(path, "track", TRACK)
        with Project(path), Index(path / ".machinable.sqlite"):
            get("track", {"lr": 0.5}).launch()
    return root


def test_tokens_guard_every_api_route(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# lab tokens\n{TOKEN_ALL}\n{TOKEN_ALPHA} alpha\n")
    with running_server("--root", str(root), "--token-file", str(tokens)) as server:
        for path in ("/api/v1/projects", "/api/v1/projects/alpha/runs", "/api/v1/projects/nothere/runs"):
            assert requests.get(server.url(path), timeout=10).status_code == 401
            wrong = requests.get(server.url(path), headers={"Authorization": f"Bearer {TOKEN_ALL}x"}, timeout=10)
            assert wrong.status_code == 401 and set(wrong.json()) == {"detail"}
        every = {"Authorization": f"Bearer {TOKEN_ALL}"}
        alpha = {"Authorization": f"Bearer {TOKEN_ALPHA}"}
        listed = requests.get(server.url("/api/v1/projects"), headers=every, timeout=10).json()
        assert listed == {"projects": [{"name": "alpha", "runs": 1}, {"name": "beta", "runs": 1}]}
        only = requests.get(server.url("/api/v1/projects"), headers=alpha, timeout=10).json()
        assert only == {"projects": [{"name": "alpha", "runs": 1}]}
        assert requests.get(server.url("/api/v1/projects/alpha/runs"), headers=alpha, timeout=10).status_code == 200
        refused = requests.get(server.url("/api/v1/projects/beta/runs"), headers=alpha, timeout=10)
        assert refused.status_code == 403 and "beta" in refused.json()["detail"]
        assert requests.get(server.url("/api/v1/projects/beta/runs"), headers=every, timeout=10).status_code == 200
        # The page itself holds no data and loads without a token.
        assert requests.get(server.url("/"), timeout=10).status_code == 200

        # A browser signs in once: the form sets an HttpOnly cookie the API accepts.
        browser = requests.Session()
        bad = browser.post(server.url("/login"), data={"token": "not-a-token"}, allow_redirects=False, timeout=10)
        assert bad.status_code == 401 and not browser.cookies
        good = browser.post(
            server.url("/login"), data={"token": TOKEN_ALPHA, "next": "//evil.example/"}, allow_redirects=False, timeout=10
        )
        assert good.status_code == 303 and good.headers["location"] == "/"
        assert "httponly" in good.headers["set-cookie"].lower()
        assert browser.get(server.url("/api/v1/projects/alpha/runs"), timeout=10).status_code == 200
        assert browser.get(server.url("/api/v1/projects/beta/runs"), timeout=10).status_code == 403
    output = server.output()
    assert TOKEN_ALL not in output and TOKEN_ALPHA not in output


def test_non_loopback_host_needs_a_token_file(tmp_path: Path) -> None:
    result = invoke("serve", "--project", str(tmp_path), "--host", "0.0.0.0", ok=False)
    one_line_error(result, "0.0.0.0", "--token-file")
    short = tmp_path / "tokens"
    short.write_text("abc\n")
    result = invoke("serve", "--project", str(tmp_path), "--token-file", str(short), ok=False)
    line = one_line_error(result, "shorter than 16")
    assert "abc" not in line


@pytest.mark.parametrize(
    "name",
    ["..", "..%2Fbeta", "%2E%2E", "alpha%2F..%2Fbeta", "alpha%5Cbeta", "alpha\\beta", "%252F", "..%2F..%2Fetc"],
)
def test_project_names_that_leave_the_root_are_refused(tmp_path: Path, name: str, lab_server) -> None:
    status, body = raw_get(lab_server.base, f"/api/v1/projects/{name}/runs")
    assert status == 400 and "invalid project name" in body["detail"]


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory: pytest.TempPathFactory):
    """One server over a root holding alpha and beta, and an outside project linked in."""
    from machinable.catalog.engine import dispose_all

    tmp_path = tmp_path_factory.mktemp("lab")
    root = make_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".machinable.sqlite").write_bytes((root / "alpha" / ".machinable.sqlite").read_bytes())
    (root / "linked").symlink_to(outside)
    dispose_all()
    with running_server("--root", str(root)) as server:
        server.root = root  # type: ignore[attr-defined]
        yield server


def test_without_tokens_only_loopback_host_names_are_answered(lab_server) -> None:
    for host in ("127.0.0.1", f"127.0.0.1:{urlsplit(lab_server.base).port}", "localhost:1", "[::1]:8000"):
        status, _ = raw_get(lab_server.base, "/api/v1/projects", headers={"Host": host})
        assert status == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "192.168.1.5"):
        for path in ("/api/v1/projects", "/"):
            status, body = raw_get(lab_server.base, path, headers={"Host": host})
            assert status == 400 and "127.0.0.1 or localhost" in body["detail"], host


def test_projects_outside_a_root_are_not_served(lab_server) -> None:
    listed = requests.get(lab_server.url("/api/v1/projects"), timeout=10).json()
    assert [p["name"] for p in listed["projects"]] == ["alpha", "beta"]
    status, body = raw_get(lab_server.base, "/api/v1/projects/linked/runs")
    assert status == 404


def test_file_paths_that_leave_the_run_are_refused(lab_server) -> None:
    alpha = lab_server.root / "alpha"
    (uuid,) = [p.name for p in (alpha / "storage").iterdir() if not p.name.startswith(".")]
    directory = alpha / "storage" / uuid
    secret = lab_server.root.parent / "secret.txt"
    secret.write_text("do not serve")
    (directory / "escape.txt").symlink_to(secret)
    (directory / "escape_dir").symlink_to(lab_server.root.parent, target_is_directory=True)
    (directory / "inside.txt").symlink_to(directory / "result.json")
    base = f"/api/v1/projects/alpha/runs/{uuid}/files"
    for path in (
        "../../../secret.txt",
        "..%2F..%2F..%2Fsecret.txt",
        "%2E%2E/%2E%2E/%2E%2E/secret.txt",
        "notes/..%2F..%2F..%2F..%2Fsecret.txt",
        "%2Fetc%2Fpasswd",
        "notes%5C..%5C..%5Cid.json",
        "escape.txt",
        "escape_dir/secret.txt",
    ):
        status, body = raw_get(lab_server.base, f"{base}/{path}")
        assert status in (400, 404), (path, status)
        assert b"do not serve" not in json.dumps(body).encode(), path
        assert set(body) == {"detail"}, path
    status, body = raw_get(lab_server.base, f"{base}/escape.txt")
    assert status == 400 and "outside the run directory" in body["detail"]
    listed = requests.get(lab_server.url(base), timeout=10).json()
    paths = [item["path"] for item in listed["files"]]
    assert "escape.txt" not in paths and not any(p.startswith("escape_dir") for p in paths)
    assert "inside.txt" in paths
    inside = requests.get(lab_server.url(f"{base}/inside.txt"), timeout=10)
    assert inside.status_code == 200 and inside.content == (directory / "result.json").read_bytes()
    # A run file never renders as a page of the catalog's origin.
    assert "sandbox" in inside.headers["content-security-policy"]


def test_server_imports_no_project_code_and_writes_no_run_data(project: Path) -> None:
    launch_tracks(project, [0.1, 0.2])
    marker = project.parent / "imported"
    (project / "interface").mkdir()
    (project / "interface" / "project.py").write_text(
        f"open({str(marker)!r}, 'w').write('provider')\n"
        "from machinable import Project\n\nclass Study(Project):\n    pass\n"
    )
    (project / "track.py").write_text(f"open({str(marker)!r}, 'w').write('module')\n" + TRACK)

    def snapshot() -> dict[str, tuple[int, int]]:
        found = {}
        for base, _dirs, names in os.walk(project / "storage"):
            for name in names:
                info = os.lstat(os.path.join(base, name))
                found[os.path.join(base, name)] = (info.st_size, info.st_mtime_ns)
        return found

    before = snapshot()
    with running_server("--project", str(project)) as server:
        runs = requests.get(server.url("/api/v1/projects/study/runs"), timeout=10).json()["runs"]
        for run in runs:
            requests.get(server.url(f"/api/v1/projects/study/runs/{run['uuid']}"), timeout=10).raise_for_status()
            for item in requests.get(server.url(f"/api/v1/projects/study/runs/{run['uuid']}/files"), timeout=10).json()["files"]:
                requests.get(
                    server.url(f"/api/v1/projects/study/runs/{run['uuid']}/files/{quote(item['path'])}"), timeout=10
                ).raise_for_status()
        assert requests.get(server.url("/"), timeout=10).status_code == 200
    assert not marker.exists()
    assert snapshot() == before


def test_serve_without_flags_serves_the_current_project(project: Path) -> None:
    launch_tracks(project, [0.1])
    with running_server(cwd=project) as server:
        assert requests.get(server.url("/api/v1/projects"), timeout=10).json() == {
            "projects": [{"name": "study", "runs": 1}]
        }
        assert requests.get(server.url("/openapi.json"), timeout=10).json()["paths"]


def test_readme_serving_section_runs_as_written(tmp_path: Path) -> None:
    """The README's serve command, token file and analysis example, against a real server."""
    import re
    import shlex
    import shutil

    from machinable import Project

    from conftest import REPO, run_python

    readme = (REPO / "README.md").read_text()
    start = readme.index("## Serving a catalog")
    section = readme[start : readme.index("\n## ", start + 1)]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", section, re.S | re.M)
    (command,) = [body for lang, body in blocks if lang == "bash"]
    token_file = next(body for lang, body in blocks if lang == "text" and "projects it reaches" in body)
    (analysis,) = [body for lang, body in blocks if lang == "py"]

    root = tmp_path / "lab"
    for name in ("my-study", "laptop/my-study"):
        (root.parent / name if name.startswith("laptop") else root / name).mkdir(parents=True)
    study, laptop = root / "my-study", tmp_path / "laptop" / "my-study"
    for folder in (study, laptop):
        shutil.copy(REPO / "example" / "optimize.py", folder / "optimize.py")
    with Project(study), Index(study / ".machinable.sqlite"):
        for lr in (0.1, 0.2, 0.5):
            get("optimize", {"lr": lr}).launch()
    tokens = tmp_path / "tokens"
    tokens.write_text(token_file)
    args = shlex.split(command.strip())[2:]  # after "machinable serve"
    args = [{"/srv/lab": str(root), "/etc/machinable/tokens": str(tokens), "0.0.0.0": "127.0.0.1"}.get(a, a) for a in args]
    port = args.index("--port")
    del args[port : port + 2]  # running_server picks a free port
    first_token = token_file.splitlines()[1].split()[0]
    with running_server(*args) as server:
        env = {
            "MACHINABLE_INDEX": server.url("/api/v1/projects/my-study"),
            "MACHINABLE_TOKEN": first_token,
            "MACHINABLE_CACHE": str(tmp_path / "cache"),
        }
        result = run_python(analysis, laptop, env)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("0.2 ") and lines[1].startswith("0.5 ") and lines[2] == "3"
    assert not (laptop / "storage").exists()


def test_a_cursor_page_seeks_where_the_previous_page_ended(tmp_path: Path) -> None:
    """A page after a cursor starts its index walk at the cursor's sort key (a range the
    database seeks), not at the start of the order, so the last page of a long result
    costs what the first does; its runs are the catalog's own at that offset."""
    from sqlalchemy import event
    from test_search_indexes import bulk_rows

    from machinable.catalog.engine import to_url
    from machinable.server import queries
    from machinable.server.config import ServedProject

    index = Index(tmp_path / "deep.sqlite")
    index.add_rows(bulk_rows(3000, lambda k: {"i": k, "lr": (k % 10) / 10}))
    served = ServedProject(name="deep", path=tmp_path, index_url=to_url(tmp_path / "deep.sqlite"), scope=None)
    for where, order, seek, offset in (
        (None, "config.i", "number>", 2800),
        ("config.lr >= 0.5", "-config.lr", "number<", 1400),
        (None, "-created_at", "created_at<", 2800),
    ):
        _, _, cursor = queries.list_runs(served, where, order, 1, offset - 1, with_count=False)
        seen: list[tuple[str, object]] = []

        def capture(conn, cursor_, statement, parameters, context, executemany, seen=seen):
            seen.append((statement, parameters))

        event.listen(index.engine, "before_cursor_execute", capture)
        try:
            page, _, _ = queries.list_runs(served, where, order, 100, 0, after=cursor, with_count=False)
        finally:
            event.remove(index.engine, "before_cursor_execute", capture)
        expected = index.search(where, order_by=order, limit=100, offset=offset)
        assert len(expected) == 100
        assert [json.loads(run)["uuid"] for run in page] == [r.uuid for r in expected], (where, order)
        statement, parameters = next((s, p) for s, p in seen if "_k0" in s)
        with index.engine.connect() as conn:
            steps = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
        assert any(seek in step for step in steps), (order, steps)


def test_a_repeated_page_reuses_its_statement_but_reads_fresh_rows(tmp_path: Path, monkeypatch) -> None:
    """The same where/order_by (first page or a cursor page) reuses the statement built
    for it, for as long as the plan's probes are trusted; the rows are read anew each
    time, so a run added in between is listed. Another search builds its own."""
    from test_search_indexes import bulk_rows

    from machinable.catalog import query
    from machinable.catalog.engine import to_url
    from machinable.server import queries
    from machinable.server.config import ServedProject

    index = Index(tmp_path / "same.sqlite")
    rows = bulk_rows(300, lambda k: {"i": k, "lr": (k % 10) / 10})
    index.add_rows(rows[:200])
    served = ServedProject(name="same", path=tmp_path, index_url=to_url(tmp_path / "same.sqlite"), scope=None)
    where, order = "config.lr >= 0.5", "-config.i"
    first, _, cursor = queries.list_runs(served, where, order, 50, 0, with_count=False)
    queries.list_runs(served, where, order, 50, 0, after=cursor, with_count=False)

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again")

    monkeypatch.setattr(queries, "plan", no_planning)
    index.add_rows(rows[200:])
    again, _, later = queries.list_runs(served, where, order, 50, 0, with_count=False)
    assert [json.loads(r)["config"]["i"] for r in again] == [r.config["i"] for r in index.search(where, order_by=order, limit=50)]
    assert json.loads(again[0])["config"]["i"] == 299 and again != first
    queries.list_runs(served, where, order, 50, 0, after=later, with_count=False)
    with pytest.raises(AssertionError, match="planned again"):
        queries.list_runs(served, "config.lr < 0.5", order, 50, 0, with_count=False)
    monkeypatch.setattr(query, "DENSE_TTL", 0.0)
    with pytest.raises(AssertionError, match="planned again"):
        queries.list_runs(served, where, order, 50, 0, with_count=False)


def test_a_json_column_that_is_not_json_cannot_reshape_the_answer(tmp_path: Path) -> None:
    """An index file from elsewhere may hold anything in a JSON column. The server passes
    stored JSON through as text, so text that would close the run's object and add keys
    of its own is sent as a string: the answer stays one run with its own uuid."""
    import sqlite3

    from test_search_indexes import bulk_rows

    from machinable.catalog.engine import dispose_all, to_url
    from machinable.server import queries
    from machinable.server.config import ServedProject

    path = tmp_path / "odd.sqlite"
    index = Index(path)
    index.add_rows(bulk_rows(2, lambda k: {"i": k}))
    uuid = f"{1:032x}"
    hostile = '{"i": 1}, "uuid": "forged", "copies": [{"store": "evil"}]'
    dispose_all()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET config = ?, predicate = ? WHERE uuid = ?", (hostile, "not json", uuid))
    served = ServedProject(name="odd", path=tmp_path, index_url=to_url(path), scope=None)
    run = json.loads(queries.get_run(served, uuid))
    assert run["uuid"] == uuid and run["config"] == hostile and run["predicate"] == "not json"
    assert run["copies"] == []
    listed = [json.loads(text) for text in queries.list_runs(served, None, None, 10, 0)[0]]
    assert [r["uuid"] for r in listed] == [f"{0:032x}", uuid] and listed[0]["config"] == {"i": 0}
    assert listed[1]["config"] == hostile
