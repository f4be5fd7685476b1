"""The layout's rules, checked: no import circle and no upward import in `electra_fast` (with `kernels/` and
`csrc/`), counting imports inside functions and through importlib; the finder itself catches each kind; every import
path the README names still works."""
import importlib
import os
import re
import textwrap

import pytest

from electra_fast._dev import imports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_circle_and_no_upward_import():
    assert imports.problems() == []


def test_every_module_has_a_layer():
    for module in imports.graph():
        imports.layer_of(module)  # raises for a module outside LAYERS


def _tree(tmp_path, files: dict) -> str:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path)


@pytest.mark.parametrize("how", ["module level", "inside a function", "importlib", "string prefix", "relative"])
def test_finder_sees_every_kind_of_import(tmp_path, how):
    back = {
        "module level": "from electra_fast.ops import a\n",
        "inside a function": "def f():\n    from electra_fast.ops.a import x\n",
        "importlib": "import importlib\ndef f():\n    return importlib.import_module('electra_fast.ops.a')\n",
        "string prefix": "import importlib\ndef f(op):\n    return importlib.import_module('electra_fast.ops.' + op)\n",
        "relative": None,
    }[how]
    files = {"electra_fast/__init__.py": "", "electra_fast/ops/__init__.py": "",
             "electra_fast/ops/a.py": "import electra_fast.model.b\n"}
    if how == "relative":
        files["electra_fast/model/__init__.py"] = ""
        files["electra_fast/model/b.py"] = "from ..ops import a\n"
    else:
        files["electra_fast/model/b.py"] = back
    root = _tree(tmp_path, files)
    edges = imports.graph(root)
    assert "electra_fast.ops.a" in edges["electra_fast.model.b"], edges
    assert imports.cycles(edges) == [["electra_fast.model.b", "electra_fast.ops.a"]]
    # ops sits below model: ops.a importing model.b points up the layers.
    assert ("electra_fast.ops.a", "electra_fast.model.b") in imports.upward(edges)


def test_finder_ignores_other_packages_and_implicit_parents(tmp_path):
    root = _tree(tmp_path, {"electra_fast/__init__.py": "import electra_fast.ops.a\n",
                            "electra_fast/ops/__init__.py": "from electra_fast.ops.a import x\n",
                            "electra_fast/ops/a.py": "import os, torch\nx = 'electra_fast'\n"})
    edges = imports.graph(root)
    assert edges["electra_fast.ops.a"] == set()  # importing a.py runs ops/__init__.py, which is no edge
    assert imports.cycles(edges) == []


def test_dev_command_exits_zero():
    assert imports.main([]) == 0


def _readme_paths() -> list:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    found = set(re.findall(r"\belectra_fast(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))
    for module, names in re.findall(r"from (electra_fast[\w.]*) import ([\w, ]+)", text):
        found.update(f"{module}.{n.strip()}" for n in names.split(","))
    return sorted(found)


def test_readme_names_its_import_paths():
    # The paths README.md names (the list below is what it named when the package moved into layers; each must
    # stay importable, and README may name more).
    kept = {"electra_fast.step.TrainStep", "electra_fast.step.warmup_linear_decay",
            "electra_fast.pretrainer.tie_embeddings", "electra_fast.rtd_step", "electra_fast.ElectraPretrainer",
            "electra_fast.param_groups", "electra_fast.AdamWeightDecay", "electra_fast.CUDAGraphStep",
            "electra_fast.ops.set_backend", "electra_fast.data.ElectraDataCollator"}
    for path in sorted(kept | set(_readme_paths())):
        if path.startswith("electra_fast.kernels"):
            continue  # the Triton modules' package, named as a whole
        module, _, attr = path.rpartition(".")
        try:
            obj = importlib.import_module(path)
        except ImportError:
            obj = getattr(importlib.import_module(module), attr)
        assert obj is not None, path
