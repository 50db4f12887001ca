"""Remotes end to end, as a user meets them: a project whose provider declares remotes.

A real HTTP server on 127.0.0.1 serves the modules; ``get()`` fetches on first use and
imports from ``interface/remotes/``; ``machinable fetch`` runs as a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from machinable import MachinableError, Project, get
from machinable.errors import RemoteError
from machinable.project import forget_imports

from conftest import calls, run_python, write_module

SLURM = """
from pathlib import Path

from pydantic import BaseModel

from machinable import Interface

# importing this module leaves a trace, so tests can tell "fetched" from "imported"
with open(Path.cwd() / "slurm-imported.txt", "a") as _trace:
    _trace.write("imported\\n")


class Slurm(Interface):
    class Config(BaseModel):
        partition: str = "gpu"
        nodes: int = 1

    def __call__(self):
        with open(self.project.path / "calls.txt", "a") as handle:
            handle.write(self.uuid + "\\n")
        self.save_file("job.json", {"partition": self.config.partition, "code": VERSION})

    def job(self):
        return self.load_file("job.json")


VERSION = "v1"
"""

TOOLS = """
from machinable import Interface


class Tools(Interface):
    pass
"""

SEEDED = """
from machinable import Scope


class Seeded(Scope):
    def __init__(self, seed):
        super().__init__({"seed": seed})
