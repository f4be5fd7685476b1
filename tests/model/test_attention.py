"""Attention paths (electra_fast.model.attention) and the encoder layer's launch diet (electra_fast.model.layers),
against independent oracles: a naive masked softmax, the padding invariance of the encoder (a padded row gives the
outputs of the same row run alone, unpadded, without any mask), FlexAttention's own `create_block_mask`, a
per-sequence loop standing in for flash's variable-length kernel on the CPU (its contract: sequences at cu_seqlens;
tests/attention_oracles.py), the kernel's own schema and meta functions, and plain per-tensor casts. The varlen
plan that packs the tokens is an op: tests/ops/test_varlen_plan.py."""
import collections

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

import electra_fast.model.attention as attention
from attention_oracles import FLASH_CALLS, lengths_mask, naive_attention, run_attend
from conftest import gpu_param
from electra_fast.model.attention import (VarlenMask, attention_bias, flash_varlen_supported, padding_block_mask,
                                          padding_mask, varlen_mask)
from electra_fast.model.layers import autocast_parameters
from electra_fast.model import Discriminator, ElectraModelConfig
from electra_fast.model.encoder import EncoderLayer

DEVICES = ["cpu", gpu_param("cuda")]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def use_attention(model, impl):
    """The slim model's attention path: the `attention` of its config's kernel options."""
    model.config = model.config.replace(options=model.config.options.replace(attention=impl))


@pytest.fixture(params=["sdpa", "flex", "varlen", "varlen-flash"])
def impl(request, monkeypatch):
    """Every padded path; "varlen-flash" is "varlen" through its flash branch (`flash_on_cpu`)."""
    if request.param == "varlen-flash":
        request.getfixturevalue("flash_on_cpu")
    if request.param == "flex":
        request.getfixturevalue("flex_cpu_backward")
    return request.param.removesuffix("-flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_matches_naive_masked_softmax_with_gradients(impl, dtype):
    b, n, h, d = 4, 40, 2, 16
    mask = lengths_mask([40, 17, 1, 33], n)  # full, padded, a single real token, padded
    mask[3, 5] = 0  # a hole inside a row: the mask need not be a prefix
    q, k, v = (torch.randn(b, n, h, d, dtype=dtype, requires_grad=True) for _ in range(3))
    calls = FLASH_CALLS.copy()
    prepared = padding_mask(mask, impl, dtype=dtype, dropout=False, head_dim=d)
    out = run_attend(q, k, v, prepared)
    real = mask.bool()  # "varlen" gives padding queries other outputs (only padding keys): no loss reads them
    ref = naive_attention(q, k, v, mask).to(dtype)
    torch.testing.assert_close(out[real], ref[real], **TOL[dtype])
    g = torch.randn_like(out) * real[..., None, None]
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[dtype])
    flash = impl == "varlen" and attention.flash_varlen_supported(mask.device, dtype, d)  # True under flash_on_cpu
    assert FLASH_CALLS - calls == collections.Counter(forward=1, backward=1) if flash else FLASH_CALLS == calls


def test_varlen_mask_packs_and_restores_with_gradients():
    n = 12
    mask = torch.rand(4, n) < 0.6
    prepared = varlen_mask(mask.long(), flash=True)
    assert prepared.bias is None
    for other in (mask.float(), mask.to(torch.uint8)):  # masks of any dtype, as the other paths take them
        assert all(torch.equal(a, b) for a, b in zip(varlen_mask(other, flash=True)[:3], prepared[:3]))
    x = torch.randn(4, n, 3, dtype=torch.float64, requires_grad=True)
    packed = prepared.pack(x)
    want = torch.stack([torch.cat([row[m], row[~m]]) for row, m in zip(x, mask)])
    torch.testing.assert_close(packed, want, rtol=0, atol=0)
    torch.testing.assert_close(prepared.unpack(packed), x, rtol=0, atol=0)
    g = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(packed, x, g)[0], torch.autograd.grad(want, x, g)[0])
    lengths = mask.sum(1).tolist()
    bias = varlen_mask(mask.long(), flash=False, dtype=torch.bfloat16).bias  # SDPA's key bias, packed order
    torch.testing.assert_close(bias, attention_bias(lengths_mask(lengths, n), torch.bfloat16), rtol=0, atol=0)


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


