"""Backend selection of the public ops (`backend=`, ELECTRA_FAST_BACKEND, `ops.set_backend`) and the CUDA C++
backend's plumbing (`electra_fast.csrc`: a launcher module per op, kernels in `csrc/`), all on the CPU: the errors of
a backend that cannot run, the probe that must never compile, the build definition, the sampler choice of the
launchers, and the fake kernels + autograd wiring on meta tensors. Each op's results on each backend: its own file in
tests/ops/."""
import pytest
import torch

from conftest import requires_cuda
from electra_fast import ops
from electra_fast.csrc import _build as _cuda_build, _extension as ef_cuda
from electra_fast.csrc import gumbel_sample as cu_gumbel, masked_gather as cu_gather, mlm_loss_and_sample as cu_mlm, \
    replace_tokens as cu_replace, rtd_bce_loss as cu_bce
from electra_fast.options import env_sampler
from helpers import cuda_seed

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_backend_switch(monkeypatch):
    x, pos = torch.randn(1, 4, 2), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        ops.masked_gather(x, pos, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton.*TRITON_INTERPRET"):
        ops.masked_gather(x, pos, backend="triton")
    assert ops.available_backends("cpu") == ["torch"]
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "torch")
    assert ops.get_backend() == "torch"
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="ELECTRA_FAST_BACKEND.*nope"):
        ops.masked_gather(x, pos)
    monkeypatch.delenv("ELECTRA_FAST_BACKEND")
    ops.set_backend("torch")
    try:
        assert torch.equal(ops.masked_gather(x, pos), x[:, :1])
    finally:
        ops.set_backend(None)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError) as info:
        ops.masked_gather(torch.randn(1, 2, 3), torch.zeros(1, 1, dtype=torch.long), backend="gpu")
    for word in ["backend", "gpu"]:
        assert word in str(info.value), (word, str(info.value))


# ---------------------------------------------------------------- the CUDA C++ backend, on the CPU

def _cpu_calls():
    logits, ids = torch.randn(4, 10), torch.randint(0, 10, (4,))
    hidden, positions = torch.randn(2, 6, 8), torch.randint(0, 6, (2, 2))
    return {
        "mlm_loss_and_sample": lambda **kw: ops.mlm_loss_and_sample(logits, ids, torch.ones(4), **kw),
        "gumbel_sample": lambda **kw: ops.gumbel_sample(logits, **kw),
        "masked_gather": lambda **kw: ops.masked_gather(hidden, positions, **kw),
        "replace_tokens": lambda **kw: ops.replace_tokens(torch.randint(0, 10, (2, 6)), positions, torch.ones(2, 2),
                                                          torch.randint(0, 10, (2, 2)), **kw),
        "rtd_bce_loss": lambda **kw: ops.rtd_bce_loss(torch.randn(2, 6), torch.rand(2, 6) > 0.5, **kw),
    }


@pytest.mark.parametrize("op", sorted(_cpu_calls()))
def test_backend_cuda_on_cpu_tensors_raises(op):
    call = _cpu_calls()[op]
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run .*CUDA tensors"):
        call(backend="cuda")
    assert "cuda" not in ops.available_backends("cpu", op)
    call()  # the default on CPU tensors is the reference, silently


def test_direct_calls_name_the_cpu_argument():
    ids, seed = torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must be a CUDA tensor.*got device cpu"):
        cu_mlm.mlm_loss_and_sample(torch.randn(4, 10), ids, torch.ones(4), seed, 1.0, False)
    with pytest.raises(ValueError, match="hidden must be a CUDA tensor"):
        cu_gather.masked_gather(torch.randn(2, 3, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be a CUDA tensor"):
        cu_replace.replace_tokens(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                                  torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))


def test_sampler_choice_is_checked():
    assert env_sampler() in cu_mlm.SAMPLERS and cu_mlm.SAMPLERS[0] == "cdf"  # the default: exact inverse CDF
    ids, seed = torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="ELECTRA_FAST_SAMPLER.*nope"):
        cu_mlm.mlm_loss_and_sample(torch.randn(4, 10), ids, torch.ones(4), seed, 1.0, False, sampler="nope")
    with pytest.raises(ValueError, match="ELECTRA_FAST_SAMPLER.*nope"):
        cu_gumbel.gumbel_sample(torch.randn(4, 10), seed, 1.0, sampler="nope")


