"""Every Triton kernel stays inside its buffers (a segfault was seen once in the interpreter; the dispatcher
crashes that followed came from a second import of the kernels).

Two independent checks, run in the Triton interpreter (`TRITON_INTERPRET=1`, where a stray access reads or writes
whatever the process has at that address: garbage, a corrupted heap that crashes a later test, or a segfault):
- every load and store of an interpreted kernel is intercepted before it happens: each address a mask lets through
  must lie, whole element included, inside one of the launch's tensor arguments (the view's own extent, not its
  storage); a stray one fails the test before any memory is touched.
- every tensor given to an op lives inside a larger buffer whose guard regions before and after are filled with a
  byte pattern; the guards are checked after the op (the launchers' own outputs are plain allocations: a custom op
  must not return views of a larger buffer; the interception covers their accesses).
Tiny shapes and the shrunken tiles of the op tests (conftest's `small_tiles`), so every loop has a partial last
tile. Loaded as a plugin (see `pytest_configure`), the first check covers any other interpreter test run, e.g. all of
tests/ops/.
"""
import os

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the bounds checks intercept the Triton interpreter: run with TRITON_INTERPRET=1",
                allow_module_level=True)
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from electra_fast import ops  # noqa: E402
from helpers import kernel  # noqa: E402

pytestmark = pytest.mark.usefixtures("small_tiles")

GUARD = 64         # elements of guard before and after every buffer
PATTERN = 0xA5     # guard byte
_EMPTY = torch.empty  # the real allocator, whatever the fixtures patch


def _extent(t: torch.Tensor):
    """`(first byte, one past the last byte)` a view can address with its sizes and strides."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class Bounds:
    """The registry of guarded buffers and the access checks of the current launch."""

    def __init__(self):
        self.buffers = []   # whole buffers: GUARD elements, the tensor, GUARD elements
        self.ranges = []    # byte ranges of the running launch's tensor arguments
        self.kernel = None
        self.accesses = 0

    def guarded(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `t` (same dtype, shape, requires_grad) inside a guarded buffer."""
        buf = _EMPTY((GUARD * 2 + t.numel(),), dtype=t.dtype, device=t.device)
        raw = buf.view(torch.uint8)
        raw[: GUARD * t.element_size()] = PATTERN
        raw[(GUARD + t.numel()) * t.element_size():] = PATTERN
        self.buffers.append(buf)
        view = buf[GUARD: GUARD + t.numel()].view(t.shape)
        with torch.no_grad():
            view.copy_(t)
        return view.requires_grad_(t.requires_grad)

    def assert_guards_intact(self):
        assert self.buffers, "no buffer was guarded"
        for buf in self.buffers:
            raw, edge = buf.view(torch.uint8), GUARD * buf.element_size()
            for side, part in (("before", raw[:edge]), ("after", raw[raw.numel() - edge:])):
                assert bool((part == PATTERN).all()), f"a kernel wrote into the guard {side} a {buf.dtype} buffer"

    def check(self, ptrs, mask, what: str):
        if self.kernel is None:
            return
        addrs = np.asarray(ptrs.data, dtype=np.uint64).ravel()
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()
        addrs = addrs[live]
        size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        inside = np.zeros(addrs.shape, dtype=bool)
        for lo, hi in self.ranges:
            inside |= (addrs >= lo) & (addrs + size <= hi)
        if not inside.all():
            bad = int(addrs[~inside][0])
            near = min(self.ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=(0, 0))
            raise AssertionError(
                f"{self.kernel} at program {interpreter.interpreter_builder.grid_idx}: {what} of {size} bytes at "
                f"{bad:#x}, outside every argument ({int((~inside).sum())} such lanes; nearest argument spans "
                f"[{near[0]:#x}, {near[1]:#x}), offset {bad - near[0]})")


def intercept(b: Bounds, patch) -> None:
    """Route every load and store of the interpreter through `b.check`, and record each launch's tensor arguments.
    `patch(obj, name, value)`: `setattr`, or a monkeypatch's."""
    builder = interpreter.InterpreterBuilder
    load, store, init_args = builder.create_masked_load, builder.create_masked_store, \
        interpreter.GridExecutor._init_args_hst

    def checked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        b.accesses += 1
        b.check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_policy):
        b.accesses += 1
        b.check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, cache_policy)

    def launch_args(self, args_dev, kwargs):
        # The host copies the interpreter runs on (CPU tensors: the same memory); their extents are the launch's.
        args, kw = init_args(self, args_dev, kwargs)
        tensors = [interpreter._unwrap_tensor(a) for a in list(args) + list(kw.values()) if hasattr(a, "data_ptr")]
        b.ranges, b.kernel = [_extent(t) for t in tensors], self.fn.__name__
        return args, kw

    patch(builder, "create_masked_load", checked_load)
    patch(builder, "create_masked_store", checked_store)
    patch(interpreter.GridExecutor, "_init_args_hst", launch_args)


