#!/usr/bin/env python
"""Count the assertions of each test function of a tests folder, statically (ast), as JSON.

    python count_assertions.py TESTS_DIR [--ids IDS_FILE] [-o OUT.json]
    python count_assertions.py --compare BEFORE.json AFTER.json [--map MAP.json]
    python count_assertions.py --compare-ids OLD_IDS NEW_IDS --map MAP.json

What counts as one assertion, wherever it stands in a test's body (loops and nested functions included, each
occurrence once, decorators not):
  assert_stmt  an `assert` statement
  assert_call  a call whose name starts with `assert` (torch.testing.assert_close, np.testing.assert_*,
               self.assertEqual, mock's assert_called_*, local assert_* helpers)
  raises       pytest.raises / pytest.warns / pytest.deprecated_call, as a context manager or a call
  fail         pytest.fail(...)
  opcheck      torch.library.opcheck(...) (it raises on a failed check)
  helper_call  a call of a function of the tests folder (helpers.py, conftest.py, sm90.py, a test module's own
               non-test functions, another test module's) that asserts, directly or through the functions it
               calls; each call counts 1 whatever the helper holds. `self.name(...)` resolves to the class's method.
Fixtures and helpers are not tests; those that assert are listed under "support" with their own counts (a move must
keep them too). With --ids (the output of `pytest --collect-only -q`), each test also gets the number of items
collected from it, and the totals the number of collected ids.

--compare-ids OLD_IDS NEW_IDS --map MAP.json: two `pytest --collect-only -q [-m EXPR]` outputs (e.g. `-m cuda`,
`-m "triton and not cuda"`: what validate_gpu's stages select); each old test function with an item in OLD_IDS must
map to new functions of which at least one has an item in NEW_IDS (a GPU stage keeps selecting it).

--compare: totals before and after per file and overall; with --map (JSON {old "file::func": new "file::func" or a
list of them}), each old test's count against the sum of its new tests' counts, old tests the map misses, and new
tests nobody maps to. A many-to-one entry (duplicates merged) is shown as a merge: the new test must hold at least
the largest count of the old tests mapped to it alone; an old test split over several new tests must have at most
as many assertions as their counts summed. MAP may also be a markdown file whose table rows read
`| `old id` | `new id`<br>`new id` | ... |` (tests/MOVES.md).
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import sys

CATEGORIES = ("assert_stmt", "assert_call", "raises", "fail", "opcheck", "helper_call")
PYTEST_CHECKS = {"raises": "raises", "warns": "raises", "deprecated_call": "raises", "fail": "fail"}


def _call_name(func):
    """(base, name) of a call's target: `f` -> (None, "f"), `a.b.f` -> ("a.b", "f")."""
    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute):
        parts, node = [], func.value
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
            return ".".join(reversed(parts)), func.attr
        return "?", func.attr
    return None, None


def _walk_body(fn):
    """Every node of a function's body (not its decorators or defaults)."""
    for stmt in fn.body:
        yield from ast.walk(stmt)


class Module:
    def __init__(self, name: str, path: str, local_modules: set):
        self.name, self.path = name, path
        with open(path) as f:
            self.tree = ast.parse(f.read(), path)
        self.functions = {}  # qualname -> FunctionDef (module level and class methods)
        self.classes = {}
        self.imported = {}  # local alias -> (module, name): from helpers import x [as y]
        self.module_alias = {}  # alias -> module: import helpers [as h]
        self.pytest_names = {}  # alias -> pytest attr, from `from pytest import raises`
        self.pytest_alias = {"pytest"}
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.functions[f"{node.name}::{sub.name}"] = sub
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                root = node.module.split(".")[-1] if node.module.startswith("tests.") else node.module
                for a in node.names:
                    if root in local_modules:
                        self.imported[a.asname or a.name] = (root, a.name)
                    elif node.module == "pytest":
                        self.pytest_names[a.asname or a.name] = a.name
            elif isinstance(node, ast.Import):
                for a in node.names:
                    root = a.name.split(".")[-1] if a.name.startswith("tests.") else a.name
                    if root in local_modules:
                        self.module_alias[a.asname or a.name] = root
                    elif a.name == "pytest":
                        self.pytest_alias.add(a.asname or "pytest")

    def is_test(self, qualname: str) -> bool:
        if "::" in qualname:
            cls, meth = qualname.split("::")
            return cls.startswith("Test") and meth.startswith("test")
        return qualname.startswith("test")

    def is_fixture(self, fn) -> bool:
        for d in fn.decorator_list:
            target = d.func if isinstance(d, ast.Call) else d
            if _call_name(target)[1] == "fixture":
                return True
        return False


