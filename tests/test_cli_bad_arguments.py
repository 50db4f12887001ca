"""Every CLI command with missing, empty, huge and malformed arguments (issue 14): one
line on stderr, a non-zero exit, and nothing changed (the index rows and every file
under the test's directory are compared before and after)."""

from __future__ import annotations

from pathlib import Path

import click
from test_bad_input import rows, tree

from machinable import get
from machinable.catalog.engine import dispose_all
from machinable.cli import cli
from machinable.project import forget_imports

from conftest import invoke, one_line_error

HUGE = "x" * 100_000
UUID = "0" * 32
BIG = "9" * 30

# (arguments, a word the one-line error must contain)
TABLE: list[tuple[list[str], str]] = [
    # the group (bare `machinable` prints the help and succeeds: issue 13,
    # tests/test_upstream_behaviours.py)
    (["--nosuch"], "--nosuch"),
    (["nosuch"], "nosuch"),
    (["--index", "", "ls"], "--index"),
    (["--storage", "", "ls"], "--storage"),
    (["--project", "", "ls"], "--project"),
    (["--project", HUGE, "ls"], "File name too long"),
    (["--index", "notaurl://x", "ls"], "notaurl"),
    (["--index", HUGE, "ls"], "cannot open the index"),
    # get
    (["get"], "MODULE"),
    (["get", ""], "not a valid module name"),
    (["get", HUGE], "limit is 255"),
    (["get", "optimize", "=1"], "no key"),
    (["get", "optimize", HUGE + "=1"], "unknown config key"),
    (["get", "optimize", "lr=" + "9" * 5000], "lr"),
    (["get", "optimize", "lr"], "neither key=value"),
    (["get", "optimize", "---"], "no method"),
    (["get", "optimize", "--push"], "needs arguments"),
    (["get", "optimize", "--launch", "--" + HUGE], "no method"),
    # ls
    (["ls", "--where", ""], "empty search expression"),
    (["ls", "--where", HUGE], "limit is"),
    (["ls", "--where", "config.lr = " + BIG], "64 bits"),
    (["ls", "--where", "config.lr = 'a"], "unterminated"),
    (["ls", "--limit", "-1"], "--limit"),
    (["ls", "--limit", "abc"], "--limit"),
    (["ls", "--limit", BIG], "--limit"),
    (["ls", "--offset", BIG], "--offset"),
    (["ls", "--order-by", ""], "cannot order by"),
    (["ls", "--order-by", "config.lr sideways"], "cannot order by"),
    (["ls", "--order-by", HUGE], "limit is 255"),
    (["ls", HUGE], "limit is 255"),
    (["ls", "not a module"], "not a valid module name"),
    # import
    (["import"], "SOURCE"),
    (["import", ""], "is empty"),
    (["import", "/nonexistent/storage"], "not a directory"),
    (["import", HUGE], "not a directory"),
    (["import", ".", "--live-window", "-1"], "--live-window"),
    (["import", ".", "--live-window", "nan"], "--live-window"),
    (["import", ".", "--live-window", BIG + "e400"], "--live-window"),
    # reindex, verify, gc
    (["reindex", ""], "is empty"),
    (["reindex", "/nonexistent/storage"], "does not exist"),
    (["reindex", HUGE], "File name too long"),
    (["verify", ""], "is empty"),
    (["verify", "/nonexistent/storage"], "does not exist"),
    (["verify", HUGE], "File name too long"),
    (["gc", ""], "is empty"),
    (["gc", "", "--yes"], "is empty"),
    (["gc", "/nonexistent/storage", "--yes"], "does not exist"),
    (["gc", HUGE], "File name too long"),
    # push, pull, evict
    (["push"], "--to"),
    (["push", "--to", ""], "unknown store"),
    (["push", "--to", HUGE, "--all"], "unknown store"),
    (["push", "--to", "notaurl://x", "--all"], "notaurl"),
    (["push", "--to", "memory://edges", "nothex"], "no run nothex"),
    (["push", "--to", "memory://edges", "--where", ""], "empty search expression"),
    (["push", "--to", "memory://edges", "--all", "-o", "bad"], "neither key=value"),
    (["push", "--to", "memory://edges", UUID, "--all"], "not both"),
    (["pull"], "name the runs"),
    (["pull", ""], "no run"),
    (["pull", UUID], "no run"),
    (["pull", HUGE], "no run"),
    (["pull", "--where", "bad ("], "unknown field"),
    (["evict"], "name the runs"),
    (["evict", ""], "no run"),
    (["evict", UUID], "no run"),
    (["evict", "--all", "--max-age", "-1"], "--max-age"),
    (["evict", "--all", "--max-age", "nan"], "--max-age"),
    (["evict", "--all", "--max-age", "inf"], "--max-age"),
    (["evict", "--where", HUGE], "limit is"),
    # whereis, find
    (["whereis"], "UUID"),
    (["whereis", ""], "no run"),
    (["whereis", HUGE], "no run"),
    (["whereis", UUID], "no run"),
    (["find"], "UUID"),
    (["find", ""], "no run"),
    (["find", HUGE], "no run"),
    (["find", UUID], "no run"),
    # index
    (["index"], "add|drop|list"),
    (["index", "bogus"], "bogus"),
    (["index", "add"], "name the fields"),
    (["index", "add", ""], "unknown field"),
    (["index", "add", "config." + "a" * 10_000], "limit is 255"),
    (["index", "add", "config..x"], "invalid field"),
    (["index", "drop", "status"], "search indexes are for"),
    # stores, fetch, version
    (["stores", "extra"], "extra"),
    (["fetch", "nosuch"], "not declared"),
    (["fetch", ""], "not declared"),
    (["fetch", HUGE], "not declared"),
    (["fetch", "--timeout", "-1"], "--timeout"),
    (["fetch", "--timeout", "0"], "--timeout"),
    (["fetch", "--timeout", "abc"], "--timeout"),
    (["fetch", "--timeout", "nan"], "--timeout"),
    (["version", "extra"], "extra"),
    # serve: refused before anything listens
    (["serve", "--project", ""], "--project is empty"),
    (["serve", "--root", ""], "--root is empty"),
    (["serve", "--project", HUGE], "is not a directory"),
    (["serve", "--root", "no/such/dir"], "is not a directory"),
    (["serve", "--host", "0.0.0.0"], "--token-file"),
    (["serve", "--port", "abc"], "--port"),
    (["serve", "--port", BIG], "--port"),
    (["serve", "--token-file", ""], "token file"),
    (["serve", "--token-file", HUGE], "token file"),
]