def pytest_configure(config):
    """As a plugin, `TRITON_INTERPRET=1 PYTHONPATH=tests python -m pytest -p test_bounds tests/...`, this module
    checks every access of every interpreted kernel in the run (without guards: the interception is exact)."""
    intercept(Bounds(), setattr)


@pytest.fixture
def bounds(poison, monkeypatch):
    """Intercepts the interpreter's memory ops and the allocators for the duration of a test; yields the registry
    (its `guarded` places test inputs in guarded buffers) and checks the guards at the end."""
    b = Bounds()
    intercept(b, monkeypatch.setattr)
    # The launchers' own outputs are not moved into guarded buffers (a custom op must return fresh tensors, not
    # views of a larger buffer); the interception above checks their accesses exactly all the same.
    yield b
    b.kernel = None
    b.assert_guards_intact()
    assert b.accesses > 0, "no kernel ran"


def rand(b, *shape, dtype=torch.float32, scale=1.0):
    return b.guarded((torch.randn(*shape) * scale).to(dtype))


# ---------------------------------------------------------------- the checker itself

@triton.jit
def _reads_past_the_end(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i), mask=i < n)  # the load is unmasked: BLOCK > n reads past x


@triton.jit
def _writes_past_the_end(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n, other=0.0))  # the store is unmasked


@pytest.mark.parametrize("kernel, what", [(_reads_past_the_end, "load"), (_writes_past_the_end, "store")])
def test_checker_catches_a_stray_access(bounds, kernel, what):
    x, out = bounds.guarded(torch.randn(5)), bounds.guarded(torch.empty(5))
    with pytest.raises(Exception, match=rf"{kernel.__name__} at program \(0, 0, 0\): {what} of 4 bytes at .* "
                                        r"outside every argument \(3 such lanes"):
        kernel[(1,)](x, out, 5, BLOCK=8)
    kernel[(1,)](x, out, 5, BLOCK=4)  # in bounds: passes
    bounds.assert_guards_intact()  # the stray access was stopped before it happened


def test_checker_catches_a_write_into_a_guard(bounds, monkeypatch):
    x, out = bounds.guarded(torch.randn(7)), bounds.guarded(torch.empty(7))
    out_buffer = bounds.buffers[-1]
    monkeypatch.setattr(bounds, "check", lambda *args: None)  # let the stray store happen
    _writes_past_the_end[(1,)](x, out, 7, BLOCK=8)  # lane 7 lands in out's guard
    with pytest.raises(AssertionError, match="guard after a torch.float32 buffer"):
        bounds.assert_guards_intact()
    out_buffer.view(torch.uint8)[-GUARD * 4:] = PATTERN  # repaired, for the fixture's own final check


# ---------------------------------------------------------------- every kernel, through the public ops

def test_masked_gather_in_bounds(bounds):
    hidden = rand(bounds, 2, 7, 10).requires_grad_()
    positions = bounds.guarded(torch.tensor([[0, 6, 3, 3, 6], [1, 1, 1, 0, 5]]))  # both ends, duplicates
    out = ops.masked_gather(hidden, positions, backend="triton")
    (grad,) = torch.autograd.grad(out, hidden, rand(bounds, *out.shape))
    assert torch.equal(out, ops.masked_gather(hidden, positions, backend="torch"))
    assert grad.shape == hidden.shape
    # Positions outside [0, L) (the op rejects them; the kernel entry does not check) read nothing out of bounds.
    wild = bounds.guarded(torch.tensor([[-3, 7, 2], [1 << 40, 0, -1]]))
    out = kernel("masked_gather").masked_gather(hidden, wild)
    torch.autograd.grad(out, hidden, rand(bounds, *out.shape))
    assert torch.equal(out[0, 2], hidden[0, 2]) and torch.equal(out[1, 1], hidden[1, 0])
    assert not out[0, :2].any() and not out[1, 0].any() and not out[1, 2].any()


@pytest.mark.parametrize("sampler, dtype, temperature, disallow", [("cdf", torch.float32, 1.0, False),
                                                                   ("gumbel", torch.float16, 0.7, True),
                                                                   ("cdf", torch.float16, 0.7, True)])
