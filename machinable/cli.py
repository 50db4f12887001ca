"""The ``machinable`` command: a thin click layer over the Python API.

Library errors become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import click

from machinable.errors import MachinableError, ProjectNotFound
from machinable.redact import redact


class _UsageError(click.ClickException):
    """A usage error as one line (click prints usage and a hint on three)."""

    exit_code = 2


def _usage(exc: click.UsageError) -> _UsageError:
    where = exc.ctx.command_path if exc.ctx is not None else "machinable"
    return _UsageError(f"{_one_line(click.ClickException(exc.format_message()))} (`{where} --help` for usage)")


class _Group(click.Group):
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _usage(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _usage(exc) from exc
        except click.ClickException as exc:
            exc.message = _one_line(exc)
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except MachinableError as exc:
            raise click.ClickException(_one_line(exc)) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise click.ClickException(_one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    text = redact(" ".join((str(exc) or type(exc).__name__).split()))
    if len(text) > MAX_MESSAGE:  # a message quoting a huge argument back
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} more characters)"
    return printable(text)


MAX_MESSAGE = 1000


def printable(text: str) -> str:
    """``text`` as stored, with control and format characters (ANSI escapes, bidi
    overrides, line separators) written as escapes so they cannot drive the terminal."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in _HIDDEN and char != " "
        else char
        for char in text
    )


_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _cell(value: str) -> Any:
    """A table cell shown verbatim: rich never reads stored text as markup."""
    from rich.text import Text

    return Text(printable(value))


@contextmanager
def _contexts(obj: dict[str, Any]) -> Iterator[None]:
    from machinable import Index, Project, Storage

    with ExitStack() as stack:
        if obj.get("project"):
            project = Project(obj["project"])
            if not project.path.is_dir():  # checked first: nothing is created for a typo
                raise ProjectNotFound(f"the project directory {project.path} does not exist", path=project.path)
            stack.enter_context(project)
        if obj.get("storage"):
            stack.enter_context(Storage(obj["storage"]))
        if obj.get("index"):
            stack.enter_context(Index(obj["index"]))
        yield