def test_padded_rows_give_the_outputs_of_unpadded_rows(impl):
    """fp32, tight: each padded row's hidden states at its real tokens equal that row run alone, cut to its
    length, with attention_mask=None (the no-mask path); gradients of a loss over real tokens agree likewise."""
    model = tiny_discriminator().eval()
    use_attention(model, impl)
    n, lengths = 24, [24, 9, 1, 20, 0]  # the last row: padding only (no loss reads it)
    ids = torch.randint(1, 97, (5, n))
    mask = lengths_mask(lengths, n)
    hidden = model.encode(ids, mask)
    weights = torch.randn(5, n, 32) * mask[..., None]
    grads = torch.autograd.grad((hidden * weights).sum(), list(model.parameters()), allow_unused=True)
    ref = 0.0
    for row, length in enumerate(lengths[:-1]):
        alone = model.encode(ids[row:row + 1, :length])
        torch.testing.assert_close(hidden[row, :length], alone[0], **TOL[torch.float32])
        ref = ref + (alone[0] * weights[row, :length]).sum()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is None:  # e.g. token-type rows no input uses
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_every_path_under_bf16_autocast_is_near_fp32_sdpa(impl):
    model = tiny_discriminator().eval()
    ids, mask = torch.randint(1, 97, (3, 32)), lengths_mask([32, 5, 1], 32)
    use_attention(model, "sdpa")
    fp32 = model.encode(ids, mask)  # the reference
    use_attention(model, impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.encode(ids, mask)
    assert out.dtype == torch.bfloat16
    real = mask.bool()
    torch.testing.assert_close(out[real].float(), fp32[real], atol=0.1, rtol=0.05)


def test_default_and_refusals(monkeypatch):
    mask = lengths_mask([3, 4], 4)
    bias = padding_mask(mask, "auto", dtype=torch.bfloat16, dropout=True, head_dim=16)  # CPU: dense reference
    assert bias.dtype == torch.bfloat16 and bias.shape == (2, 1, 1, 4)
    torch.testing.assert_close(bias, attention_bias(mask).to(torch.bfloat16))
    assert padding_mask(None, "flex", dtype=torch.float32, dropout=True, head_dim=16) is None  # no mask at all
    with pytest.raises(ValueError, match="attention_impl='flex' cannot apply attention dropout"):
        padding_mask(mask, "flex", dtype=torch.float32, dropout=True, head_dim=16)
    with pytest.raises(ValueError, match=r"attention_impl must be one of .*got 'dense'"):
        padding_mask(mask, "dense", dtype=torch.float32, dropout=False, head_dim=16)
    assert not flash_varlen_supported(torch.device("cpu"), torch.bfloat16, 64)
    seen = []
    monkeypatch.setattr(attention, "flash_varlen_supported", lambda *args: seen.append(args) or True)
    picked = padding_mask(mask, "auto", dtype=torch.bfloat16, dropout=True, head_dim=16)  # where flash runs
    assert isinstance(picked, VarlenMask) and picked.bias is None
    assert seen == [(mask.device, torch.bfloat16, 16)]
    model = tiny_discriminator(dropout=0.1).train()
    use_attention(model, "flex")
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
    mask = padding_mask(lengths_mask([8, 3], 8), "sdpa", dtype=torch.bfloat16, dropout=True, head_dim=16)
    with OpCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, mask)
        y.backward(torch.randn_like(y))
    assert y.dtype == torch.bfloat16
    assert counter.ops["_to_copy"] == 0
    assert counter.ops["_foreach_copy_"] == 2
    assert counter.ops["stack"] == 1 and counter.ops["clone"] == 0 and counter.ops["cat"] == 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_padded_path_compiles_in_one_graph_and_matches_eager(impl):
    """aot_eager: the whole trace (dynamo, fullgraph, AOT autograd) without Inductor's CPU flex template, which
    rejects these shapes; the GPU lowering is the cuda tests'. FlexAttention has no CPU backward: forward only."""
    model = tiny_discriminator().eval()
    use_attention(model, impl)
    ids, mask = torch.randint(1, 97, (2, 16)), lengths_mask([16, 6], 16)
    encode = torch.compile(model.encode, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(impl != "flex"):
        eager, compiled = model.encode(ids, mask), encode(ids, mask)
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])
    if impl != "flex":
        params, g = list(model.parameters()), torch.randn_like(eager) * mask[..., None]
        got = torch.autograd.grad(compiled, params, g, allow_unused=True)
        for a, b in zip(got, torch.autograd.grad(eager, params, g, allow_unused=True)):
            if b is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pretrainer_step_through_the_flash_branch_compiles_and_matches_eager(flash_on_cpu):
    """The whole RTD step (both encoders on one padded batch, each through the plan, the reorders and the flash
    call) traced in one graph, with the same loss and gradients as eager; and those of the dense-bias reference."""
    from electra_fast.pretraining.pretrainer import ElectraPretrainer

    model = ElectraPretrainer.from_preset("tiny", vocab_size=97, mask_token_id=4, special_token_ids=range(5),
                                          pad_token_id=0, validate=False, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0)
    ids = torch.randint(5, 97, (3, 24))
    mask = lengths_mask([24, 10, 17], 24)
    ids = ids * mask
    params = list(model.parameters())

    def run(impl, fn):
        model.options = model.options.replace(attention=impl)
        torch.manual_seed(5)
        loss = fn(ids, mask).loss
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    calls = FLASH_CALLS.copy()
    eager = run("varlen", model)
    assert FLASH_CALLS - calls == collections.Counter(forward=4, backward=4)  # 2 layers x 2 encoders
    for other in (run("varlen", torch.compile(model, fullgraph=True, backend="aot_eager")), run("sdpa", model)):
        torch.testing.assert_close(other[0], eager[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(other[1], eager[1]):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl, dtype", [("flex", torch.float32), ("flex", torch.bfloat16),
                                         ("auto", torch.bfloat16), ("auto", torch.float16)])