class Counter:
    def __init__(self, tests_dir: str):
        self.dir = os.path.abspath(tests_dir)
        self.rel_root = os.path.dirname(self.dir)
        paths = {}
        for dirpath, dirnames, filenames in os.walk(self.dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for fn in sorted(filenames):
                if fn.endswith(".py"):
                    paths[os.path.join(dirpath, fn)] = fn[:-3]
        # Modules import each other by bare name (the tests folder, and each subfolder with rootdir-relative
        # imports, is on sys.path); a name shared by several files (conftest, __init__) resolves to the same folder's.
        local = set(paths.values())
        self.modules = {p: Module(name, p, local) for p, name in paths.items()}
        self.by_name = collections.defaultdict(list)
        for p, m in self.modules.items():
            self.by_name[m.name].append(m)
        self.asserting = {}  # (path, qualname) -> bool
        self._fixpoint()

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.rel_root).replace(os.sep, "/")

    def _resolve_module(self, mod: Module, name: str):
        cands = self.by_name.get(name, [])
        same_dir = [m for m in cands if os.path.dirname(m.path) == os.path.dirname(mod.path)]
        return (same_dir or cands or [None])[0]

    def resolve(self, mod: Module, cls: str | None, call: ast.Call):
        """(module path, qualname) of the tests-folder function a call targets, or None."""
        base, name = _call_name(call.func)
        if name is None:
            return None
        if base is None:
            if name in mod.functions:
                return mod.path, name
            if name in mod.imported:
                src, orig = mod.imported[name]
                target = self._resolve_module(mod, src)
                return (target.path, orig) if target and orig in target.functions else None
            # conftest functions are reachable only by import; fixtures are never called
            return None
        if base in ("self", "cls") and cls is not None and f"{cls}::{name}" in mod.functions:
            return mod.path, f"{cls}::{name}"
        if base in mod.module_alias:
            target = self._resolve_module(mod, mod.module_alias[base])
            return (target.path, name) if target and name in target.functions else None
        return None

    def direct(self, mod: Module, qualname: str):
        """Counts by category (helper calls excluded) and the calls of tests-folder functions, of one function."""
        fn = mod.functions[qualname]
        cls = qualname.split("::")[0] if "::" in qualname else None
        counts = dict.fromkeys(CATEGORIES, 0)
        calls = []
        for node in _walk_body(fn):
            if isinstance(node, ast.Assert):
                counts["assert_stmt"] += 1
            elif isinstance(node, ast.Call):
                base, name = _call_name(node.func)
                if name is None:
                    continue
                if name.startswith("assert"):
                    counts["assert_call"] += 1
                elif name == "opcheck":  # torch.library.opcheck raises on any failed check
                    counts["opcheck"] += 1
                elif base in mod.pytest_alias and name in PYTEST_CHECKS:
                    counts[PYTEST_CHECKS[name]] += 1
                elif base is None and name in mod.pytest_names and mod.pytest_names[name] in PYTEST_CHECKS:
                    counts[PYTEST_CHECKS[mod.pytest_names[name]]] += 1
                else:
                    target = self.resolve(mod, cls, node)
                    if target is not None and target != (mod.path, qualname):
                        calls.append(target)
        return counts, calls

    def _fixpoint(self):
        info = {}
        for p, mod in self.modules.items():
            for q in mod.functions:
                info[(p, q)] = self.direct(mod, q)
        self.info = info
        asserting = {k: sum(c.values()) > 0 for k, (c, _) in info.items()}
        changed = True
        while changed:
            changed = False
            for k, (_, calls) in info.items():
                if not asserting[k] and any(asserting.get(t) for t in calls):
                    asserting[k] = changed = True
        self.asserting = asserting

    def count(self, path: str, qualname: str) -> dict:
        counts, calls = self.info[(path, qualname)]
        counts = dict(counts)
        helpers = collections.Counter()
        for t in calls:
            if self.asserting.get(t):
                counts["helper_call"] += 1
                helpers[f"{self.rel(t[0])}::{t[1]}"] += 1
        counts["total"] = sum(counts[c] for c in CATEGORIES)
        counts["helpers"] = dict(sorted(helpers.items()))
        return counts

    def report(self, ids_file: str | None = None) -> dict:
        collected = collections.Counter()
        if ids_file:
            with open(ids_file) as f:
                for line in f:
                    line = line.strip()
                    if "::" in line and not line.startswith(("=", "<")):
                        collected[re.sub(r"\[.*\]$", "", line)] += 1
        tests, support, per_file = {}, {}, {}
        for p, mod in sorted(self.modules.items()):
            rel = self.rel(p)
            for q, fn in mod.functions.items():
                tid = f"{rel}::{q}"
                c = self.count(p, q)
                if mod.name.startswith("test_") and mod.is_test(q):
                    if ids_file:
                        c["collected"] = collected.get(tid, 0)
                    tests[tid] = c
                    f = per_file.setdefault(rel, {"tests": 0, "assertions": 0, "collected": 0})
                    f["tests"] += 1
                    f["assertions"] += c["total"]
                    f["collected"] += c.get("collected", 0)
                elif c["total"]:
                    c["kind"] = "fixture" if mod.is_fixture(fn) else "helper"
                    support[tid] = c
        totals = {"test_functions": len(tests), "assertions": sum(t["total"] for t in tests.values()),
                  **{c: sum(t[c] for t in tests.values()) for c in CATEGORIES},
                  "support_functions": len(support), "support_assertions": sum(s["total"] for s in support.values())}
        if ids_file:
            totals["collected_ids"] = sum(collected.values())
            totals["collected_ids_without_static_test"] = sorted(set(collected) - set(tests))
        asserting_helpers = sorted(f"{self.rel(p)}::{q}" for (p, q), a in self.asserting.items()
                                   if a and not (self.modules[p].name.startswith("test_")
                                                 and self.modules[p].is_test(q)))
        return {"tests_dir": self.rel(self.dir) or ".", "totals": totals, "per_file": per_file,
                "asserting_helpers": asserting_helpers, "support": support, "tests": tests}