def test_probe_is_cheap_and_explains_itself():
    before = ef_cuda._ext
    reason = ef_cuda.unavailable_reason()
    assert isinstance(reason, str) and ef_cuda.is_available() == (reason == "")
    assert ef_cuda._ext is before  # probing never builds or loads the extension
    if not torch.cuda.is_available():
        assert not ef_cuda.is_available()
        assert "CUDA" in reason
        with pytest.raises(RuntimeError, match="CUDA backend is unavailable"):
            ef_cuda.extension()


def test_build_definition(monkeypatch):
    assert ef_cuda._csrc_dir().endswith("csrc")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = _cuda_build.arch_flags(["8.6"])
    assert "-gencode=arch=compute_90,code=sm_90" in flags  # Hopper, always
    assert "-gencode=arch=compute_86,code=sm_86" in flags  # the GPU present at a JIT build
    assert flags[-1] == "-gencode=arch=compute_80,code=compute_80"  # portable PTX
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert _cuda_build.arch_flags(["8.6"]) == []  # torch turns the variable into flags itself
    digest = _cuda_build.sources_digest(ef_cuda._csrc_dir())
    assert len(digest) == 16 and digest == _cuda_build.sources_digest(ef_cuda._csrc_dir())


def test_cuda_fake_kernels_and_autograd_wiring_on_meta():
    # Meta tensors run the fake kernels and the registered autograd, so shapes and dtypes are checked here.
    d = "meta"
    for dtype in DTYPES:
        logits = torch.empty(6, 11, device=d, dtype=dtype, requires_grad=True)
        ids, w, seed = torch.zeros(6, dtype=torch.long, device=d), torch.ones(6, device=d), cuda_seed(d)
        loss, sampled, correct, lse, wsum = cu_mlm._mlm_op(logits, ids, w, seed, 1.0, True, "cdf", 9)
        assert (loss.shape, loss.dtype, sampled.shape, sampled.dtype, correct.dtype) == \
            (torch.Size([]), torch.float32, torch.Size([6]), torch.int64, torch.bool)
        loss.backward()
        assert logits.grad.shape == logits.shape and logits.grad.dtype == dtype
        assert cu_gumbel._gumbel_op(logits.detach(), seed, 0.5, ids, "gumbel", 11).shape == (6,)

        bce_logits = torch.empty(3, 7, device=d, dtype=dtype, requires_grad=True)
        bce = cu_bce._bce_op(bce_logits, torch.empty(3, 7, device=d, dtype=torch.bool),
                              torch.empty(3, 7, device=d, dtype=torch.int64))[0]
        bce.backward()
        assert bce.dtype == torch.float32 and bce_logits.grad.dtype == dtype

        hidden = torch.empty(2, 9, 5, device=d, dtype=dtype, requires_grad=True)
        out = cu_gather._gather_op(hidden, torch.zeros(2, 4, dtype=torch.long, device=d))
        out.sum().backward()
        assert out.shape == (2, 4, 5) and hidden.grad.shape == hidden.shape and hidden.grad.dtype == dtype
    disc, rep = cu_replace._replace_op(torch.empty(2, 9, dtype=torch.int32, device=d),
                                    torch.zeros(2, 4, dtype=torch.long, device=d), torch.ones(2, 4, device=d),
                                    torch.zeros(2, 4, dtype=torch.long, device=d))
    assert disc.dtype == torch.int32 and rep.dtype == torch.bool and rep.shape == (2, 9)


@requires_cuda
@pytest.mark.parametrize("op", ["masked_gather", "mlm_loss_and_sample", "gumbel_sample", "replace_tokens",
                                "rtd_bce_loss"])
def test_backend_is_listed_on_cuda(ext, op):
    assert "cuda" in ops.available_backends("cuda", op)