def test_mlm_loss_and_sample_in_bounds(bounds, sampler, dtype, temperature, disallow):
    m, w, v = 7, 40, 37  # vocabulary padded to 40 columns
    logits = rand(bounds, m, w, dtype=dtype, scale=3).requires_grad_()
    targets = bounds.guarded(torch.randint(0, v, (m,)))
    weights = bounds.guarded((torch.rand(m) > 0.3).float())
    loss, sampled, _ = ops.mlm_loss_and_sample(logits, targets, weights, temperature=temperature,
                                               disallow_correct=disallow, vocab_size=v, backend="triton",
                                               sampler=sampler)
    torch.autograd.grad(loss, logits, bounds.guarded(torch.tensor(1.5)))
    assert ((sampled >= 0) & (sampled < v)).all()
    drawn = ops.gumbel_sample(logits.detach(), temperature=temperature, vocab_size=v, backend="triton",
                              disallow=targets if disallow else None, sampler=sampler)
    assert ((drawn >= 0) & (drawn < v)).all()


def test_lm_head_in_bounds(bounds):
    m, e, w, v = 6, 8, 20, 19
    hidden, weight, bias = rand(bounds, m, e).requires_grad_(), rand(bounds, w, e).requires_grad_(), \
        rand(bounds, w).requires_grad_()
    targets, weights = bounds.guarded(torch.randint(0, v, (m,))), bounds.guarded(torch.ones(m))
    loss, sampled, _ = ops.lm_head_loss_and_sample(hidden, weight, bias, targets, weights, vocab_size=v,
                                                   chunk_size=4, backend="triton")
    torch.autograd.grad(loss, (hidden, weight, bias), bounds.guarded(torch.tensor(0.5)))
    assert ((sampled >= 0) & (sampled < v)).all()


def test_replace_tokens_in_bounds(bounds):
    ids = bounds.guarded(torch.randint(5, 50, (3, 9)))
    positions = bounds.guarded(torch.tensor([[0, 8, 4, 0], [2, 3, 5, 7], [1, 0, 0, 0]]))
    weights = bounds.guarded(torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    sampled = bounds.guarded(torch.randint(5, 50, (3, 4)))
    got = ops.replace_tokens(ids, positions, weights, sampled, backend="triton")
    want = ops.replace_tokens(ids, positions, weights, sampled, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("label_dtype, mask_dtype", [(torch.bool, torch.bool), (torch.float32, torch.int64)])
def test_rtd_bce_in_bounds(bounds, dtype, label_dtype, mask_dtype):
    # The shapes of tests/ops/test_rtd_bce_loss.py::test_triton_matches_reference (45 tokens, blocks of 16), and more.
    for b, seq_len in ((5, 9), (1, 1), (3, 16), (2, 0)):
        logits = rand(bounds, b, seq_len, dtype=dtype, scale=4).requires_grad_()
        labels = bounds.guarded((torch.rand(b, seq_len) > 0.6).to(label_dtype))
        mask = bounds.guarded((torch.rand(b, seq_len) > 0.2).to(mask_dtype))
        loss = ops.rtd_bce_loss(logits, labels, mask, backend="triton")
        torch.autograd.grad(loss, logits, bounds.guarded(torch.tensor(3.0)))
        torch.testing.assert_close(loss, ops.rtd_bce_loss(logits, labels, mask, backend="torch"))


@pytest.mark.parametrize("weight_shape, with_bias", [("row", True), ("flat", False)])
def test_rtd_head_in_bounds(bounds, weight_shape, with_bias):
    b, seq_len, h = 3, 7, 10
    hidden = rand(bounds, b, seq_len, h).requires_grad_()
    weight = rand(bounds, *((1, h) if weight_shape == "row" else (h,)), scale=0.5).requires_grad_()
    bias = rand(bounds, 1).requires_grad_() if with_bias else None
    labels = bounds.guarded(torch.rand(b, seq_len) > 0.7)
    mask = bounds.guarded(torch.rand(b, seq_len) > 0.2)
    loss, _ = ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend="triton")
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    torch.autograd.grad(loss, inputs, bounds.guarded(torch.tensor(1.7)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_varlen_plan_in_bounds(bounds, dtype):
    mask = torch.rand(3, 37) < 0.5  # 37: three chunks of 16, the last partial
    mask[0] = True
    got = ops.varlen_plan(bounds.guarded(mask.to(dtype)), backend="triton")
    want = ops.varlen_plan(mask, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