@pytest.mark.parametrize("device", DEVICES)
def test_gpu_paths_match_naive_masked_softmax(request, device, impl, dtype):
    """The GPU kernels, forward and backward: compiled FlexAttention and (what "auto" picks under autocast)
    flash's variable-length kernel, here without dropout. On the CPU the same body runs FlexAttention eagerly and
    "auto" through the flash branch with the CPU stand-in for flash's kernel (`flash_on_cpu`)."""
    if device == "cpu":
        request.getfixturevalue("flex_cpu_backward" if impl == "flex" else "flash_on_cpu")
    b, n, h, d = 4, 200 if device == "cuda" else 48, 4, 32
    # "varlen": its first sequence empty, and the padding of row 1 a hole
    mask = lengths_mask([0, n, n * 2 // 3, 1], n).to(device)
    mask[1, 7] = 0
    if impl == "auto" and not attention.flash_varlen_supported(mask.device, dtype, d):
        pytest.skip("flash attention needs sm_80 or later (and a torch built with it)")
    q, k, v = (torch.randn(b, n, h, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    calls = FLASH_CALLS.copy()
    prepared = padding_mask(mask, impl, dtype=dtype, dropout=False, head_dim=d)
    assert not isinstance(prepared, torch.Tensor)  # not the dense bias
    assert impl == "flex" or (isinstance(prepared, VarlenMask) and prepared.bias is None)
    out = run_attend(q, k, v, prepared)
    real = mask.bool()
    ref = naive_attention(q, k, v, mask).to(dtype)
    tol = TOL[torch.bfloat16 if dtype == torch.float16 else dtype]
    torch.testing.assert_close(out[real], ref[real], **tol)
    g = torch.randn_like(out) * real[..., None, None]
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        # at real tokens: a row without any (row 0) has no defined reference
        torch.testing.assert_close(got[real], want[real], **tol)
    if device == "cpu":  # the stand-in ran in flash's place, forward and backward
        want_calls = collections.Counter(forward=1, backward=1) if impl == "auto" else collections.Counter()
        assert FLASH_CALLS - calls == want_calls


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_default_path_matches_sdpa_eager_and_compiled(request, device):
    """The whole padded encoder under bf16 autocast: "auto" (plan, reorder, flash per layer, the fused residual +
    LayerNorm) against the dense-bias reference at the real tokens, values and parameter gradients, and on a GPU
    the same step under torch.compile (Inductor). The CPU runs the eager step with the stand-in for flash's
    kernel."""
    if device == "cpu":
        request.getfixturevalue("flash_on_cpu")
    model = tiny_discriminator().to(device).train()  # dropout 0: comparable draws
    ids = torch.randint(1, 97, (4, 48), device=device)
    mask = lengths_mask([48, 30, 1, 0], 48).to(device)
    real = mask.bool()
    weights = torch.randn(4, 48, 32, device=device) * mask[..., None]
    params = list(model.parameters())

    def run(impl, fn):
        use_attention(model, impl)
        with torch.autocast(device, dtype=torch.bfloat16):
            hidden = fn(ids, mask)
        grads = torch.autograd.grad((hidden.float() * weights).sum(), params, allow_unused=True)
        return hidden[real].float(), grads

    ref, ref_grads = run("sdpa", model.encode)
    legs = [("eager", model.encode)]
    # Inductor's GPU lowering; the trace of the flash branch itself is the CPU's too
    # (test_pretrainer_step_through_the_flash_branch_compiles_and_matches_eager).
    if device == "cuda":
        legs.append(("compiled", torch.compile(model.encode, fullgraph=True)))
    calls = FLASH_CALLS.copy()
    for name, fn in legs:
        out, grads = run("auto", fn)
        torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05, msg=name)
        for got, want in zip(grads, ref_grads):
            if want is not None:  # bf16 noise scales with a gradient's size (sums of hundreds over tokens)
                torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0.05, msg=name)
    if device == "cpu":  # "auto" took the flash branch: 2 layers, forward and backward
        assert FLASH_CALLS - calls == collections.Counter(forward=2, backward=2)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_flash_dropout_is_unbiased(device):
    """Attention dropout inside flash's variable-length kernel: draws differ (and repeat under one seed), their mean
    is the output without dropout (each probability kept with 1 - p and scaled by 1 / (1 - p)), padding keys stay
    unseen. The CPU has no flash kernel: "varlen" there packs the same way and applies SDPA's dropout, under the
    same checks."""
    b, n, h, d, p, draws = 2, 64, 2, 32, 0.3, 2000
    mask = lengths_mask([64, 20], n).to(device)
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.bfloat16, device=device) for _ in range(3))
    prepared = padding_mask(mask, "varlen", dtype=torch.bfloat16, dropout=True, head_dim=d)
    flash = attention.flash_varlen_supported(mask.device, torch.bfloat16, d)
    assert isinstance(prepared, VarlenMask) and (prepared.bias is None) == flash
    v_pad = v.clone()
    v_pad[~mask.bool()] = 1e4  # a padding key seen even once would show in the mean
    outs = torch.stack([run_attend(q, k, v_pad, prepared, dropout_p=p).float() for _ in range(draws)])
    assert not torch.equal(outs[0], outs[1])
    torch.manual_seed(3)
    again = run_attend(q, k, v_pad, prepared, dropout_p=p)
    torch.manual_seed(3)
    assert torch.equal(run_attend(q, k, v_pad, prepared, dropout_p=p), again)  # torch's RNG governs the draws
    real = mask.bool()
    ref = naive_attention(q, k, v, mask).float()
    torch.testing.assert_close(outs.mean(0)[real], ref[real], atol=0.05, rtol=0.05)


