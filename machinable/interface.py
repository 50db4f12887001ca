"""Interfaces (experiment modules), ``get()``, and the launch lifecycle.

A user writes a subclass of ``Interface`` with a nested pydantic ``Config`` and a
``__call__``. ``get(module, config)`` names a run by its content; ``launch()`` computes
it once into ``<storage>/<uuid>/`` and records it in the index.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from machinable.catalog.index import Index
from machinable.catalog.rows import RunRecord, row_values
from machinable.code import fingerprint, module_file, warn_if_changed
from machinable.config import (
    deep_merge,
    expand_dotted,
    normalize_version,
    revalidate,
    validate_config,
)
from machinable.context import Context, active
from machinable.errors import (
    ConfigError,
    IdentityWarning,
    MachinableError,
    NotMountedError,
    ReadOnlyCatalog,
    RecordError,
    UnsafeFileError,
)
from machinable.identity import (
    canonical_config,
    check_finite,
    compute_uuid,
    config_key,
    non_identifying_values,
    predicate_key,
)
from machinable.locks import FileLock, is_held, open_regular
from machinable.project import Project, interface_classes, primary_class
from machinable.record import (
    ERROR_FILE,
    MODEL_FILE,
    SENTINEL,
    atomic_write,
    clear,
    decode_file,
    dump_json,
    encode_file,
    id_header,
    launch_lock,
    mark,
    now,
    read_json,
    safe_path,
    status_of,
    timestamp,
    write_record,
)
from machinable.scope import Scope
from machinable.storage import Storage
from machinable.stores import (
    VERIFY_WINDOW,
    RemoteStore,
    RunRef,
    evict,
    fetch,
    mirror,
    push,
    resolve_store,
    whereis,
)


class _EmptyConfig(BaseModel):
    pass


class Interface:
    """Base class of experiment modules: subclass it, give it a ``Config`` and ``__call__``."""

    Config: ClassVar[type[BaseModel]] = _EmptyConfig
    __machinable_module__: ClassVar[str | None] = None

    config: BaseModel
    config_error: str | None  # set on a stored run whose config no longer validates
    uuid: str
    module: str
    version: list[dict[str, Any]]
    predicate: dict[str, Any]

    def __init__(self) -> None:
        raise TypeError(
            f"create {type(self).__name__} runs with machinable.get(module, config), not directly"
        )

    # Construction.

    @classmethod
    def _config_class(cls) -> type[BaseModel]:
        config = getattr(cls, "Config", _EmptyConfig)
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise ConfigError(
                f"{cls.__name__}.Config must be a pydantic BaseModel subclass", module=cls._module_name()
            )
        return config

    @classmethod
    def _module_name(cls) -> str:
        # Only the class's own name counts: a subclass never inherits its parent's (it
        # would share the parent's runs).
        own = cls.__dict__.get("__machinable_module__")
        if own:
            return own
        name = module_name_of(cls)
        cls.__machinable_module__ = name
        return name

    @classmethod
    def make(
        cls,
        version: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        project: Project | None = None,
        storage: Storage | None = None,
        index: Index | None = None,
        predicate: Mapping[str, Any] | None = None,
    ) -> Interface:
        """Validate a config and name the run it describes (nothing is written).

        ``predicate``, when given, is the run's predicate as it is (an imported run keeps
        the one it was computed under); otherwise the active scopes and
        ``on_compute_predicate()`` make it.
        """
        project = project or Project.get()
        module = cls._module_name()
        config, full, recorded = validate_config(cls._config_class(), version, module)
        run = cls.__new__(cls)
        run.config = config
        run.config_error = None
        run.module = module
        run.version = recorded
        run._project = project
        run._storage = (storage or Storage.get()).directory(project)
        run._index = index or Index.get()
        run._full = full
        run._canonical = canonical_config(config)
        run._record_cache = None
        if predicate is not None:
            predicate = dict(predicate)
        else:
            predicate = {}
            for scope in active(Scope):
                predicate.update(scope.predicate)
            own = run.on_compute_predicate()
            if own:
                predicate.update(own)
        try:
            check_finite(predicate, "predicate")
            run.predicate = predicate
            run._project_name = project.name
            run.uuid = compute_uuid(run._project_name, module, run._canonical, predicate)
            run._config_key = config_key(run._canonical)
            run._predicate_key = predicate_key(predicate)
        except ConfigError as exc:
            raise ConfigError(f"module {module!r}: {exc}", module=module) from exc
        if not predicate:
            hidden = non_identifying_values(config)
            if hidden:
                warnings.warn(
                    f"module {module!r}: {', '.join(hidden)} is not identifying and differs from "
                    "its default, but no predicate separates runs (no Scope, empty "
                    "on_compute_predicate()): runs that differ only there share uuid "
                    f"{run.uuid}",
                    IdentityWarning,
                    stacklevel=3,  # the caller of get()
                )
        return run

    @classmethod
    def _from_record(cls, record: RunRecord, *, project: Project, storage: Path, index: Index) -> Interface:
        run = cls.__new__(cls)
        config, run.config_error = revalidate(cls._config_class(), record.config, cls._module_name())
        if config is not None:
            run.config = config
            run._full = run.config.model_dump(mode="json")
            # The canonical config is recomputed from the validated config because
            # PostgreSQL's jsonb normalises numbers (1e16 -> 10000000000000000).
            run._canonical = canonical_config(run.config)
        else:
            # The module's Config changed since this run was stored: keep the run
            # listable with its raw config (unvalidated) and say what no longer fits.
            run.config = cls._config_class().model_construct(**record.config)
            run._full = dict(record.config)
            run._canonical = dict(record.canonical)
        run.module = record.module
        run.version = record.version
        run.predicate = record.predicate
        run.uuid = record.uuid
        run._project = project
        run._project_name = record.project
        run._storage = storage
        run._index = index
        # The identity keys come from the row as written (strings survive every backend).
        run._config_key = record.config_key
        run._predicate_key = record.predicate_key
        run._record_cache = record
        return run

    @classmethod
    def config_problem(cls, config: Any) -> str | None:
        """Why a stored config no longer validates against this module's Config, or None."""
        return revalidate(cls._config_class(), config, cls._module_name())[1]

    def __repr__(self) -> str:
        if self.config_error:
            return f"{type(self).__name__}({self.module!r}, uuid={self.uuid!r}, invalid config)"
        return f"{type(self).__name__}({self.module!r}, uuid={self.uuid!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Interface) and other.uuid == self.uuid

    def __hash__(self) -> int:
        return hash(self.uuid)

    # Hooks.

    def on_compute_predicate(self) -> dict[str, Any] | None:
        """Extra values that separate runs sharing one config (a seed, a dataset)."""
        return None

    def __call__(self) -> None:
        """The computation; override it."""

    # Where the run lives.

    @property
    def project(self) -> Project:
        return self._project

    @property
    def index(self) -> Index:
        return self._index

    def _ref(self) -> RunRef:
        """This run as the stores know it: uuid, index, storage."""
        return RunRef(self.uuid, self._index, self._storage)

    def _default_directory(self) -> Path:
        return self._storage / self.uuid

    def local_directory(self) -> Path:
        """The run's directory here: where it is stored, or where it will be."""
        return self._ref().local_directory()

    def is_mounted(self) -> bool:
        """True when the run's directory is present on this machine."""
        return os.path.isfile(os.path.join(self.local_directory(), SENTINEL))

    def status(self) -> str:
        """``finished``, ``failed``, ``started`` (computing now), ``stale`` (started, but
        no process holds the run's lock: the one computing it died), or ``new``.

        The index answers for finished runs; otherwise the directory's markers do (a
        process may have died before its row was written).
        """
        status = self._index.status(self.uuid)
        if status == "finished":
            return status
        directory = self.local_directory()
        markers = [m for m in ("started_at", "finished_at", "failed_at") if os.path.isfile(directory / m)]
        if not markers:
            return status or "new"
        on_disk = status_of(markers)
        if on_disk != "started":
            return on_disk
        # launch() holds the lock from started_at to finished_at; a process that dies
        # releases it. (Only a lock taken on this machine's filesystem is seen.)
        return "started" if is_held(launch_lock(directory)) else "stale"

    def cached(self) -> bool:
        """True when the run finished and its data exists: here, in another location
        the index knows, or as a verified copy in a store (an evicted run)."""
        status = self._index.status(self.uuid)
        directory = self._default_directory()
        if status == "finished":
            if os.path.isfile(os.path.join(directory, SENTINEL)):
                return True
            # The row says finished but the usual directory is not here: only a copy
            # elsewhere counts; if the data is gone everywhere, launch() recomputes it.
            return self._index.has_copy(self.uuid)
        if os.path.isfile(os.path.join(directory, "finished_at")) and status is None:
            # The directory finished but the index does not know it (deleted index, a
            # copied folder): take the record in rather than computing it again.
            self._index.ingest_directory(directory)
            return True
        return False

    def record(self) -> RunRecord | None:
        """The index's view of this run."""
        return self._index.find(self.uuid)

    # Launching.

    def _headers(self) -> tuple[dict[str, Any], dict[str, Any]]:
        header = id_header(
            self.uuid,
            self._project_name,
            self.module,
            self._config_key,
            self._predicate_key,
        )
        model = {
            "module": self.module,
            "project": self._project_name,
            "config": self._full,
            "canonical": self._canonical,
            "version": self.version,
            "predicate": self.predicate,
            "created_at": timestamp(),
        }
        code = self._code()
        if code is not None:
            model["code"] = code
        return header, model

    def _code(self) -> dict[str, Any] | None:
        """The fingerprint of the code that resolves this run's module here and now."""
        return fingerprint(module_file(type(self)), self._project.path)

    def _warn_if_code_changed(self) -> None:
        current = self._code()
        if current is None:
            return
        directory = self.local_directory()
        try:
            recorded = read_json(directory / MODEL_FILE)
        except (OSError, ValueError):
            return  # evicted or unreadable: nothing to compare with here
        if isinstance(recorded, dict):
            warn_if_changed(recorded.get("code"), current, self.uuid, self.module)

    def launch(self) -> Interface:
        """Compute the run once; later launches (any process) do nothing."""
        if self.cached():
            self._warn_if_code_changed()
            return self
        if self.config_error:
            raise ConfigError(f"run {self.uuid}: {self.config_error}", module=self.module)
        if self._index.read_only:
            raise ReadOnlyCatalog(
                f"run {self.uuid} ({self.module}) is not in {self._index!r}, a read-only remote "
                "catalog: it cannot be launched from here",
                url=self._index.resolved_url,
            )
        self._index.check_writable()
        directory = self._default_directory()
        header, model = self._headers()
        # The lock is taken before the record is written, so a run directory that exists
        # with its lock free is complete: verify tells runs in flight from broken ones.
        with FileLock(launch_lock(directory)):
            fresh = write_record(directory, header, model)
            # Another process may have taken the lock first and finished the run while
            # this one waited (a directory this process just made holds no marker).
            if not fresh and os.path.isfile(directory / "finished_at"):
                self._index.ingest_directory(directory)
                return self
            if not fresh:  # a relaunch, or another process got here first
                clear(directory, "failed_at", ERROR_FILE)
                recorded = _read_model(directory, model)
                if model.get("code") is not None and recorded.get("code") != model["code"]:
                    # Computed again, possibly by other code than the first attempt.
                    recorded = {**recorded, "code": model.get("code")}
                    atomic_write(directory / MODEL_FILE, dump_json(recorded))
                model = recorded
            markers = {"started_at": now()}
            mark(directory, "started_at", markers["started_at"])
            try:
                self.__call__()
            except BaseException as exc:
                failed = now()
                atomic_write(directory / ERROR_FILE, "".join(traceback.format_exception(exc)))
                mark(directory, "failed_at", failed)
                markers.update(failed_at=failed, updated_at=failed)
                self._index.add_run(row_values(header, model, markers), directory, self._storage)
                raise
            finished = now()
            mark(directory, "finished_at", finished)
            markers.update(finished_at=finished, updated_at=finished)
            self._index.add_run(row_values(header, model, markers), directory, self._storage)
        if active(RemoteStore):
            mirror(self._ref(), directory)
        return self

    # Copies elsewhere.

    def push(self, store: RemoteStore | str, *, progress: bool | None = None) -> Interface:
        """Copy this finished run to a remote store (an instance, URL or known name)."""
        if self._index.status(self.uuid) != "finished":
            raise RecordError(f"run {self.uuid} is not finished; only finished runs are pushed")
        resolved = resolve_store(self._index, store)
        push(self._index, resolved, [(self.uuid, self._mounted_directory())], progress=progress)
        return self

    def fetch(self, store: RemoteStore | str | None = None, *, progress: bool | None = None) -> Path:
        """Bring an evicted run back from a store with a verified copy; no-op when mounted."""
        return fetch(self._ref(), store, progress=progress)

    def evict(self, *, max_age: timedelta | None = None) -> Path:
        """Delete the local copy, refusing unless another copy is verified."""
        return evict(self._ref(), max_age=max_age if max_age is not None else VERIFY_WINDOW)

    def availability(self) -> list[Any]:
        """Every known copy: local (present or evicted) and each store's state."""
        return whereis(self._ref())

    # Files.

    def _mounted_directory(self) -> Path:
        directory = self.local_directory()
        if os.path.isfile(os.path.join(directory, SENTINEL)):
            return directory
        if self._index.status(self.uuid) is not None:
            raise NotMountedError(
                f"run {self.uuid} ({self.module}) is not present on this machine; "
                f"fetch it with `machinable pull {self.uuid}` or run.fetch()",
                uuid=self.uuid,
            )
        raise RecordError(
            f"run {self.uuid} ({self.module}) has not been launched; call launch() first",
            path=directory,
        )

    def save_file(self, name: str, data: Any) -> Path:
        """Write a file into the run directory (format chosen by extension), atomically."""
        directory = self._mounted_directory()
        path = safe_path(directory, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, encode_file(path, data))
        return path

    def load_file(self, name: str, default: Any = None, *, allow_pickle: bool = False) -> Any:
        """Read a file of the run back, or ``default`` if it does not exist.

        A ``.p`` file is unpickled only when this user's key signed it (every pickle
        ``save_file`` writes is signed) or with ``allow_pickle=True``: unpickling a
        collaborator's file would run whatever code it carries.
        """
        if self._index.read_only and not self.is_mounted():
            return self._index.load_file(self.uuid, name, default)  # type: ignore[attr-defined]
        directory = self._mounted_directory()
        path = safe_path(directory, name)
        try:
            # A FIFO or a device among a collaborator's files is refused, never read.
            fd = open_regular(path, follow=True)
        except FileNotFoundError:
            if not os.path.isfile(os.path.join(directory, SENTINEL)):
                # Evicted (or moved away) between the check above and the open: the
                # directory leaves in one rename, so its sentinel tells.
                return self.load_file(name, default, allow_pickle=allow_pickle)
            return default
        except UnsafeFileError as exc:
            if os.path.isdir(path):
                return default
            raise UnsafeFileError(f"run {self.uuid}: cannot load {name!r}: {exc}", path=path) from exc
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read()
        return decode_file(path, raw, allow_pickle=allow_pickle)

    # Collections.

    def all(
        self,
        where: Any = None,
        *,
        order_by: str | list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> RunList:
        """Stored runs of this module in this project (within the active scopes).

        ``where`` filters like ``Index.search``: ``"config.lr > 0.1"``, a ``Field``
        expression, or a dict of equalities. Without a limit every run is returned.
        """
        scope: dict[str, Any] = {}
        for item in active(Scope):
            scope.update(item.predicate)
        cls, project, storage, index = type(self), self._project, self._storage, self._index
        query = {"project": self._project_name, "module": self.module, "predicate": scope}

        def make(record: RunRecord) -> Interface:
            return cls._from_record(record, project=project, storage=storage, index=index)

        # Bad input fails here, at the call, not later at the first use of the list.
        index.check_query(where, order_by=order_by, limit=limit, offset=offset)
        return RunList.lazy(index, where, query, order_by, limit, offset, make)


class RunList(Sequence):  # type: ignore[type-arg]
    """Runs from ``all()``: a sequence that reads the index page by page as it is used.

    ``len()`` asks the index to count; indexing and slicing fetch just those runs;
    iterating reads pages of ``PAGE`` runs, so a loop over a million runs holds one
    page at a time. It compares equal to a list of the same runs, and ``list(runs)``
    makes a plain list (a snapshot). Built from runs directly, it is a plain list.
    """

    PAGE = 1000

    def __init__(self, runs: Any = ()):
        self._items: list[Any] | None = list(runs)
        self._lazy: tuple[Any, ...] | None = None
        self._length: int | None = None
        self._page: tuple[int, list[Any]] | None = None

    @classmethod
    def lazy(cls, index: Index, where: Any, query: dict[str, Any], order_by: Any, limit: int | None,
             offset: int, make: Any) -> RunList:
        runs = cls()
        runs._items = None
        runs._lazy = (index, where, query, order_by, limit, offset, make)
        return runs

    def _fetch(self, start: int, count: int) -> list[Any]:
        """Runs ``start`` .. ``start + count`` of this list (positions within it)."""
        make = self._lazy[-1]  # type: ignore[index]
        return [make(record) for record in self._fetch_records(start, count)]

    def _fetch_records(self, start: int, count: int) -> list[RunRecord]:
        index, where, query, order_by, limit, offset, _ = self._lazy  # type: ignore[misc]
        if limit is not None:
            count = max(0, min(count, limit - start))
        if count <= 0:
            return []
        return index.search(where, **query, order_by=order_by, limit=count, offset=offset + start)  # type: ignore[no-any-return]

    def _records(self) -> Iterator[RunRecord]:
        """The index's records of a lazy list, page by page, as ``__iter__`` reads them."""
        index, where, query, order_by, limit, offset, _ = self._lazy  # type: ignore[misc]
        if order_by is None and limit is None and not offset:
            yield from index.runs(where, **query, page_size=self.PAGE)
            return
        start = 0
        while True:
            page = self._fetch_records(start, self.PAGE)
            yield from page
            if len(page) < self.PAGE:
                return
            start += len(page)

    def __len__(self) -> int:
        if self._items is not None:
            return len(self._items)
        if self._length is None:
            index, where, query, _, limit, offset, _ = self._lazy  # type: ignore[misc]
            total = max(0, index.count(where, **query) - offset)
            self._length = total if limit is None else min(total, limit)
        return self._length

    def __getitem__(self, key: Any) -> Any:
        if self._items is not None:
            found = self._items[key]
            return RunList(found) if isinstance(key, slice) else found
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return RunList(self[start:stop])[::step]
            return RunList(self._fetch(start, stop - start))
        if not isinstance(key, int):
            raise TypeError(f"RunList indices must be integers or slices, not {type(key).__name__}")
        position = key + len(self) if key < 0 else key
        if not 0 <= position < len(self):
            raise IndexError("RunList index out of range")
        base = position - position % self.PAGE
        if self._page is None or self._page[0] != base:
            self._page = (base, self._fetch(base, self.PAGE))
        page = self._page[1]
        if position - base >= len(page):  # the index changed since len()
            raise IndexError("RunList index out of range")
        return page[position - base]

    def __iter__(self) -> Any:
        if self._items is not None:
            yield from self._items
            return
        # in uuid order, pages by key (each page one indexed range, no growing offset)
        make = self._lazy[-1]  # type: ignore[index]
        for record in self._records():
            yield make(record)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, RunList)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"RunList({list(self)!r})" if self._items is not None or len(self) <= 20 else f"<RunList of {len(self)} runs>"

    def as_dataframe(self) -> Any:
        """A pandas DataFrame: uuid, module, status, created_at, and one column per config key.
        A list from ``all()`` reads its records a page at a time (not one run at a time:
        against a catalog server, that was one request per run)."""
        if self._items is None:
            return records_dataframe(list(self._records()))
        return records_dataframe([run.record() or run for run in self])


