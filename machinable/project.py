"""Projects: where modules are resolved from and what names a run's project.

A project is a directory. ``Project.get()`` is the innermost ``with Project(...)``, or
the current working directory. A project may carry a provider in
``interface/project.py``: a ``Project`` subclass that sets the project's name and
declares shareable remote modules (``on_resolve_remotes``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
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

MODULE_NAME = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?$"
)

_lock = threading.RLock()
_modules: dict[Path, ModuleType] = {}
_providers: dict[Path, Project] = {}
_resolved: dict[tuple[Path, str], type] = {}


class Project(Context):
    """A directory of interface modules; also the base class of project providers."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, name: str | None = None):
        self.path = _cwd() if path is None else Path(path).expanduser().resolve()
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

    def on_resolve_remotes(self) -> dict[str, str | list[str]]:
        """Return ``{module name: source}`` of shareable modules this project uses.

        An entry may be a list: its first item is the source, the others name further
        declared remotes that the module needs; they are fetched with it.
        """
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
        """``{name: source}`` of the declared remotes."""
        return self._remote_declaration()[0]

    def remote_dependencies(self, names: list[str]) -> list[str]:
        """``names`` with every declared remote they depend on (transitively), dependencies first."""
        return remote_fetch.with_dependencies(names, self._remote_declaration()[1])

    def _remote_declaration(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        return remote_fetch.split_declaration(dict(self.provider.on_resolve_remotes() or {}))

    @property
    def index_path(self) -> Path:
        return self.path / ".machinable.sqlite"

    def resolve(self, module: str) -> type:
        """The class that ``module`` defines: an Interface, or a context such as a Scope."""
        return resolve_class(self, module)


_last_cwd: tuple[str, Path] | None = None


def _cwd() -> Path:
    """The working directory, resolved (remembered for the last one: every ``get()``
    asks, and resolving walks each component of the path)."""
    global _last_cwd
    cwd = os.getcwd()
    last = _last_cwd
    if last is not None and last[0] == cwd:
        return last[1]
    path = Path(cwd).resolve()
    _last_cwd = (cwd, path)
    return path


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


def split_module(module: str) -> tuple[str, str | None]:
    """``"models:Bigger"`` -> ``("models", "Bigger")``; ``"models"`` -> ``("models", None)``."""
    path, _, qualname = module.partition(":")
    return path, qualname or None


def module_file(project: Project, module: str) -> Path | None:
    base = project.path.joinpath(*split_module(module)[0].split("."))
    # A package (a/__init__.py) first: Python's own import prefers it over a/.py too.
    for candidate in (base / "__init__.py", base.with_name(base.name + ".py")):
        if candidate.is_file():
            return candidate
    return None


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


def is_interface(obj: object) -> bool:
    """An Interface subclass, told by the marker ``Interface`` carries
    (``__machinable_module__``), which keeps this module from importing the interface
    layer above it."""
    return inspect.isclass(obj) and hasattr(obj, "__machinable_module__")


def resolvable(obj: object) -> bool:
    """Classes a module name can resolve to: contexts (not providers), and interfaces."""
    return inspect.isclass(obj) and (
        (issubclass(obj, Context) and not issubclass(obj, Project)) or is_interface(obj)
    )


def interface_classes(mod: ModuleType) -> list[type]:
    """The Interface and context classes that ``mod`` itself defines, in source order."""
    return [obj for obj in vars(mod).values() if resolvable(obj) and obj.__module__ == mod.__name__]


def primary_class(classes: list[type], module: str) -> type | None:
    """The class a module name stands for: the only one, or the one named after the module."""
    if len(classes) == 1:
        return classes[0]
    wanted = module.rsplit(".", 1)[-1].replace("_", "").lower()
    matching = [c for c in classes if c.__name__.replace("_", "").lower() == wanted]
    return matching[0] if len(matching) == 1 else None


def _resolve_class(project: Project, module: str) -> type:
    validate_module_name(module)
    path, qualname = split_module(module)
    file = module_file(project, path)
    if file is None:
        file = _remote_file(project, path)
    if file is None:
        raise ModuleResolutionError(
            f"module {path!r} not found in project {str(project.path)!r} "
            f"(looked for {path.replace('.', '/')}.py)",
            module=module,
        )
    mod = _import_file(project.path, file, path)
    classes = interface_classes(mod)
    if not classes:
        raise ModuleResolutionError(
            f"module {path!r} ({file}) defines no subclass of machinable.Interface",
            module=module,
        )
    primary = primary_class(classes, path)
    # Every Interface of the module gets its own name (its own identity): the primary
    # one the module's name, the others "module:Class". A subclass must never inherit
    # its parent's name, or it would share the parent's runs.
    for item in classes:
        if is_interface(item):
            item.__machinable_module__ = path if item is primary else f"{path}:{item.__qualname__}"
    if qualname is not None:
        named = [c for c in classes if c.__qualname__ == qualname]
        if not named:
            names = ", ".join(c.__qualname__ for c in classes)
            raise ModuleResolutionError(
                f"module {path!r} defines no Interface named {qualname!r} (it defines {names})",
                module=module,
            )
        return named[0]
    if primary is None:
        names = ", ".join(c.__name__ for c in classes)
        first = classes[0].__qualname__
        raise ModuleResolutionError(
            f"module {path!r} defines several Interfaces ({names}); name one after the "
            f"module, or ask for one by name (like '{path}:{first}')",
            module=module,
        )
    return primary


def _remote_file(project: Project, module: str) -> Path | None:
    remotes = project.remotes()
    if module not in remotes:
        return None
    path = None
    for name in project.remote_dependencies([module]):  # what it depends on comes first
        source = remotes[name]
        cached = remote_fetch.remote_path(project.path, name)
        if "#" not in source and cached.is_file():
            path = cached  # already fetched and nothing pinned: no lock, no hashing
        else:
            path = remote_fetch.fetch_remote(project.path, name, source).path
    return path


def package_name(root: Path) -> str:
    """The name of the package a project's modules are imported under."""
    return f"_machinable_{hashlib.sha256(str(root).encode()).hexdigest()[:10]}"


def _project_package(root: Path) -> str:
    """Register the project as a package whose ``__path__`` is its directory.

    Its modules are then ``<package>.<module>``: relative imports work in subfolders,
    and the project never goes first on ``sys.path``, so a project file named like a
    standard module (``wave.py``) does not replace that module for the process. The
    root is appended to ``sys.path`` (last, after the standard library and installed
    packages) so that modules written for machinable 5.x, which import siblings by
    absolute name (``import helpers``), keep working.
    """
    name = package_name(root)
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(root)]
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
    if str(root) not in sys.path:
        sys.path.append(str(root))
    return name


