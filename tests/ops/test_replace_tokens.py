"""`ops.replace_tokens` on every backend: the discriminator's input ids and its labels (replaced or not).

- Every backend against the op's definition written here (real slots write their samples; a sample equal to the
  original token is not a replacement), int32 and int64 ids: the reference on the CPU, the CUDA C++ backend on a GPU.
- The Triton kernel against the reference at tiny shapes with tiles shrunk (in the interpreter, or compiled on a
  GPU), outputs poisoned; at ELECTRA's shapes on a GPU (twin: tiny shapes in the interpreter); parity with the CUDA
  backend.
- opcheck of each backend's custom ops; bad arguments named; ids out of range; empty batches."""
import re

import pytest
import torch

from conftest import ENGINES, PAIRS, TRITON_DEVICE as DEVICE, TRITON_DEVICES, gpu_param, triton_param, triton_test
from electra_fast import ops
from electra_fast.csrc import replace_tokens as cu_replace
from helpers import (ELECTRA_SHAPES, ELECTRA_VOCAB, by_device, kernel, make_batch, masked_batch, poison_cuda_allocator,
                     sized_for)


# ---------------------------------------------------------------- every backend against the definition

@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("backend", ENGINES)
def test_matches_definition(backend, device, id_dtype):
    b, seq = 64, 512
    input_ids = torch.randint(1000, 30000, (b, seq), device=device, dtype=id_dtype)
    lengths = torch.randint(seq // 4, seq + 1, (b,), device=device)
    attention = (torch.arange(seq, device=device) < lengths[:, None]).long()
    _, positions, weights = ops.mask_tokens(input_ids, attention, mask_token_id=103, special_token_ids=(0, 101, 102))
    original = input_ids.gather(1, positions)
    # 30% of the samples equal the original token: those must come out as not replaced.
    same = torch.rand(positions.shape, device=device) < 0.3
    sampled = torch.where(same, original.long(), torch.randint(0, 30522, positions.shape, device=device))
    poison_cuda_allocator(b * seq * 16, device)
    disc, rep = ops.replace_tokens(input_ids, positions, weights, sampled, backend=backend)
    want_disc = input_ids.clone()  # the oracle, by its definition: real slots write their samples
    real = weights > 0
    rows = torch.arange(b, device=device)[:, None].expand_as(positions)
    want_disc[rows[real], positions[real]] = sampled[real].to(id_dtype)
    assert disc.dtype == id_dtype and torch.equal(disc, want_disc) and torch.equal(rep, disc != input_ids)
    assert rep.dtype == torch.bool
    assert 0 < rep.sum() < real.sum() and not rep[rows[real & same], positions[real & same]].any()


# ---------------------------------------------------------------- the Triton kernel

@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_triton_matches_reference(poison, id_dtype):
    b, seq_len, n = 4, 13, 5
    ids = torch.randint(4, 30, (b, seq_len), device=DEVICE, dtype=id_dtype)
    pos = torch.stack([torch.randperm(seq_len, device=DEVICE)[:n] for _ in range(b)])
    w = (torch.rand(b, n, device=DEVICE) > 0.3).float()
    pos = torch.where(w > 0, pos, 0)
    sampled = torch.randint(4, 30, (b, n), device=DEVICE)
    sampled[0, 0] = ids[0, pos[0, 0]]  # a sample equal to the original: not replaced
    w[0, 0] = 1.0
    disc, labels = ops.replace_tokens(ids, pos, w, sampled.flatten(), backend="triton")
    ref_disc, ref_labels = ops.replace_tokens(ids, pos, w, sampled, backend="torch")
    assert disc.dtype == id_dtype and torch.equal(disc, ref_disc)
    assert labels.dtype == torch.bool and torch.equal(labels, ref_labels)
    assert not labels[0, pos[0, 0]]


@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_at_electra_shapes(poison, monkeypatch, device, shape):
    sized_for(device, monkeypatch)
    b, _, _ = ELECTRA_SHAPES[shape][device]
    ids, _, pos, w = masked_batch(device, shape)
    assert (w[: b // 2] == 0).sum(1).min() >= 2  # the padded rows' padding slots all point at position 0
    sampled = torch.randint(5, ELECTRA_VOCAB[device], (b, pos.shape[1]), device=device)
    got, want = (ops.replace_tokens(ids, pos, w, sampled, backend=be) for be in ("triton", "torch"))
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("pair", PAIRS)
def test_parity_with_triton(pair, pair_device):
    device = pair_device
    b, seq = by_device(device, (16, 512), (2, 16))
    if "triton" not in ops.available_backends(device, "replace_tokens"):
        pytest.skip("no Triton kernel for replace_tokens here")
    ids = torch.randint(0, 30522, (b, seq), device=device)
    _, positions, weights = ops.mask_tokens(ids, mask_token_id=103, special_token_ids=(0,))
    sampled = torch.randint(0, 30522, positions.shape, device=device)
    outs = [ops.replace_tokens(ids, positions, weights, sampled, backend=bk) for bk in pair]
    assert all(torch.equal(x, y) for x, y in zip(*outs))


# ---------------------------------------------------------------- registration, errors, empty batches

def opcheck_cases(backend, device):
    """Each backend's custom ops with the arguments torch.library.opcheck checks them at."""
    if backend == "torch":
        from electra_fast.ops.replace_tokens import _replace_tokens_op

        b, seq_len, v = 2, 10, 9
        ids, _ = make_batch(b=b, seq_len=seq_len, vocab=v)
        n = ops.num_slots(seq_len, 0.3)
        pos = torch.stack([torch.randperm(seq_len)[:n] for _ in range(b)])
        w = (torch.rand(b, n) > 0.3).float()
        return [(_replace_tokens_op, (ids, pos, w, torch.randint(0, v, (b, n))))]
    if backend == "triton":
        b, seq_len, n = 2, 6, 3
        pos = torch.randint(0, seq_len, (b, n), device=device)
        return [(kernel("replace_tokens")._replace_tokens_op, (torch.randint(0, 9, (b, seq_len), device=device), pos,
                                                               torch.rand(b, n, device=device),
                                                               torch.randint(0, 9, (b, n), device=device)))]
    v = 300
    positions = torch.randint(0, 40, (2, 7), device=device)
    return [(cu_replace._replace_op, (torch.randint(0, v, (2, 40), device=device), positions,
                                      torch.ones(2, 7, device=device), torch.randint(0, v, (2, 7), device=device)))]


@pytest.mark.parametrize("backend", ["torch", triton_param("triton"), gpu_param("cuda")])
def test_opcheck(request, backend, device):
    if backend == "triton":
        request.getfixturevalue("small_tiles")
    for op, args in opcheck_cases(backend, device):
        torch.library.opcheck(op, args)


def call_replace(ids=None, positions=None, weights=None, sampled=None, **kw):
    return ops.replace_tokens(torch.ones(2, 6, dtype=torch.long) if ids is None else ids,
                              torch.tensor([[0, 5], [2, 3]]) if positions is None else positions,
                              torch.ones(2, 2) if weights is None else weights,
                              torch.tensor([[7, 8], [9, 9]]) if sampled is None else sampled, **kw)


META = dict(device="meta")  # another device than the CPU, without a GPU
BAD_INPUTS = [  # (call, error type, what the message must hold: the argument, expected and actual, or a pattern)
    (lambda: ops.replace_tokens(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long),
                                torch.ones(2, 2), torch.zeros(5, dtype=torch.long)), ValueError, ["sampled", "4"]),
    (lambda: call_replace(ids=torch.ones(2, 6)), TypeError, ["input_ids"]),
    (lambda: call_replace(positions=torch.zeros(2, 2)), TypeError, ["positions"]),
    (lambda: call_replace(positions=torch.zeros(1, 2, dtype=torch.long)), ValueError, ["positions"]),
    (lambda: call_replace(weights=torch.ones(2, 3)), ValueError, ["weights"]),
    (lambda: call_replace(sampled=torch.ones(2, 2)), TypeError, ["sampled"]),
    (lambda: call_replace(sampled=torch.ones(2, 2, dtype=torch.long, **META)), ValueError, ["sampled"]),
    (lambda: call_replace(duplicates="first"), ValueError, ["duplicates must be 'add' or 'mean'"]),
    (lambda: call_replace(duplicates="mean", backend="triton"), ValueError,
     [re.compile("duplicates='mean'.*backend='triton'")]),
]


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS)
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word.search(message) if isinstance(word, re.Pattern) else word in message, (word, message)


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
@pytest.mark.parametrize("positions", [[[0, 6], [2, 3]], [[0, -1], [2, 3]]])
def test_out_of_range_ids_are_named(positions, backend):
    """Checked on CPU tensors (free; these are); on CUDA a documented precondition (checking would sync)."""
    with pytest.raises((ValueError, IndexError), match="positions"):
        call_replace(positions=torch.tensor(positions), backend=backend)


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_empty_batch(poison, backend):
    dev = "cpu" if backend == "torch" else DEVICE
    for b, seq_len, n in [(0, 5, 2), (2, 5, 0), (2, 5, 2)]:
        ids = torch.randint(0, 9, (b, seq_len), device=dev)
        positions = torch.arange(n, device=dev).expand(b, n)
        disc, replaced = ops.replace_tokens(ids, positions, torch.ones(b, n, device=dev), ids[:, :n].flatten(),
                                            backend=backend)  # samples equal to the originals: nothing replaced
        assert torch.equal(disc, ids) and not replaced.any()