def records_dataframe(records: Sequence[Any]) -> Any:
    try:
        import pandas
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MachinableError("as_dataframe() needs pandas: pip install pandas") from exc
    rows = []
    for record in records:
        row = {
            "uuid": record.uuid,
            "module": record.module,
            "status": getattr(record, "status", None),
            "created_at": getattr(record, "created_at", None),
        }
        config = record.config if isinstance(record.config, dict) else record.config.model_dump(mode="json")
        row.update(_flatten(config, "config."))
        rows.append(row)
    return pandas.DataFrame(rows)


def _flatten(value: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flatten(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def _read_model(directory: Path, fallback: dict[str, Any]) -> dict[str, Any]:
    try:
        return read_json(directory / MODEL_FILE)
    except (FileNotFoundError, ValueError):
        return fallback


def module_name_of(cls: type[Interface]) -> str:
    """The module name of a class not resolved by name (passed to ``get()`` directly).

    A project module's dotted path inside its project, else the last part of its Python
    module; ``module:Class`` when the module defines other Interfaces and this one is
    not the one the module's name stands for.
    """
    path = cls.__module__
    prefix, _, rest = path.partition(".")
    if prefix.startswith("_machinable_") and rest:
        path = rest
    else:
        path = path.rsplit(".", 1)[-1]
    mod = sys.modules.get(cls.__module__)
    classes = interface_classes(mod) if mod is not None else [cls]
    if cls not in classes or primary_class(classes, path) is cls:
        return path
    qualname = cls.__qualname__ if "<" not in cls.__qualname__ else cls.__name__
    return f"{path}:{qualname}"


def get(
    module: str | type[Interface],
    version: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> Interface:
    """The run of ``module`` with this config in the connected project (not launched).

    A module whose class is a context (a ``Scope`` or ``RemoteStore`` subclass) gives
    an instance of that context, built with the config as keyword arguments.
    """
    project = Project.get()
    if isinstance(module, type) and issubclass(module, Interface):
        cls = module
    elif isinstance(module, str):
        cls = project.resolve(module)
        if issubclass(cls, Context):
            # A context class (a Scope or RemoteStore subclass) from a project or remote
            # module: build it from the config so it can be entered with ``with``.
            items = normalize_version(version, module)
            merged: dict[str, Any] = {}
            for item in items:
                merged = deep_merge(merged, expand_dotted(item))
            return cls(**merged)  # type: ignore[return-value]
    else:
        raise MachinableError(f"get() takes a module name or an Interface class, not {module!r}")
    return cls.make(version, project=project)
