"""Count the package's import cycles and the catalog's upward imports.

    python tools/import_graph.py

Imports inside functions count (grimp reads every import statement). Prints the modules
that sit in an import cycle (strongly connected components larger than one module) and
each import from ``machinable.catalog`` into a higher layer. Exits 1 when either exists.
"""

from __future__ import annotations

import sys

import grimp

# Layers from DESIGN.md, lowest first; the catalog may import only from these.
BELOW_CATALOG = (
    "machinable.identity",
    "machinable.errors",
    "machinable.settings",
    "machinable.context",
    "machinable.progress",
    "machinable.locks",
    "machinable.redact",
    "machinable.record",
    "machinable.catalog",
)


def cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """Groups of modules that import each other, directly or through others."""
    reach = {m: graph.find_upstream_modules(m) for m in graph.modules}
    found: list[set[str]] = []
    for module in sorted(graph.modules):
        if module in reach[module] or any(module in reach[c] for c in graph.find_modules_directly_imported_by(module)):
            group = {m for m in reach[module] if module in reach[m]} | {module}
            if group not in found:
                found.append(group)
    return found


def upward_from_catalog(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    found = []
    for module in sorted(graph.modules):
        if not (module == "machinable.catalog" or module.startswith("machinable.catalog.")):
            continue
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith("machinable"):
                continue
            if not any(imported == low or imported.startswith(low + ".") for low in BELOW_CATALOG):
                found.append((module, imported))
    return found


def main() -> int:
    graph = grimp.build_graph("machinable", cache_dir=None)
    # The package's __init__ only re-exports the public API; no module imports it.
    for importer in graph.find_modules_that_directly_import("machinable"):
        graph.remove_import(importer=importer, imported="machinable")
    components = cycles(graph)
    in_cycles = sorted(m for component in components for m in component)
    upward = upward_from_catalog(graph)
    print(f"modules in import cycles: {len(in_cycles)}")
    for module in in_cycles:
        print(f"  {module}")
    print(f"upward imports from the catalog: {len(upward)}")
    for importer, imported in upward:
        print(f"  {importer} -> {imported}")
    return 1 if in_cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