def _given(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Refuse an empty path or name: '' would silently mean the current directory."""
    if isinstance(value, str) and not value.strip():
        raise click.BadParameter("is empty", ctx=ctx, param=param)
    return value


def _hours_or_seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


@click.group(
    cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--project", type=click.Path(file_okay=False), callback=_given, help="Project directory (default: cwd).")
@click.option(
    "--storage",
    envvar="MACHINABLE_STORAGE",
    callback=_given,
    help="Directory that holds run directories (default: <project>/storage).",
)
@click.option("--index", "index_spec", callback=_given, help="Index file or URL (default: MACHINABLE_INDEX or <project>/.machinable.sqlite).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, project: str | None, storage: str | None, index_spec: str | None, quiet: bool) -> None:
    """machinable: a content-addressed catalog of research runs."""
    if ctx.invoked_subcommand is None:  # bare `machinable`: the help, and success
        click.echo(ctx.get_help())
        ctx.exit(0)
    ctx.ensure_object(dict)
    ctx.obj.update(project=project, storage=storage, index=index_spec, quiet=quiet)


MAX_CALL_LENGTH = 10_000


def parse_call(arg: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """``--greet(name='CLI', repeat=2)`` -> ``("greet", (), {"name": "CLI", "repeat": 2})``.

    Arguments are Python literals, read with ``ast.literal_eval``: never evaluated.
    """
    text = arg[2:]
    name, paren, rest = text.partition("(")
    name = name.replace("-", "_")
    if not name.isidentifier():
        raise click.ClickException(f"{arg!r} is not a method name")
    if not paren:
        return name, (), {}
    if len(arg) > MAX_CALL_LENGTH:
        raise click.ClickException(f"the arguments of --{name} are longer than {MAX_CALL_LENGTH} characters")
    if not rest.endswith(")"):
        raise click.ClickException(f"{arg!r}: the arguments must end with ')'")
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
        if not isinstance(call, ast.Call) or any(k.arg is None for k in call.keywords):
            raise ValueError("only literal arguments and name=literal pairs are allowed")
        if any(isinstance(a, ast.Starred) for a in call.args):
            raise ValueError("only literal arguments and name=literal pairs are allowed")
        names = [k.arg for k in call.keywords]
        if len(set(names)) != len(names):
            raise ValueError("a keyword argument is given twice")
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, SyntaxError) else str(exc) or type(exc).__name__
        raise click.ClickException(
            f"invalid arguments for --{name}: {_one_line_text(detail)} (use Python literals, "
            "like --greet(name='CLI', repeat=2))"
        ) from None
    return name, args, kwargs


def _one_line_text(text: str) -> str:
    return " ".join(text.split())[:200]


def parse_assignments(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``key=value`` (JSON where it parses) from ``--method`` flags."""
    config, calls = parse_arguments(args)
    return config, [name for name, _, _ in calls]


def parse_arguments(args: list[str]) -> tuple[dict[str, Any], list[tuple[str, tuple[Any, ...], dict[str, Any]]]]:
    """Split ``key=value`` (JSON where it parses) from ``--method`` and ``--method(...)`` calls."""
    config: dict[str, Any] = {}
    methods: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for arg in args:
        if arg.startswith("--"):
            methods.append(parse_call(arg))
        elif "=" in arg:
            key, _, raw = arg.partition("=")
            if not key:
                raise click.ClickException(f"{arg!r} has no key before '='")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            config[key] = value
        else:
            raise click.ClickException(f"{arg!r} is neither key=value nor --method")
    return config, methods


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


@cli.command(
    "get",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("module")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def get_command(obj: dict[str, Any], module: str, args: tuple[str, ...]) -> None:
    """Name a run: MODULE key=value ... [--launch] [--METHOD ...].

    Dotted keys nest (optimizer.name=adam); values are parsed as JSON where they can be.
    Each --METHOD calls that method of the run and prints what it returns;
    --METHOD(name='x', n=2) passes Python literals as arguments (never evaluated).
    """
    from machinable import get

    config, methods = parse_arguments(list(args))
    with _contexts(obj):
        run = get(module, config)
        if not methods:
            click.echo(f"{run.uuid}  {run.module}  {run.status()}  {run.local_directory()}")
        for name, call_args, call_kwargs in methods:  # check every call before making any
            method = getattr(run, name, None)
            if name.startswith("_") or not callable(method):
                raise click.ClickException(f"{type(run).__name__} has no method {name!r}")
            if not call_args and not call_kwargs:
                _check_callable_without_arguments(method, name)
                continue
            try:
                inspect.signature(method).bind(*call_args, **call_kwargs)
            except TypeError as exc:
                raise click.ClickException(f"--{name}: {exc}") from None
            except ValueError:  # no signature to check (a builtin): the call will say
                pass
        for name, call_args, call_kwargs in methods:
            result = getattr(run, name)(*call_args, **call_kwargs)
            if name == "launch":
                click.echo(f"{run.uuid}  {run.status()}  {run.local_directory()}")
            elif result is not None:
                click.echo(_show(result))


def _check_callable_without_arguments(method: Callable[..., Any], name: str) -> None:
    import inspect

    try:
        inspect.signature(method).bind()
    except TypeError:
        needed = [
            p.name
            for p in inspect.signature(method).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        hint = f" (use `machinable {name} ...`)" if name in ("push", "fetch", "evict") else ""
        raise click.ClickException(
            f"--{name.replace('_', '-')} needs arguments ({', '.join(needed)}); only methods "
            f"that take none can be called from the command line{hint}"
        ) from None
    except ValueError:  # no signature (a builtin): let the call decide
        pass


@cli.command("ls")
@click.argument("module", required=False)
@click.option("--where", "-w", help="Filter, e.g. \"config.lr > 0.1 and status = 'finished'\".")
@click.option("--order-by", help="Order, e.g. 'config.lr desc' or '-created_at'.")
@click.option("--limit", type=click.IntRange(min=0, max=2**63 - 1), help="At most this many runs.")
@click.option("--offset", type=click.IntRange(min=0, max=2**63 - 1), default=0, help="Skip this many runs.")
@click.option("--count", "count_only", is_flag=True, help="Print only how many runs match.")
@click.option("--all-projects", is_flag=True, help="List runs of every project in the index.")
@click.option("--code", "show_code", is_flag=True, help="Also show the code that computed each run (module sha256, git commit).")
@click.pass_obj
def ls_command(
    obj: dict[str, Any],
    module: str | None,
    where: str | None,
    order_by: str | None,
    limit: int | None,
    offset: int,
    count_only: bool,
    all_projects: bool,
    show_code: bool,
) -> None:
    """List indexed runs (of MODULE, if given) as a table, filtered and ordered.

    Runs whose stored config no longer validates against the module's Config are
    listed with a note saying what no longer fits.
    """
    from rich.console import Console
    from rich.table import Table

    from machinable import Index, Project
    from machinable.project import validate_module_name

    if module is not None:
        validate_module_name(module)
    with _contexts(obj):
        index = Index.get()
        current = Project.get()
        project = None if all_projects else current.name
        if count_only:
            click.echo(index.count(where, project=project, module=module))
            return
        records = index.search(
            where, project=project, module=module, order_by=order_by, limit=limit, offset=offset
        )
        check = _config_checker(current)
        notes = [check(record) for record in records]
    table = Table(box=None, pad_edge=False)
    table.add_column("uuid", no_wrap=True, min_width=32)
    for column in ("module", "status", "created", "config"):
        table.add_column(column)
    if show_code:
        table.add_column("code", no_wrap=True)
    if any(notes):
        table.add_column("note")
    for record, note in zip(records, notes, strict=True):
        cells = [
            _cell(record.uuid),
            _cell(record.module),
            _cell(record.status),
            _cell(record.created_at.strftime("%Y-%m-%d %H:%M:%S")),
            _cell(json.dumps(record.canonical, sort_keys=True)),
        ]
        if show_code:
            cells.append(_cell(_recorded_code(record.directories)))
        if any(notes):
            cells.append(_cell(note or ""))
        table.add_row(*cells)
    # Piped output: one line per run (no wrapping at 80 columns), for grep and scripts.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
    if records:
        console.print(table)
    click.echo(f"{len(records)} run(s)", err=not records)


def _recorded_code(directories: tuple[str, ...]) -> str:
    """The code fingerprint in a run's model.json, from the first copy that is here."""
    from machinable.code import describe
    from machinable.record import MODEL_FILE, read_json

    for directory in directories:
        try:
            model = read_json(os.path.join(directory, MODEL_FILE))
        except (OSError, ValueError):
            continue
        return describe(model.get("code")) if isinstance(model, dict) else ""
    return ""


def _config_checker(project: Any) -> Callable[[Any], str | None]:
    """A check of a listed run's stored config against its module's Config, when the
    module is a file of the current project (never fetched or guessed)."""
    from machinable.interface import Interface
    from machinable.project import module_file

    name = project.name
    classes: dict[str, Any] = {}

    def check(record: Any) -> str | None:
        if record.project != name:
            return None
        if record.module not in classes:
            cls = None
            if module_file(project, record.module) is not None:
                try:
                    cls = project.resolve(record.module)
                except MachinableError:
                    cls = None
            classes[record.module] = cls if isinstance(cls, type) and issubclass(cls, Interface) else None
        cls = classes[record.module]
        return None if cls is None else cls.config_problem(record.config)

    return check


@cli.command("reindex")
@click.argument("storage", required=False, callback=_given)
@click.option("--full", is_flag=True, help="Read every directory, not only those changed since the last pass.")
@click.option("--remotes", is_flag=True, help="Also rebuild store availability by listing every known store.")
@click.option("--allow-empty", is_flag=True, help="Drop the runs of a storage that is missing or empty (refused otherwise).")
@click.pass_obj
def reindex_command(obj: dict[str, Any], storage: str | None, full: bool, remotes: bool, allow_empty: bool) -> None:
    """Bring the index in line with the run directories of STORAGE (default: the connected storage)."""
    from machinable import Index
    from machinable.operations.reindex import reindex_stores

    with _contexts(obj):
        index = Index.get()
        report = index.reindex(storage, full=full, progress=_progress(obj), allow_empty=allow_empty)
        if remotes:
            reindex_stores(index, report)
    click.echo(str(report))


def _progress(obj: dict[str, Any]) -> bool | None:
    return False if obj.get("quiet") else None


def _store(spec: str, options: tuple[str, ...]) -> Any:
    from machinable import Index
    from machinable.stores import RemoteStore, resolve_store

    if options:
        parsed, _ = parse_assignments(list(options))
        return RemoteStore(spec, **parsed)
    return resolve_store(Index.get(), spec)


def _refs(uuids: tuple[str, ...], select_all: bool, where: str | None) -> list[Any]:
    from machinable import Index, Project, Storage
    from machinable.record import is_uuid
    from machinable.stores import RunRef

    index = Index.get()
    storage = Storage.get().directory()
    if uuids and (select_all or where is not None):
        raise click.UsageError("give run uuids, or --all/--where, not both")
    if not uuids and not (select_all or where is not None):
        raise click.UsageError("name the runs: UUID ..., --all or --where EXPR")
    if uuids:
        refs = []
        for uuid in uuids:
            if not is_uuid(uuid) or index.status(uuid) is None:
                raise click.ClickException(f"no run {uuid} in the index")
            refs.append(RunRef(uuid, index, storage))
        return refs
    records = index.search(where, project=Project.get().name)
    return [RunRef(record.uuid, index, storage) for record in records]


@cli.command("push")
@click.argument("uuids", nargs=-1)
@click.option("--to", "store", required=True, help="Store URL (s3://bucket/prefix, file:///path) or a known store's name.")
@click.option("--all", "select_all", is_flag=True, help="Every finished run of the project that is here.")
@click.option("--where", "-w", help="Runs matching a search expression.")
@click.option("-o", "--option", "options", multiple=True, help="Storage option key=value (never stored).")
@click.pass_obj
def push_command(obj: dict[str, Any], uuids: tuple[str, ...], store: str, select_all: bool, where: str | None, options: tuple[str, ...]) -> None:
    """Copy runs to a remote store, verified by checksum."""
    from machinable import Index
    from machinable.stores import push

    with _contexts(obj):
        target = _store(store, options)
        refs = [
            ref
            for ref in _refs(uuids, select_all, where)
            if ref.is_mounted() and ref.index.status(ref.uuid) == "finished"
        ]
        if uuids and len(refs) != len(uuids):
            raise click.ClickException("only finished runs that are present here can be pushed")
        results = push(Index.get(), target, [(ref.uuid, ref.local_directory()) for ref in refs], progress=_progress(obj))
    size = sum(result.size for result in results.values())
    click.echo(f"pushed {len(results)} run(s), {size} bytes, to {target.uri} (verified)")
    if len(results) < len(refs):
        click.echo(f"skipped {len(refs) - len(results)} run(s) no longer here (evicted meanwhile)")


@cli.command("pull")
@click.argument("uuids", nargs=-1)
@click.option("--from", "store", help="Store URL or name (default: any store known to hold the run).")
@click.option("--all", "select_all", is_flag=True, help="Every run of the project that is not here.")
@click.option("--where", "-w", help="Runs matching a search expression.")
@click.option("-o", "--option", "options", multiple=True, help="Storage option key=value (never stored).")
@click.pass_obj
def pull_command(obj: dict[str, Any], uuids: tuple[str, ...], store: str | None, select_all: bool, where: str | None, options: tuple[str, ...]) -> None:
    """Bring evicted runs back from a store that has a verified copy."""
    from machinable.stores import fetch_many

    with _contexts(obj):
        source = _store(store, options) if store else None
        fetched = fetch_many(_refs(uuids, select_all, where), source, progress=_progress(obj))
    for uuid, directory in sorted(fetched.items()):
        click.echo(f"{uuid} -> {directory}")
    click.echo(f"fetched {len(fetched)} run(s)")


@cli.command("evict")
@click.argument("uuids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every run of the project that is here.")
@click.option("--where", "-w", help="Runs matching a search expression.")
@click.option("--max-age", type=click.FloatRange(min=0, max=24 * 365 * 1000), callback=_hours_or_seconds, default=24.0, show_default=True, help="Trust a store's verification this many hours; older ones are re-verified now.")
@click.pass_obj
def evict_command(obj: dict[str, Any], uuids: tuple[str, ...], select_all: bool, where: str | None, max_age: float) -> None:
    """Delete local copies of runs that have a verified copy in a store.

    Named runs that cannot be evicted are an error; with --all or --where such runs
    (no store copy with their digest, not finished) are kept and counted.
    """
    from datetime import timedelta

    from machinable.errors import EvictionRefused
    from machinable.stores import evict

    with _contexts(obj):
        evicted = 0
        kept: list[str] = []
        for ref in _refs(uuids, select_all, where):
            if not ref.is_mounted():
                continue
            try:
                evict(ref, max_age=timedelta(hours=max_age))
            except EvictionRefused:
                if uuids:
                    raise
                kept.append(ref.uuid)
                continue
            evicted += 1
    click.echo(f"evicted {evicted} run(s)")
    if kept:
        click.echo(f"kept {len(kept)} run(s) that no store holds with the same digest (push them first)")


@cli.command("whereis")
@click.argument("uuid")
@click.pass_obj
def whereis_command(obj: dict[str, Any], uuid: str) -> None:
    """List every known copy of a run: store, state, size, checksum, last verified."""
    from rich.console import Console
    from rich.table import Table

    from machinable.stores import whereis

    with _contexts(obj):
        (ref,) = _refs((uuid,), False, None)
        found = whereis(ref)
    table = Table(box=None, pad_edge=False)
    for column in ("store", "where", "state", "size", "digest", "verified"):
        table.add_column(column, no_wrap=column in ("where", "digest"))
    for copy in found:
        table.add_row(
            _cell(copy.store),
            _cell(copy.url),
            _cell(copy.state),
            _cell("" if copy.size is None else str(copy.size)),
            _cell(copy.checksum or ""),
            _cell(copy.verified_at.strftime("%Y-%m-%d %H:%M:%S") if copy.verified_at else ""),
        )
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000).print(table)


@cli.command("verify")
@click.argument("storage", required=False, callback=_given)
@click.option("--checksums", is_flag=True, help="Also hash files and compare them with the verified store manifest.")
@click.option("--repair", is_flag=True, help="Fix what needs no guessing and say what changed.")
@click.option("--resume", is_flag=True, help="Continue an interrupted pass from its checkpoint.")
@click.pass_obj
def verify_command(obj: dict[str, Any], storage: str | None, checksums: bool, repair: bool, resume: bool) -> None:
    """Compare the index with the run directories; exits 1 if problems remain."""
    from machinable import Index
    from machinable.operations.verify import verify

    with _contexts(obj):
        report = verify(Index.get(), storage, checksums=checksums, repair=repair, resume=resume, progress=_progress(obj))
    click.echo(str(report))
    if not report.ok:
        raise click.exceptions.Exit(1)


@cli.command("gc")
@click.argument("storage", required=False, callback=_given)
@click.option("--yes", is_flag=True, help="Delete; without it gc only lists what it would delete.")
@click.option("--stores", "check_stores", is_flag=True, help="Also look for incomplete copies in known stores.")
@click.option("--failed", is_flag=True, help="Also collect failed runs (their directories and rows).")
@click.pass_obj
def gc_command(obj: dict[str, Any], storage: str | None, yes: bool, check_stores: bool, failed: bool) -> None:
    """List what nothing needs (a dry run); delete it with --yes. Finished runs are never touched."""
    from machinable import Index
    from machinable.operations import gc as collector

    with _contexts(obj):
        found = collector.collect(Index.get(), storage, stores=check_stores, failed=failed)
        if yes:
            collector.run(found)
    for item in found:
        click.echo(str(item))
    verb = "deleted" if yes else "would delete (run with --yes to delete)"
    kept = sum(1 for i in found if i.kept is not None)
    click.echo(f"{sum(1 for i in found if i.deleted or not yes)} item(s) {verb}" + (f", {kept} kept" if kept else ""))


@cli.command("index")
@click.argument("action", type=click.Choice(["add", "drop", "list"]))
@click.argument("fields", nargs=-1)
@click.pass_obj
def index_command(obj: dict[str, Any], action: str, fields: tuple[str, ...]) -> None:
    """Manage search indexes on config paths: index add config.lr [config.optimizer.name ...]."""
    from machinable import Index

    with _contexts(obj):
        index = Index.get()
        if action == "list":
            for name in index.search_indexes():
                click.echo(name)
            return
        if not fields:
            raise click.UsageError("name the fields, e.g. config.lr")
        for field in fields:
            if action == "add":
                click.echo(f"{index.add_search_index(field)}  ({field})")
            else:
                index.drop_search_index(field)
                click.echo(f"dropped the search index on {field}")


@cli.command("stores")
@click.pass_obj
def stores_command(obj: dict[str, Any]) -> None:
    """List the remote stores this index knows."""
    from machinable import Index
    from machinable.stores import known_stores

    with _contexts(obj):
        for name, url in known_stores(Index.get()):
            click.echo(url if name == url else f"{name}  {url}")


@cli.command("find")
@click.argument("uuid")
@click.pass_obj
def find_command(obj: dict[str, Any], uuid: str) -> None:
    """Show what the index knows of one run."""
    from machinable import Index

    with _contexts(obj):
        record = Index.get().find(uuid)
    if record is None:
        raise click.ClickException(f"no run {uuid} in the index")
    click.echo(json.dumps(record.__dict__, default=str, indent=2, sort_keys=True))


@cli.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--check", is_flag=True, help="Verify cached remotes against interface/remotes.lock; fetch nothing.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=24 * 3600), callback=_hours_or_seconds, default=None, help="Seconds to wait for the server each time (default 30, MACHINABLE_REMOTE_TIMEOUT).")
@click.pass_obj
def fetch_command(obj: dict[str, Any], names: tuple[str, ...], check: bool, timeout: float | None) -> None:
    """Download the project's declared remotes (or NAMES) without importing them."""
    from machinable import Project
    from machinable import remotes as remote_fetch
    from machinable.redact import redact

    with _contexts(obj):
        project = Project.get()
        declared = project.remotes()
    unknown = [name for name in names if name not in declared]
    if unknown:
        raise click.ClickException(
            f"not declared by the project's on_resolve_remotes(): {', '.join(unknown)}"
        )
    if check:
        problems = remote_fetch.check_lock(project.path, declared)
        if names:  # only the named remotes' problems
            problems = [p for p in problems if any(f"'{name}'" in p for name in names)]
        for problem in problems:
            click.echo(problem, err=True)
        if problems:
            raise click.ClickException(f"{len(problems)} problem(s) with the cached remotes")
        click.echo(f"{len(names) or len(declared)} remote(s) match {remote_fetch.lock_path(project.path)}")
        return
    wanted = {name: declared[name] for name in project.remote_dependencies(list(names or declared))}
    if not wanted:
        click.echo("the project declares no remotes (interface/project.py, on_resolve_remotes)")
        return
    fetched = remote_fetch.fetch_all(project.path, wanted, timeout=timeout)
    for item in fetched:
        verb = "fetched" if item.fetched else "cached "
        click.echo(f"{verb} {item.name} from {redact(item.source)}\n  -> {item.path}\n  sha256 {item.sha256}")


