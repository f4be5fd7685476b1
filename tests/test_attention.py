"""Attention paths (electra_fast.attention, issue 11.2) and the encoder layer's launch diet (electra_fast.layers,
issue 11.3), against independent oracles: a naive masked softmax, the padding invariance of the encoder (a padded
row gives the outputs of the same row run alone, unpadded, without any mask), FlexAttention's own
`create_block_mask`, and plain per-tensor casts."""
import collections

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from electra_fast.attention import attend, attention_bias, padding_block_mask, padding_mask
from electra_fast.layers import autocast_parameters
from electra_fast.model import Discriminator, ElectraModelConfig, EncoderLayer

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def lengths_mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v over the real keys only, in fp64."""
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    return (s.softmax(-1) @ v.double()).to(q.dtype)


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    """FlexAttention refuses backward on CPU tensors up front; its eager path (dense math, forward and backward,
    under the block mask) runs fine there. Lifting the refusal lets the CPU test the block mask's gradients; the
    GPU's compiled kernel is checked by the `cuda` test below."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_matches_naive_masked_softmax_with_gradients(impl, dtype, flex_cpu_backward):
    b, h, n, d = 4, 2, 40, 16
    mask = lengths_mask([40, 17, 1, 33], n)  # full, padded, a single real token, padded
    mask[3, 5] = 0  # a hole inside a row: the mask need not be a prefix
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    prepared = padding_mask(mask, impl, dtype=dtype, dropout=False)
    out = attend(q, k, v, prepared)
    ref = naive_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("block", [8, 16, 128])
def test_padding_block_mask_matches_create_block_mask(block):
    n = 40
    mask = torch.rand(5, n) < 0.7
    mask[0] = True                # every key block full
    mask[1, :16] = True
    mask[1, 16:] = False          # whole blocks skipped
    mask[2] = False
    mask[2, 0] = True             # a single real token
    got = padding_block_mask(mask.long(), block)
    want = create_block_mask(lambda b, h, q, kv: mask[b, kv], 5, None, n, n, device="cpu", BLOCK_SIZE=block)
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=0, atol=0)
    # full blocks are told apart from partial ones (no mask evaluated there), as create_block_mask does
    torch.testing.assert_close(got.full_kv_num_blocks, want.full_kv_num_blocks, rtol=0, atol=0)
    torch.testing.assert_close(got.kv_num_blocks, want.kv_num_blocks, rtol=0, atol=0)


def tiny_discriminator(dropout=0.0):
    torch.manual_seed(0)
    cfg = ElectraModelConfig(vocab_size=97, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=48, hidden_dropout_prob=dropout,
                             attention_probs_dropout_prob=dropout, pad_vocab_multiple=1)
    return Discriminator(cfg)


@pytest.mark.parametrize("impl", ["auto", "sdpa", "flex"])
def test_padded_rows_give_the_outputs_of_unpadded_rows(impl, flex_cpu_backward):
    """fp32, tight: each padded row's hidden states at its real tokens equal that row run alone, cut to its
    length, with attention_mask=None (the no-mask path); gradients of a loss over real tokens agree likewise."""
    model = tiny_discriminator().eval()
    model.attention_impl = impl
    n, lengths = 24, [24, 9, 1, 20]
    ids = torch.randint(1, 97, (4, n))
    mask = lengths_mask(lengths, n)
    hidden = model.encode(ids, mask)
    weights = torch.randn(4, n, 32) * mask[..., None]
    grads = torch.autograd.grad((hidden * weights).sum(), list(model.parameters()), allow_unused=True)
    for row, length in enumerate(lengths):
        alone = model.encode(ids[row:row + 1, :length])
        torch.testing.assert_close(hidden[row, :length], alone[0], **TOL[torch.float32])
    ref = 0.0
    for row, length in enumerate(lengths):
        alone = model.encode(ids[row:row + 1, :length])
        ref = ref + (alone[0] * weights[row, :length]).sum()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is None:  # e.g. token-type rows no input uses
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_flex_and_sdpa_agree_under_bf16_autocast(flex_cpu_backward):
    model = tiny_discriminator().eval()
    ids, mask = torch.randint(1, 97, (3, 32)), lengths_mask([32, 5, 1], 32)
    out = {}
    for impl in ("sdpa", "flex"):
        model.attention_impl = impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[impl] = model.encode(ids, mask)
    assert out["flex"].dtype == out["sdpa"].dtype == torch.bfloat16
    real = mask.bool()
    torch.testing.assert_close(out["flex"][real], out["sdpa"][real], **TOL[torch.bfloat16])
    fp32 = model.encode(ids, mask)  # and both near the fp32 result (sdpa, the reference)
    torch.testing.assert_close(out["sdpa"][real].float(), fp32[real], atol=0.1, rtol=0.05)


