"""The import graph of `electra_fast` (with `kernels/` and `csrc/` as `electra_fast.kernels` / `electra_fast.csrc`):
finds import circles and imports that point up the layers. `python -m electra_fast._dev.imports` prints both and
exits 1 if there is either; `--graph` prints every edge.

An edge is any import of one of our modules from another: at module level or inside a function, `from a import b`
(to `a.b` when that is a module), `importlib.import_module("...")`, and a string naming one of our modules
(`"electra_fast.kernels." + op` or an f-string with that prefix counts as an edge to every module under it), so a
dynamic import cannot hide a circle. Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`; those implicit
parent imports are not edges (every module would otherwise depend on the package's public facade).

The layers, lowest first, and which may import which, are in docs/architecture.md; `LAYERS` below is that table.
A module may import modules of its own layer or lower ones.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Dict, Iterable, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Source folders and the package names they install as (setup.py maps kernels/ and csrc/ into the package).
SOURCES = {"electra_fast": "electra_fast", "kernels": "electra_fast.kernels", "csrc": "electra_fast.csrc"}

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: List[tuple] = [
    ("foundation", ("electra_fast.errors", "electra_fast.checks", "electra_fast.options", "electra_fast.ops._contract",
                    "electra_fast.ops._checks")),
    ("kernels", ("electra_fast.kernels", "electra_fast.csrc")),
    ("ops", ("electra_fast.ops",)),
    ("model", ("electra_fast.model",)),
    ("data and io", ("electra_fast.data", "electra_fast.io")),
    ("pretraining", ("electra_fast.pretraining",)),
    ("train", ("electra_fast.train",)),
    ("cli", ("electra_fast.cli", "electra_fast.__main__")),
    # The package's lazy facade and the import paths kept for older code re-export from everything below.
    ("facade", ("electra_fast", "electra_fast.step", "electra_fast.pretrainer", "electra_fast._dev")),
]


def discover(root: str = ROOT) -> Dict[str, str]:
    """Module name -> file path, for every .py file of ours."""
    modules = {}
    for folder, package in SOURCES.items():
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, base)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in filenames:
                if name.endswith(".py"):
                    stem = name[:-3]
                    modules[".".join(parts if stem == "__init__" else parts + [stem])] = os.path.join(dirpath, name)
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    base = module.split(".")
    base = base if is_package else base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _string_prefix(node: ast.AST) -> Optional[str]:
    """The constant start of `"a.b." + x` or `f"a.b.{x}"`, else None."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _string_prefix(node.left) if not isinstance(node.left, ast.Constant) else (
            node.left.value if isinstance(node.left.value, str) else None)
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return None


def imports_of(module: str, path: str, known: Set[str]) -> Set[str]:
    """The modules of ours that `module` imports, in any of the ways the module docstring lists."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    out: Set[str] = set()

    def add(name: str) -> None:
        # The most specific module of ours that `name` denotes (an attribute import names its module).
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in known:
            out.add(node.value)
        elif isinstance(node, (ast.BinOp, ast.JoinedStr)):
            prefix = _string_prefix(node)
            if prefix and prefix.endswith(".") and any(k.startswith(prefix) for k in known):
                out.update(k for k in known if k.startswith(prefix))
    out.discard(module)
    return out


def graph(root: str = ROOT) -> Dict[str, Set[str]]:
    modules = discover(root)
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in sorted(modules.items())}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    best, rank = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, rank = p, i
    if rank < 0:
        raise ValueError(f"module {module!r} is in no layer of LAYERS")
    return rank


def upward(edges: Dict[str, Set[str]]) -> List[tuple]:
    """(importer, imported) pairs where the imported module sits in a higher layer."""
    return sorted((a, b) for a, targets in edges.items() for b in targets if layer_of(b) > layer_of(a))


def problems(root: str = ROOT) -> List[str]:
    edges = graph(root)
    out = [f"import circle: {' <-> '.join(c)}" for c in cycles(edges)]
    out += [f"upward import: {a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
            for a, b in upward(edges)]
    return out


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m electra_fast._dev.imports", description=__doc__.split("\n")[0])
    parser.add_argument("--graph", action="store_true", help="print every edge")
    args = parser.parse_args(argv)
    if args.graph:
        for a, targets in graph().items():
            for b in sorted(targets):
                print(f"{a} -> {b}")
    found = problems()
    for line in found:
        print(line)
    print(f"{len(graph())} modules, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