def compare(before: dict, after: dict, mapping: dict | None) -> int:
    bt, at = before["totals"], after["totals"]
    print(f"test functions {bt['test_functions']} -> {at['test_functions']}; assertions {bt['assertions']} -> "
          f"{at['assertions']}; support assertions {bt['support_assertions']} -> {at['support_assertions']}")
    if "collected_ids" in bt and "collected_ids" in at:
        print(f"collected ids {bt['collected_ids']} -> {at['collected_ids']}")
    if not mapping:
        return 0
    bad = 0
    new_from = collections.defaultdict(list)
    for old, new in mapping.items():
        for n in ([new] if isinstance(new, str) else new):
            new_from[n].append(old)
    missing_old = sorted(set(before["tests"]) - set(mapping))
    for o in missing_old:
        print(f"UNMAPPED old test: {o}")
        bad += 1
    for n, olds in sorted(new_from.items()):
        if n not in after["tests"]:
            print(f"MISSING new test: {n} (from {olds})")
            bad += 1
            continue
        got = after["tests"][n]["total"]
        olds_counts = [before["tests"].get(o, {}).get("total", 0) for o in olds]
        # A split old test shares its count over its new tests (the sum of their counts is checked below); a new test
        # holds at least the largest count of the old tests that map to it alone.
        whole = [c for o, c in zip(olds, olds_counts) if isinstance(mapping[o], str) or len(mapping[o]) == 1]
        need = max(whole, default=0)
        tag = "merge" if len(olds) > 1 else "move" if whole else "split"
        if got < need:
            print(f"FEWER assertions ({tag}): {n} has {got}, {olds} had {olds_counts}")
            bad += 1
    for o, new in mapping.items():
        news = [new] if isinstance(new, str) else new
        if len(news) > 1:
            got = sum(after["tests"].get(n, {}).get("total", 0) for n in news)
            had = before["tests"].get(o, {}).get("total", 0)
            if got < had:
                print(f"FEWER assertions (split): {o} had {had}, {news} have {got}")
                bad += 1
    orphans = sorted(set(after["tests"]) - set(new_from))
    for n in orphans:
        print(f"new test nobody maps to: {n}")
    print("OK" if not bad else f"{bad} problem(s)")
    return 1 if bad else 0


