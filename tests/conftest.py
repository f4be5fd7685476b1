import importlib.util
import json
import os
import sys
import zlib

import pytest
import torch

# Run in place from a source checkout as well as installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from electra_fast.options import SAMPLERS  # noqa: E402  (from the checkout)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: the workers share the cores; intra-op threads beyond a worker's share only spin against each other.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

# `pytest -n 2 --dist loadfile` (the README's line) hands whole files to the workers in collection order: the
# longest files go first, so that both workers finish together instead of one waiting on a long file taken last.
LONGEST_FILES = ("test_faults_torchrun.py", "test_validate_gpu.py", "test_gumbel_sample_distribution.py",
                 "test_lm_head_loss_and_sample.py", "test_ddp.py", "test_preemption.py", "test_checkout_imports.py",
                 "test_mask_tokens_whole_word.py", "test_csrc_compile.py", "test_pretrainer.py", "test_attention.py",
                 "test_gumbel_sample.py", "test_cli.py")


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
_NO_TRITON = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed: the Triton backend cannot run")
# Where the Triton kernels of the tiny-shape tests run: the interpreter takes CPU tensors, a GPU compiles them.
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
NEEDS_TRITON = pytest.mark.skipif(not (HAVE_TRITON and (INTERPRET or HAVE_CUDA)),
                                  reason="the Triton backend needs triton and a CUDA GPU, or TRITON_INTERPRET=1")


def requires_cuda(test):
    """Decorator: `test` needs a CUDA GPU (marked `cuda`, skipped without one)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def gpu_param(*values, id=None, triton=False):
    """A `pytest.param` that runs on a CUDA GPU only (marked `cuda`); `triton=True`: it runs Triton kernels, so it is
    skipped under TRITON_INTERPRET=1 as well, and without triton installed."""
    return pytest.param(*values, id=id, marks=CUDA_MARKS + ((_NOT_INTERPRETED, _NO_TRITON) if triton else ()))


def interpreter_param(*values, id=None):
    """A `pytest.param` that runs Triton kernels on CPU tensors: only with triton installed and TRITON_INTERPRET=1."""
    return pytest.param(*values, id=id, marks=pytest.mark.skipif(
        not (INTERPRET and HAVE_TRITON),
        reason="Triton runs on CPU tensors only in its interpreter (triton installed, TRITON_INTERPRET=1)"))


def triton_test(test):
    """Decorator: `test` runs the Triton kernels at tiny shapes on TRITON_DEVICE (marked `triton`: validate_gpu's
    `tests_triton` stage runs them compiled on a GPU), skipped where they cannot run."""
    return pytest.mark.triton(NEEDS_TRITON(test))


def triton_param(*values, id=None):
    """A `pytest.param` that runs the Triton kernels at tiny shapes on TRITON_DEVICE, as `triton_test` marks it."""
    return pytest.param(*values, id=id, marks=(pytest.mark.triton, NEEDS_TRITON))


# Parameters of the tests that run on a GPU and name their CPU twin as another parameter (tests/test_gpu_map.py):
# the Triton kernels at ELECTRA sizes, with their twin at tiny sizes in the interpreter;
TRITON_DEVICES = [interpreter_param("cpu"), gpu_param("cuda", triton=True)]
# the CUDA C++ backend, with the PyTorch reference on the CPU in its place (at sizes the CPU draws quickly);
ENGINES = [pytest.param("torch", id="cpu"), gpu_param("cuda")]
# the same with each sampler of the CUDA backend (as ELECTRA_FAST_SAMPLER selects it; the reference has one);
SAMPLED = [pytest.param("torch", None, id="cpu")] + [gpu_param("cuda", s, id=f"cuda-{s}") for s in SAMPLERS]
# the CUDA backend against Triton on a GPU, the reference against Triton in the interpreter at tiny sizes.
PAIRS = [interpreter_param(("torch", "triton"), id="cpu"), gpu_param(("cuda", "triton"), id="cuda", triton=True)]


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
except ImportError:  # hypothesis comes with the `test` extra; without it only tests/fuzz/ cannot run
    pass
else:
    # Fuzz budget of tests/fuzz/. "ci" (the default): few examples, derandomized so every CI run tries the
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


@pytest.fixture
def small_tiles(monkeypatch):
    """Every Triton kernel's tiles shrunk, so the tiny test shapes span several tiles with a partial last one."""
    from helpers import use_small_tiles

    use_small_tiles(monkeypatch)


@pytest.fixture(scope="session")
def ext():
    """The CUDA C++ backend's extension, built (a minute or two, then cached) for the GPU tests that use it."""
    from electra_fast.csrc import _extension

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _extension.is_available():
        pytest.skip(f"CUDA backend unavailable: {_extension.unavailable_reason()}")
    return _extension.extension()


@pytest.fixture
def device(request, backend):
    """Where `backend` runs: the CUDA backend on a GPU (its extension built first, or the test skipped for want of
    it), Triton on TRITON_DEVICE, the reference on the CPU."""
    if backend == "cuda":
        request.getfixturevalue("ext")
        return "cuda"
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.fixture
def with_sampler(monkeypatch, backend, sampler):
    """The kernels' sampler of a `SAMPLED` parameter, selected as ELECTRA_FAST_SAMPLER selects it."""
    from helpers import use_sampler

    use_sampler(monkeypatch, backend, sampler)


@pytest.fixture
def pair_device(request, pair):
    """Where a `PAIRS` parameter runs (the CUDA backend's extension built first)."""
    if pair[0] == "cuda":
        request.getfixturevalue("ext")
        return "cuda"
    return "cpu"


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """The "varlen" attention path's flash branch on the CPU: the real `aten::_flash_attention_forward` call, its
    autograd formula and meta function, with the CPU kernels of tests/attention_oracles.py registered in place of
    CUDA's."""
    import electra_fast.model.attention as attention
    from attention_oracles import flash_backward_cpu, flash_forward_cpu

    # marked as the real check is, so torch.compile folds this answer as it folds that one
    monkeypatch.setattr(attention, "flash_varlen_supported", torch.compiler.assume_constant_result(lambda *a: True))
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", flash_forward_cpu, "CPU")
    lib.impl("_flash_attention_backward", flash_backward_cpu, "CPU")
    yield
    lib._destroy()


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    """FlexAttention refuses backward on CPU tensors up front; its eager path (dense math, forward and backward,
    under the block mask) runs fine there. Lifting the refusal lets the CPU test the block mask's gradients; the
    GPU's compiled kernel is checked by the `cuda` tests of tests/model/test_attention.py."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