"""


def slurm_source(version: str = "v1") -> bytes:
    return SLURM.replace('VERSION = "v1"', f"VERSION = {version!r}").encode()


def write_provider(project: Path, remotes: dict[str, str], name: str | None = None) -> None:
    """Write ``interface/project.py``: a Project subclass declaring ``remotes``."""
    hook = f"\n    def on_resolve_name(self):\n        return {name!r}\n" if name else ""
    write_module(
        project,
        "interface.project",
        "from machinable import Project\n\n\n"
        "class Provider(Project):\n"
        f"    def on_resolve_remotes(self):\n        return {remotes!r}\n{hook}",
    )


def cached(project: Path) -> list[str]:
    """Names in ``interface/remotes/`` (temporary files included), sorted."""
    folder = project / "interface" / "remotes"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def lock(project: Path) -> dict:
    path = project / "interface" / "remotes.lock"
    return json.loads(path.read_text()) if path.exists() else {}


def imports(project: Path) -> int:
    trace = project / "slurm-imported.txt"
    return len(trace.read_text().split()) if trace.exists() else 0


def machinable(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``machinable`` command in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "machinable", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(autouse=True)
def _fresh_imports():
    forget_imports()
    yield
    forget_imports()


@pytest.fixture
def served(project: Path, http_server):
    """The project declares ``slurm`` and ``tools`` by URL; the server has both."""
    slurm = http_server.add("/slurm.py", slurm_source())
    tools = http_server.add("/tools.py", TOOLS)
    write_provider(project, {"slurm": f"url+{slurm}", "tools": f"url+{tools}"})
    return http_server


# --------------------------------------------------------------------------- get()


def test_get_fetches_on_first_use_and_runs_like_a_local_module(project, served):
    assert Project().remotes()["slurm"] == f"url+{served.url('/slurm.py')}"
    assert cached(project) == []

    run = get("slurm", {"partition": "cpu"})

    assert served.hits["/slurm.py"] == 1
    assert served.hits["/tools.py"] == 0  # only what is used is fetched
    assert cached(project) == ["slurm.py"]
    assert (project / "interface" / "remotes" / "slurm.py").read_bytes() == slurm_source()
    assert imports(project) == 1
    assert run.module == "slurm"
    assert run.config.partition == "cpu"
    assert run.status() == "new"

    run.launch()
    assert run.status() == "finished"
    assert calls(project) == [run.uuid]
    assert run.job() == {"partition": "cpu", "code": "v1"}
    directory = run.local_directory()
    assert directory == project / "storage" / run.uuid
    header = json.loads((directory / "id.json").read_text())
    assert header["module"] == "slurm"
    assert header["project"] == "study"
    assert [r.uuid for r in run.all()] == [run.uuid]

    sha = hashlib.sha256(slurm_source()).hexdigest()
    assert lock(project) == {"slurm": {"source": f"url+{served.url('/slurm.py')}", "sha256": sha}}


def test_second_get_does_not_download_again_here_or_in_a_new_process(project, served):
    first = get("slurm", {"nodes": 2}).launch()
    again = get("slurm", {"nodes": 2})
    assert again.uuid == first.uuid
    assert again.status() == "finished"
    assert served.hits["/slurm.py"] == 1
    assert imports(project) == 1

    result = run_python(
        """
        from machinable import get
        run = get("slurm", {"nodes": 2})
        print(run.uuid, run.status(), run.launch().job()["code"])
        """,
        cwd=project,
    )
    assert result.stdout.split() == [first.uuid, "finished", "v1"]
    assert served.hits["/slurm.py"] == 1
    assert served.total_hits == 1
    assert imports(project) == 2  # the new process imported the cached file
    assert calls(project) == [first.uuid]  # and did not compute the run again


def test_deleting_the_cached_file_and_changing_the_source_updates(project, served):
    old = get("slurm").launch()
    assert old.job()["code"] == "v1"

    v2 = served.add("/v2/slurm.py", slurm_source("v2"))
    write_provider(project, {"slurm": f"url+{v2}"})
    (project / "interface" / "remotes" / "slurm.py").unlink()

    result = run_python(
        """
        from machinable import get
        run = get("slurm", {"partition": "big"}).launch()
        print(run.job()["code"])
        """,
        cwd=project,
    )
    assert result.stdout.split() == ["v2"]
    assert served.hits["/v2/slurm.py"] == 1
    assert served.hits["/slurm.py"] == 1
    assert (project / "interface" / "remotes" / "slurm.py").read_bytes() == slurm_source("v2")
    assert lock(project)["slurm"] == {
        "source": f"url+{v2}",
        "sha256": hashlib.sha256(slurm_source("v2")).hexdigest(),
    }


def test_changed_bytes_at_a_locked_url_are_refused(project, served):
    get("slurm")
    locked = lock(project)["slurm"]
    (project / "interface" / "remotes" / "slurm.py").unlink()
    served.add("/slurm.py", slurm_source("evil"))

    with pytest.raises(RemoteError) as info:
        get("slurm")

    message = str(info.value)
    assert served.url("/slurm.py") in message
    assert hashlib.sha256(slurm_source("evil")).hexdigest() in message
    assert locked["sha256"] in message
    assert served.hits["/slurm.py"] == 2
    assert cached(project) == []
    assert lock(project)["slurm"] == locked


def test_sha256_pin_accepted(project, http_server):
    sha = hashlib.sha256(slurm_source()).hexdigest()
    source = f"url+{http_server.add('/slurm.py', slurm_source())}#sha256={sha}"
    write_provider(project, {"slurm": source})

    run = get("slurm").launch()

    assert run.job()["code"] == "v1"
    assert cached(project) == ["slurm.py"]
    assert lock(project) == {"slurm": {"source": source, "sha256": sha}}


def test_sha256_pin_refused(project, http_server):
    wrong = hashlib.sha256(b"something else").hexdigest()
    url = http_server.add("/slurm.py", slurm_source())
    write_provider(project, {"slurm": f"url+{url}#sha256={wrong}"})

    with pytest.raises(MachinableError) as info:
        get("slurm")

    assert isinstance(info.value, RemoteError)
    message = str(info.value)
    assert "sha256 mismatch" in message
    assert wrong in message
    assert hashlib.sha256(slurm_source()).hexdigest() in message
    assert http_server.hits["/slurm.py"] == 1
    assert cached(project) == []
    assert lock(project) == {}
    assert imports(project) == 0


def test_http_404_during_get_names_the_url(project, http_server):
    url = http_server.url("/missing/slurm.py")
    write_provider(project, {"slurm": f"url+{url}"})

    with pytest.raises(RemoteError) as info:
        get("slurm")

    assert url in str(info.value)
    assert "404" in str(info.value)
    assert info.value.name == "slurm"
    assert http_server.hits["/missing/slurm.py"] == 1
    assert cached(project) == []
    assert lock(project) == {}


def test_undeclared_module_is_still_not_found(project, served):
    from machinable.errors import ModuleResolutionError

    with pytest.raises(ModuleResolutionError, match="nosuch"):
        get("nosuch")
    assert served.total_hits == 0


# --------------------------------------------------------------------------- local sources


@pytest.fixture
def shared(project: Path) -> Path:
    """A sibling folder ``../shared`` next to the project, holding ``mod.py``."""
    folder = project.parent / "shared"
    folder.mkdir()
    (folder / "mod.py").write_bytes(slurm_source("shared"))
    return folder


def test_file_source_relative_to_the_project_copies(project, shared, monkeypatch):
    write_provider(project, {"slurm": "file+../shared/mod.py"})
    elsewhere = project.parent / "work" / "elsewhere"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # relative to the project, not to the cwd

    with Project(project):
        run = get("slurm").launch()
    monkeypatch.chdir(project)

    target = project / "interface" / "remotes" / "slurm.py"
    assert not target.is_symlink()
    assert target.read_bytes() == slurm_source("shared")
    assert run.job()["code"] == "shared"
    assert lock(project)["slurm"]["source"] == "file+../shared/mod.py"
    # a copy: later edits of the original do not reach the project
    (shared / "mod.py").write_bytes(slurm_source("edited"))
    result = run_python(
        'from machinable import get\nprint(get("slurm", {"nodes": 5}).launch().job()["code"])',
        cwd=project,
    )
    assert result.stdout.split() == ["shared"]


def test_link_source_relative_to_the_project_symlinks(project, shared):
    write_provider(project, {"slurm": "link+../shared/mod.py"})
    elsewhere = project.parent / "work" / "elsewhere"
    elsewhere.mkdir(parents=True)

    # relative to the project, not to the cwd of the command
    fetched = machinable(elsewhere, "--project", str(project), "fetch")
    assert fetched.returncode == 0, fetched.stderr
    assert "link+../shared/mod.py" in fetched.stdout
    run = get("slurm").launch()

    target = project / "interface" / "remotes" / "slurm.py"
    assert target.is_symlink()
    assert target.resolve() == (shared / "mod.py").resolve()
    assert run.job()["code"] == "shared"
    # a link: a new process sees edits of the original
    (shared / "mod.py").write_bytes(slurm_source("edited"))
    result = run_python(
        'from machinable import get\nprint(get("slurm", {"nodes": 5}).launch().job()["code"])',
        cwd=project,
    )
    assert result.stdout.split() == ["edited"]


# --------------------------------------------------------------------------- contexts & name


def test_remote_scope_is_usable_as_a_context(project, http_server):
    url = http_server.add("/seeded.py", SEEDED)
    write_provider(project, {"seeded": f"url+{url}"})

    outside = get("optimize").launch()
    scope = get("seeded", {"seed": 3})
    assert type(scope).__name__ == "Seeded"
    assert scope.predicate == {"seed": 3}
    with scope:
        inside = get("optimize").launch()
        assert inside.predicate == {"seed": 3}
        assert [r.uuid for r in inside.all()] == [inside.uuid]
        with get("seeded", {"seed": 4}):
            assert get("optimize").all() == []

    assert inside.uuid != outside.uuid
    assert get("optimize").uuid == outside.uuid
    assert sorted(r.uuid for r in outside.all()) == sorted([outside.uuid, inside.uuid])
    assert calls(project) == [outside.uuid, inside.uuid]
    assert http_server.hits["/seeded.py"] == 1


def test_provider_name_is_the_runs_project(project, served):
    write_provider(project, {"slurm": f"url+{served.url('/slurm.py')}"}, name="cluster-study")

    assert Project().name == "cluster-study"
    run = get("slurm").launch()
    local = get("optimize").launch()

    for item in (run, local):
        header = json.loads((item.local_directory() / "id.json").read_text())
        assert header["project"] == "cluster-study"
        assert item.record().project == "cluster-study"

    # the same config under another project name is another run
    forget_imports()
    write_provider(project, {"slurm": f"url+{served.url('/slurm.py')}"}, name="other")
    assert get("slurm").uuid != run.uuid
    assert served.hits["/slurm.py"] == 1


# --------------------------------------------------------------------------- machinable fetch


def test_fetch_downloads_everything_prints_hashes_and_imports_nothing(project, served):
    result = machinable(project, "fetch")

    assert result.returncode == 0, result.stderr
    assert cached(project) == ["slurm.py", "tools.py"]
    assert served.hits["/slurm.py"] == 1
    assert served.hits["/tools.py"] == 1
    assert imports(project) == 0
    for name, body in (("slurm", slurm_source()), ("tools", TOOLS.encode())):
        url = served.url(f"/{name}.py")
        sha = hashlib.sha256(body).hexdigest()
        assert (project / "interface" / "remotes" / f"{name}.py").read_bytes() == body
        assert lock(project)[name] == {"source": f"url+{url}", "sha256": sha}
        block = result.stdout.split(f"fetched {name} from url+{url}\n", 1)[1]
        assert block.splitlines()[1].split() == ["sha256", sha]

    # the fetched module then runs without another download
    assert get("slurm").launch().job()["code"] == "v1"
    assert served.hits["/slurm.py"] == 1

    # fetching again downloads nothing and says so
    again = machinable(project, "fetch")
    assert again.returncode == 0, again.stderr
    assert "fetched" not in again.stdout
    assert again.stdout.count("cached ") == 2
    assert served.total_hits == 2


def test_fetch_one_name(project, served):
    result = machinable(project, "fetch", "slurm")

    assert result.returncode == 0, result.stderr
    assert cached(project) == ["slurm.py"]
    assert served.hits["/slurm.py"] == 1
    assert served.hits["/tools.py"] == 0
    assert "tools" not in result.stdout
    assert hashlib.sha256(slurm_source()).hexdigest() in result.stdout
    assert list(lock(project)) == ["slurm"]
    assert imports(project) == 0


def test_fetch_unknown_name_fails_with_one_line(project, served):
    result = machinable(project, "fetch", "nosuch")

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:")
    assert "nosuch" in lines[0] and "declared" in lines[0]
    assert "Traceback" not in result.stderr
    assert served.total_hits == 0
    assert cached(project) == []


def test_fetch_failure_is_one_error_line_naming_the_url(project, http_server):
    url = http_server.url("/gone.py")
    write_provider(project, {"gone": f"url+{url}"})

    result = machinable(project, "fetch")

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:")
    assert url in lines[0] and "404" in lines[0]
    assert cached(project) == []


def test_fetch_check_passes_on_a_clean_cache_and_fails_after_tampering(project, served):
    assert machinable(project, "fetch").returncode == 0
    hits = served.total_hits

    clean = machinable(project, "fetch", "--check")
    assert clean.returncode == 0, clean.stderr
    assert "2 remote(s) match" in clean.stdout

    target = project / "interface" / "remotes" / "slurm.py"
    target.write_bytes(target.read_bytes() + b"\nimport os  # injected\n")

    tampered = machinable(project, "fetch", "--check")
    assert tampered.returncode != 0
    assert "'slurm'" in tampered.stderr
    assert "'tools'" not in tampered.stderr
    assert hashlib.sha256(target.read_bytes()).hexdigest() in tampered.stderr
    assert tampered.stderr.strip().splitlines()[-1].startswith("Error:")
    assert served.total_hits == hits  # --check never downloads
    assert imports(project) == 0

    only_tools = machinable(project, "fetch", "--check", "tools")  # names narrow the check
    assert only_tools.returncode == 0, only_tools.stderr
    assert "1 remote(s) match" in only_tools.stdout
    only_slurm = machinable(project, "fetch", "--check", "slurm")
    assert only_slurm.returncode != 0 and "'slurm'" in only_slurm.stderr


def test_fetch_check_reports_remotes_not_fetched_yet(project, served):
    result = machinable(project, "fetch", "--check")

    assert result.returncode != 0
    assert "'slurm'" in result.stderr and "'tools'" in result.stderr
    assert served.total_hits == 0
    assert cached(project) == []