def _dotted(root: Path, file: Path) -> str | None:
    """``file``'s dotted name relative to ``root``, or None when it is not a plain module path."""
    try:
        parts = list(file.relative_to(root).with_suffix("").parts)
    except ValueError:
        return None
    if parts and parts[-1] == "__init__":
        parts.pop()
    if not parts or not all(part.isidentifier() for part in parts):
        return None
    return ".".join(parts)


def _import_file(root: Path, file: Path, module: str) -> ModuleType:
    """Import ``file`` once per process as a module of the project's package."""
    key = file.absolute()
    with _lock:
        cached = _modules.get(key)
        if cached is not None:
            return cached
        package = _project_package(root)
        dotted = _dotted(root, key)
        if dotted is None:
            raise ModuleResolutionError(f"cannot import {file}: not a module path", module=module)
        name = f"{package}.{dotted}"
        # The path finders cache directory listings; a module written a moment ago
        # (same mtime tick as the last listing) would otherwise be missed.
        importlib.invalidate_caches()
        try:
            mod = importlib.import_module(name)
        except Exception as exc:
            raise ModuleResolutionError(
                f"importing module {module!r} ({file}) failed: {type(exc).__name__}: {exc}",
                module=module,
            ) from exc
        found = getattr(mod, "__file__", None)
        if found is None or Path(found).absolute() != key:
            raise ModuleResolutionError(
                f"module {module!r} resolved to {found or 'a namespace'}, not {file}", module=module
            )
        _modules[key] = mod
        return mod


def forget_imports() -> None:
    """Drop the per-process import cache (used by tests)."""
    with _lock:
        _modules.clear()
        _providers.clear()
        _resolved.clear()
        for name in [n for n in sys.modules if n.startswith("_machinable_")]:
            del sys.modules[name]