def _functions(ids_file: str) -> collections.Counter:
    with open(ids_file) as f:
        return collections.Counter(re.sub(r"\[.*\]$", "", line.strip()) for line in f
                                   if "::" in line and not line.startswith(("=", "<")))


def compare_ids(old_ids: str, new_ids: str, mapping: dict) -> int:
    old, new = _functions(old_ids), _functions(new_ids)
    bad = 0
    for o in sorted(old):
        target = mapping.get(o)
        if target is None:
            print(f"UNMAPPED selected old test: {o}")
            bad += 1
            continue
        news = [target] if isinstance(target, str) else target
        if not any(n in new for n in news):
            print(f"NO LONGER SELECTED: {o} -> {news}")
            bad += 1
    print(f"{sum(old.values())} old items of {len(old)} functions -> {sum(new.values())} new items of {len(new)} "
          f"functions; " + ("OK" if not bad else f"{bad} problem(s)"))
    return 1 if bad else 0


def load_map(path: str) -> dict:
    """{old id: new id or [new ids]} from a JSON file, or from the rows of a markdown table whose first two cells
    hold the ids in backticks (several new ids joined by <br>)."""
    if not path.endswith(".md"):
        return json.load(open(path))
    mapping = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        olds = re.findall(r"`([^`]+)`", cells[0]) if len(cells) >= 2 else []
        if not olds or "::" not in olds[0]:
            continue
        news = re.findall(r"`([^`]+)`", cells[1])
        mapping[olds[0]] = news[0] if len(news) == 1 else news
    return mapping


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests_dir", nargs="?")
    ap.add_argument("--ids", help="output of `pytest --collect-only -q` for the same tree")
    ap.add_argument("-o", "--out")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--compare-ids", nargs=2, metavar=("OLD_IDS", "NEW_IDS"))
    ap.add_argument("--map", help="JSON {old test id: new test id or list}")
    a = ap.parse_args(argv)
    if a.compare_ids:
        if not a.map:
            ap.error("--compare-ids needs --map")
        return compare_ids(*a.compare_ids, load_map(a.map))
    if a.compare:
        load = lambda p: json.load(open(p))  # noqa: E731
        return compare(load(a.compare[0]), load(a.compare[1]), load_map(a.map) if a.map else None)
    if not a.tests_dir:
        ap.error("TESTS_DIR or --compare")
    result = Counter(a.tests_dir).report(a.ids)
    text = json.dumps(result, indent=1, sort_keys=False)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
        t = result["totals"]
        print(json.dumps(t if "collected_ids" not in t else {k: v for k, v in t.items()
                                                              if k != "collected_ids_without_static_test"}))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