def test_default_and_refusals():
    mask = lengths_mask([3, 4], 4)
    bias = padding_mask(mask, "auto", dtype=torch.bfloat16, dropout=True)  # CPU, or dropout on: dense reference
    assert bias.dtype == torch.bfloat16 and bias.shape == (2, 1, 1, 4)
    torch.testing.assert_close(bias, attention_bias(mask).to(torch.bfloat16))
    assert padding_mask(None, "flex", dtype=torch.float32, dropout=True) is None  # no padding: no mask at all
    with pytest.raises(ValueError, match="attention_impl='flex' cannot apply attention dropout"):
        padding_mask(mask, "flex", dtype=torch.float32, dropout=True)
    with pytest.raises(ValueError, match=r"attention_impl must be one of .*got 'dense'"):
        padding_mask(mask, "dense", dtype=torch.float32, dropout=False)
    model = tiny_discriminator(dropout=0.1).train()
    model.attention_impl = "flex"
    with pytest.raises(ValueError, match="attention dropout"):
        model.encode(torch.randint(1, 97, (2, 4)), mask)


def test_autocast_parameters_are_one_cast_with_fp32_gradients():
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    assert autocast_parameters(params, "cpu") is params  # no autocast: the parameters themselves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = autocast_parameters(params, "cpu")
    g = [torch.randn(5, 3, dtype=torch.bfloat16), torch.randn(7, dtype=torch.bfloat16)]
    got = torch.autograd.grad(cast, params, g)
    want = torch.autograd.grad([p.to(torch.bfloat16) for p in params], params, g)  # autocast's per-op casts
    for c, p, a, b in zip(cast, params, got, want):
        assert c.dtype == torch.bfloat16 and a.dtype == torch.float32
        torch.testing.assert_close(c, p.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_layer_under_autocast_has_no_casts_and_one_copy_for_the_qkv_gradient():
    """One layer's forward + backward under bf16 autocast: parameters cast in one multi-tensor op each way, no
    per-op casts (LayerNorm stays bf16), the packed QKV gradient assembled by a single stack and no clone."""
    layer = EncoderLayer(tiny_discriminator().config).train()
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16, requires_grad=True)
    mask = padding_mask(lengths_mask([8, 3], 8), "sdpa", dtype=torch.bfloat16, dropout=True)
    with OpCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, mask)
        y.backward(torch.randn_like(y))
    assert y.dtype == torch.bfloat16
    assert counter.ops["_to_copy"] == 0
    assert counter.ops["_foreach_copy_"] == 2
    assert counter.ops["stack"] == 1 and counter.ops["clone"] == 0 and counter.ops["cat"] == 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_flex_path_compiles_in_one_graph_and_matches_eager():
    model = tiny_discriminator().eval()
    model.attention_impl = "flex"
    ids, mask = torch.randint(1, 97, (2, 16)), lengths_mask([16, 6], 16)
    # aot_eager: the whole trace (dynamo, fullgraph, AOT) without Inductor's CPU flex template, which rejects these
    # shapes; the GPU lowering is the cuda test's. No grad: FlexAttention has no CPU backward.
    with torch.no_grad():
        eager = model.encode(ids, mask)
        compiled = torch.compile(model.encode, fullgraph=True, backend="aot_eager")(ids, mask)
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_matches_naive_masked_softmax_on_cuda(dtype):
    """The compiled FlexAttention kernels (forward and backward) that "auto" picks on a GPU."""
    b, h, n, d = 3, 4, 200, 32
    mask = lengths_mask([200, 130, 1], n).cuda()
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device="cuda", requires_grad=True) for _ in range(3))
    prepared = padding_mask(mask, "auto", dtype=dtype, dropout=False)
    assert not isinstance(prepared, torch.Tensor)  # the block mask, not the dense bias
    out = attend(q, k, v, prepared)
    ref = naive_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_loader_omits_the_mask_of_full_batches(dataset):
    from electra_fast.data import PretrainingData

    data = PretrainingData(dataset)
    every = data.gather(np.arange(len(data)))
    full = every["attention_mask"].all(1).numpy()
    assert full.any() and not full.all()  # packed data: mostly full rows, some short ones
    rows_full, rows_padded = np.nonzero(full)[0][:4], np.nonzero(~full)[0][:1]
    batch = data.gather(rows_full, omit_full_mask=True)
    assert "attention_mask" not in batch
    torch.testing.assert_close(batch["input_ids"], every["input_ids"][rows_full])
    mixed = np.concatenate([rows_full, rows_padded])
    batch = data.gather(mixed, omit_full_mask=True)
    torch.testing.assert_close(batch["attention_mask"], every["attention_mask"][mixed])
    assert "attention_mask" in data.gather(rows_full)  # the default keeps it
