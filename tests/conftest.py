import importlib.util
import json
import os
import sys
import zlib

import pytest
import torch

# Run in place from a source checkout as well as installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: the workers share the cores; intra-op threads beyond a worker's share only spin against each other.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

# `pytest -n 2 --dist loadfile` (the README's line) hands whole files to the workers in collection order: the
# longest files go first, so that both workers finish together instead of one waiting on a long file taken last.
LONGEST_FILES = ("test_validate_gpu.py", "test_csrc_compile.py", "test_kernels_triton.py", "test_ddp.py",
                 "test_lm_head.py", "test_bounds.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    config.pluginmanager.register(_CollectionRecord(), "electra_fast_collection_record")
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist would order the files by their number of tests instead


HAVE_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# What every test or parameter that needs a GPU carries: the `cuda` marker (`pytest -m cuda` selects exactly the GPU
# tests; tests/test_gpu_map.py names each one's CPU twin) and the skip without a GPU.
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU"))
# Triton kernels on CUDA tensors at GPU sizes would run in the interpreter, on the host, for hours.
_NOT_INTERPRETED = pytest.mark.skipif(INTERPRET, reason="GPU sizes in the Triton interpreter (TRITON_INTERPRET=1)")


def requires_cuda(test):
    """Decorator: `test` needs a CUDA GPU (marked `cuda`, skipped without one)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def gpu_param(*values, id=None, triton=False):
    """A `pytest.param` that runs on a CUDA GPU only (marked `cuda`); `triton=True`: it runs Triton kernels, so it is
    skipped under TRITON_INTERPRET=1 as well."""
    return pytest.param(*values, id=id, marks=CUDA_MARKS + ((_NOT_INTERPRETED,) if triton else ()))


def interpreter_param(*values, id=None):
    """A `pytest.param` that runs Triton kernels on CPU tensors: only with triton installed and TRITON_INTERPRET=1."""
    return pytest.param(*values, id=id, marks=pytest.mark.skipif(
        not (INTERPRET and HAVE_TRITON),
        reason="Triton runs on CPU tensors only in its interpreter (triton installed, TRITON_INTERPRET=1)"))


def describe(item, root: str) -> dict:
    """What tests/test_gpu_map.py checks of a collected test, in JSON types: its id from the repository root, its
    function, parameters (as repr), whether it is marked `cuda`, and the reasons of its skipif marks."""
    relpath = os.path.relpath(str(item.path), root).replace(os.sep, "/")
    callspec = getattr(item, "callspec", None)
    return {"id": f"{relpath}::{item.name}", "function": f"{relpath}::{getattr(item, 'originalname', item.name)}",
            "params": {k: repr(v) for k, v in callspec.params.items()} if callspec else {},
            "cuda": item.get_closest_marker("cuda") is not None,
            "skip_reasons": [m.kwargs.get("reason", "") for m in item.iter_markers("skipif")],
            "skipped_here": any((m.args[0] if m.args else m.kwargs.get("condition")) is True
                                for m in item.iter_markers("skipif")),
            "fixtures": list(getattr(item, "fixturenames", ()))}


class _CollectionRecord:
    """Keeps what this session collected (before `-m`/`-k` deselect anything), and the modules it skipped while
    collecting, for tests/test_gpu_map.py; with ELECTRA_FAST_COLLECTION_DUMP set, writes them there as JSON."""

    items: list = []
    skipped_modules: dict = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, config, items):
        type(self).items = list(items)
        dump = os.environ.get("ELECTRA_FAST_COLLECTION_DUMP")
        if dump:
            root = str(config.rootpath)
            with open(dump, "w") as f:
                json.dump({"items": [describe(i, root) for i in items], "skipped_modules": self.skipped_modules}, f)

    def pytest_collectreport(self, report):
        if report.skipped:
            type(self).skipped_modules[report.nodeid] = str(report.longrepr)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Each test draws its own random inputs, reproducibly (ELECTRA_FAST_TEST_SEED varies them between runs).
    base = int(os.environ.get("ELECTRA_FAST_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + base)


@pytest.fixture
def poison(monkeypatch):
    """Fresh allocations come back filled with NaN (float), True (bool) or -7 (int)."""
    def fill(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else True if t.dtype == torch.bool else -7)

    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, lambda *a, _orig=getattr(torch, name), **k: fill(_orig(*a, **k)))
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(new_empty(self, *a, **k)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small prepared dataset (built-in corpus, 1000-token WordPiece, L = 32) for the training tests."""
    from electra_fast.data import builtin_lines, prepare, train_tokenizer

    out = str(tmp_path_factory.mktemp("data"))
    lines = list(builtin_lines())[:1500]
    prepare(iter(lines), out, train_tokenizer(iter(lines), vocab_size=1000), seq_len=32)
    return out


try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis comes with the `test` extra; without it only tests/test_fuzz_ops.py cannot run
    pass
else:
    # Fuzz budget of tests/test_fuzz_ops.py. "ci" (the default): few examples, derandomized so every CI run tries the
    # same ones; ELECTRA_FAST_FUZZ=thorough: many fresh random examples. No deadline: the Triton interpreter is slow.
    _fuzz = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("ci", max_examples=20, derandomize=True, **_fuzz)
    settings.register_profile("thorough", max_examples=400, **_fuzz)
    settings.load_profile(os.environ.get("ELECTRA_FAST_FUZZ", "ci"))


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared 2-core runner their spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
