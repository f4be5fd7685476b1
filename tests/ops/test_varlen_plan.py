"""`ops.varlen_plan`, the packing plan of the variable-length attention path (real tokens first in each row, two
sequences per row cut at cu_seqlens), on every backend: the reference against numpy's stable sort, the Triton kernel
against the reference (in the interpreter, or compiled on a GPU; tiles shrunk so rows span several chunks), opcheck,
bad masks named. The attention paths that use it: tests/model/test_attention.py."""
import numpy as np
import pytest
import torch

from conftest import TRITON_DEVICE as DEVICE, triton_param, triton_test
from electra_fast import ops
from electra_fast.ops import varlen_plan
from helpers import kernel


def test_reference_matches_numpy_stable_sort():
    """The reference against numpy's stable sort (the Triton kernel is checked against the reference below)."""
    b, n = 6, 40
    mask = torch.rand(b, n) < 0.6
    mask[0], mask[1] = True, False  # a full row (empty padding sequence), a row of padding only
    order, inverse, cu_seqlens = varlen_plan(mask, backend="torch")
    rows = np.arange(b)[:, None] * n
    want_order = np.argsort(~mask.numpy(), axis=1, kind="stable") + rows  # real first, each kind in its order
    torch.testing.assert_close(order, torch.from_numpy(want_order), rtol=0, atol=0)
    want_inverse = np.argsort(want_order - rows, axis=1) + rows
    torch.testing.assert_close(inverse, torch.from_numpy(want_inverse), rtol=0, atol=0)
    lengths = mask.sum(1).tolist()
    want_cu = [x for row, length in enumerate(lengths) for x in (row * n, row * n + length)] + [b * n]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == want_cu


@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("b, n", [(6, 40), (1, 5)])  # rows of 40: three chunks of 16, the count carried across
def test_triton_matches_reference(poison, dtype, b, n):
    mask = torch.rand(b, n, device=DEVICE) < 0.6
    mask[0] = True  # a full row: an empty padding sequence
    if b > 1:
        mask[1] = False  # padding only: an empty real sequence
    got = ops.varlen_plan(mask.to(dtype), backend="triton")
    want = ops.varlen_plan(mask.to(dtype), backend="torch")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend, b, n", [("torch", 3, 7), ("torch", 3, 0), ("torch", 0, 5),
                                           triton_param("triton", 2, 6)])
def test_opcheck(request, backend, b, n):
    if backend == "torch":
        from electra_fast.ops.varlen_plan import _varlen_plan_op

        torch.library.opcheck(_varlen_plan_op, (torch.rand(b, n) < 0.5,))  # the fake kernel's shapes, empty ones too
        return
    request.getfixturevalue("small_tiles")
    torch.library.opcheck(kernel("varlen_plan")._varlen_plan_op, (torch.rand(b, n, device=DEVICE) > 0.3,))


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"attention_mask must have 2 dimensions, got shape \(4,\)"):
        varlen_plan(torch.ones(4))
    with pytest.raises(TypeError, match="attention_mask must have dtype int64/int32/bool, got torch.float32"):
        varlen_plan(torch.ones(2, 4))