def test_every_command_is_in_the_table() -> None:
    tried = {args[0] for args, _ in TABLE if args and not args[0].startswith("--")}
    assert set(cli.commands) <= tried | {"nosuch"}, set(cli.commands) - tried


def test_bad_arguments_are_one_line_nonzero_and_change_nothing(project: Path) -> None:
    get("optimize", {"lr": 0.5}).launch()
    get("optimize", {"lr": 0.7}).launch()
    root = project.parent
    failures = []
    for args, needle in TABLE:
        forget_imports()
        dispose_all()
        before = tree(root), rows()
        result = invoke(*args, ok=False)
        dispose_all()
        after = tree(root), rows()
        shown = [arg if len(arg) < 40 else f"{arg[:10]}...({len(arg)})" for arg in args]
        lines = result.stderr.strip().splitlines()
        if result.exit_code == 0:
            failures.append(f"{shown}: exit 0")
        elif len(lines) != 1 or not lines[0].startswith("Error: ") or "Traceback" in result.stderr:
            failures.append(f"{shown}: stderr is not one error line: {result.stderr[:300]!r}")
        elif needle not in lines[0]:
            failures.append(f"{shown}: {needle!r} not in {lines[0][:300]!r}")
        if before[0] != after[0]:
            failures.append(f"{shown}: files changed")
        if before[1] != after[1]:
            failures.append(f"{shown}: index rows changed")
    assert not failures, "\n".join(failures)


def test_a_huge_message_is_cut_short() -> None:
    line = one_line_error(invoke("find", HUGE, ok=False), "no run xxx", "more characters")
    assert len(line) < 1200


def test_usage_errors_keep_their_exit_code() -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["find"], prog_name="machinable")
    assert result.exit_code == click.UsageError.exit_code == 2
    assert result.stderr.strip() == "Error: Missing argument 'UUID'. (`machinable find --help` for usage)"
