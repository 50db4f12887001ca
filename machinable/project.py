"""Projects: where modules are resolved from and what names a run's project.

A project is a directory. ``Project.get()`` is the innermost ``with Project(...)``, or
the current working directory. A project may carry a provider in
``interface/project.py``: a ``Project`` subclass that sets the project's name and
declares shareable remote modules (``on_resolve_remotes``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
import sys
import threading
from pathlib import Path
from types import ModuleType

from machinable import remotes as remote_fetch
from machinable.context import Context, innermost
from machinable.errors import ModuleResolutionError

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

_lock = threading.RLock()
_modules: dict[Path, ModuleType] = {}
_providers: dict[Path, Project] = {}
_resolved: dict[tuple[Path, str], type] = {}


class Project(Context):
    """A directory of interface modules; also the base class of project providers."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, name: str | None = None):
        self.path = Path(path if path is not None else os.getcwd()).expanduser().resolve()
        self._name = name

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r})"

    @classmethod
    def get(cls) -> Project:
        """The connected project: the innermost ``with Project(...)`` or the cwd."""
        return innermost(Project) or Project()

    # Hooks a provider may override.

    def on_resolve_name(self) -> str | None:
        """Return the project's name; by default its directory's name."""
        return None

    def on_resolve_remotes(self) -> dict[str, str]:
        """Return ``{module name: source}`` of shareable modules this project uses."""
        return {}

    # Derived from the provider.

    @property
    def provider(self) -> Project:
        """The project's provider: its ``interface/project.py`` class, or itself."""
        if type(self) is not Project:
            return self
        return provider_for(self.path)

    @property
    def name(self) -> str:
        if self._name:
            name = self._name
        else:
            provider = self.provider
            name = provider.on_resolve_name() or provider._name or self.path.name
        if len(name) > MAX_NAME:
            raise ModuleResolutionError(
                f"project name {name[:40]!r}... is {len(name)} characters long; the limit is {MAX_NAME} "
                "(set a shorter one with Project(path, name=...) or on_resolve_name())"
            )
        return name

    def remotes(self) -> dict[str, str]:
        provider = self.provider
        return dict(provider.on_resolve_remotes() or {})

    @property
    def index_path(self) -> Path:
        return self.path / ".machinable.sqlite"

    def resolve(self, module: str) -> type:
        """The class that ``module`` defines: an Interface, or a context such as a Scope."""
        return resolve_class(self, module)


def provider_for(path: Path) -> Project:
    """Import ``<path>/interface/project.py`` once and instantiate its Project subclass."""
    with _lock:
        if path in _providers:
            return _providers[path]
        file = path / "interface" / "project.py"
        provider: Project
        if file.is_file():
            module = _import_file(path, file, "interface.project")
            classes = [
                obj
                for obj in vars(module).values()
                if inspect.isclass(obj)
                and issubclass(obj, Project)
                and obj is not Project
                and obj.__module__ == module.__name__
            ]
            if not classes:
                raise ModuleResolutionError(
                    f"{file} defines no subclass of machinable.Project", module="interface.project"
                )
            provider = classes[0](path)
        else:
            provider = Project(path)
        _providers[path] = provider
        return provider


MAX_NAME = 255  # the index's module and project columns


def validate_module_name(module: str) -> str:
    if isinstance(module, str) and len(module) > MAX_NAME:
        raise ModuleResolutionError(
            f"module name {module[:40]!r}... is {len(module)} characters long; the limit is {MAX_NAME}",
            module=module[:40],
        )
    if not isinstance(module, str) or not MODULE_NAME.match(module):
        raise ModuleResolutionError(
            f"{module!r} is not a valid module name (use dotted Python identifiers, "
            "like 'optimize' or 'experiments.train')",
            module=str(module),
        )
    return module


def module_file(project: Project, module: str) -> Path | None:
    base = project.path.joinpath(*module.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def resolvable(obj: object) -> bool:
    """Classes a module name can resolve to: contexts, and classes marked as interfaces
    (``Interface`` carries ``__machinable_module__``; the marker keeps this module from
    importing the interface layer above it)."""
    return inspect.isclass(obj) and (
        (issubclass(obj, Context) and not issubclass(obj, Project)) or hasattr(obj, "__machinable_module__")
    )


def resolve_class(project: Project, module: str) -> type:
    # A module file is imported once per process, so its class can be remembered too:
    # get() then costs a dictionary lookup instead of file checks and a class scan.
    key = (project.path, module)
    cls = _resolved.get(key)
    if cls is None:
        cls = _resolve_class(project, module)
        if module_file(project, module) is not None:  # remotes are re-checked each time
            _resolved[key] = cls
    return cls


def _resolve_class(project: Project, module: str) -> type:
    validate_module_name(module)
    file = module_file(project, module)
    if file is None:
        file = _remote_file(project, module)
    if file is None:
        raise ModuleResolutionError(
            f"module {module!r} not found in project {str(project.path)!r} "
            f"(looked for {module.replace('.', '/')}.py)",
            module=module,
        )
    mod = _import_file(project.path, file, module)
    classes = [
        obj
        for obj in vars(mod).values()
        if resolvable(obj) and obj.__module__ == mod.__name__
    ]
    if not classes:
        raise ModuleResolutionError(
            f"module {module!r} ({file}) defines no subclass of machinable.Interface",
            module=module,
        )
    if len(classes) > 1:
        wanted = module.rsplit(".", 1)[-1].replace("_", "").lower()
        matching = [c for c in classes if c.__name__.lower() == wanted]
        if len(matching) != 1:
            names = ", ".join(c.__name__ for c in classes)
            raise ModuleResolutionError(
                f"module {module!r} defines several Interfaces ({names}); name one after the "
                "module so machinable knows which to use",
                module=module,
            )
        classes = matching
    cls = classes[0]
    if hasattr(cls, "__machinable_module__"):
        cls.__machinable_module__ = module  # the name an interface's runs are recorded under
    return cls


def _remote_file(project: Project, module: str) -> Path | None:
    remotes = project.remotes()
    if module not in remotes:
        return None
    source = remotes[module]
    cached = remote_fetch.remote_path(project.path, module)
    if "#" not in source and cached.is_file():
        return cached  # already fetched and nothing pinned: no lock, no hashing
    fetched = remote_fetch.fetch_remote(project.path, module, remotes[module])
    return fetched.path


def _import_file(root: Path, file: Path, module: str) -> ModuleType:
    """Import ``file`` once per process, under a name unique to its project."""
    key = file.absolute()
    with _lock:
        cached = _modules.get(key)
        if cached is not None:
            return cached
        tag = hashlib.sha256(str(root).encode()).hexdigest()[:10]
        name = f"_machinable_{tag}.{module}"
        spec = importlib.util.spec_from_file_location(name, key)
        if spec is None or spec.loader is None:
            raise ModuleResolutionError(f"cannot import {file}", module=module)
        mod = importlib.util.module_from_spec(spec)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ModuleResolutionError(
                f"importing module {module!r} ({file}) failed: {type(exc).__name__}: {exc}",
                module=module,
            ) from exc
        _modules[key] = mod
        return mod


def forget_imports() -> None:
    """Drop the per-process import cache (used by tests)."""
    with _lock:
        _modules.clear()
        _providers.clear()
        _resolved.clear()