@cli.command("serve")
@click.option("--project", "projects", multiple=True, type=click.Path(file_okay=False), help="Serve this project (repeatable).")
@click.option("--root", "roots", multiple=True, type=click.Path(file_okay=False), help="Serve every project folder directly in ROOT (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Tokens, one per line, optionally followed by the projects each reaches.")
@click.pass_obj
def serve_command(
    obj: dict[str, Any], projects: tuple[str, ...], roots: tuple[str, ...], host: str, port: int, token_file: str | None
) -> None:
    """Serve project catalogs read-only over HTTP: a JSON API and a browser page."""
    try:
        from machinable.server import serve
    except ImportError as exc:
        raise click.ClickException(f"machinable serve needs the server extra: pip install 'machinable[server]' ({exc})") from exc

    if not projects and not roots and obj.get("project"):
        projects = (obj["project"],)

    def ready(config: Any) -> None:
        names = config.names()
        click.echo(f"serving {len(names)} project(s) on http://{host}:{port}/", err=True)

    serve(list(projects), list(roots), host=host, port=port, token_file=token_file, ready=ready)


@cli.command("import")
@click.argument("source", type=click.Path(file_okay=False), callback=_given)
@click.option(
    "--live-window",
    type=click.FloatRange(min=0),
    callback=_hours_or_seconds,
    default=90.0,
    show_default=True,
    help="Seconds: an unfinished run whose heartbeat is younger may still be running and is skipped.",
)
@click.pass_obj
def import_command(obj: dict[str, Any], source: str, live_window: float) -> None:
    """Import the runs of a machinable 5.x storage folder SOURCE (it is only read)."""
    from machinable.operations.upstream import import_storage

    with _contexts(obj):
        report = import_storage(source, progress=_progress(obj), live_window=live_window)
    click.echo(str(report))


@cli.command("version")
def version_command() -> None:
    """Print machinable's version."""
    from machinable import __version__

    click.echo(__version__)


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    return cli.main(args=argv, prog_name="machinable", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
