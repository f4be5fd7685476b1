"""The ops chained as in one RTD step trace with torch.compile(fullgraph=True) and give the eager results: the public
ops on each backend, and each backend's own entry points (the Triton kernels' in the interpreter or on a GPU, the CUDA
C++ backend's on a GPU: their fake kernels and autograd under dynamo, independently of the backend switch); and the
chain is defined on rows with nothing to mask."""
import os

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from conftest import TRITON_DEVICE as DEVICE, requires_cuda, triton_test
from electra_fast import ops
from electra_fast.csrc import masked_gather as cu_gather, mlm_loss_and_sample as cu_mlm, \
    replace_tokens as cu_replace, rtd_bce_loss as cu_bce
from helpers import cuda_seed, kernel, rand

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)


def rtd_chain(ids, am, emb, gen_w, disc_w):
    masked, pos, w = ops.mask_tokens(ids, am, mask_prob=0.2, mask_token_id=MASK, special_token_ids=(PAD, CLS, SEP, MASK))
    hidden = torch.tanh(emb[masked] @ gen_w)                              # stand-in generator encoder
    slots = ops.masked_gather(hidden, pos)                                # [B, N, H]
    logits = slots.flatten(0, 1) @ emb.T                                  # tied LM head at the slots only
    mlm_loss, sampled, correct = ops.mlm_loss_and_sample(logits, ids.gather(1, pos).flatten(), w.flatten())
    extra = ops.gumbel_sample(logits, temperature=0.7, disallow=ids.gather(1, pos).flatten())
    disc_ids, labels = ops.replace_tokens(ids, pos, w, sampled)
    disc_logits = (emb[disc_ids] @ disc_w).squeeze(-1)                   # stand-in discriminator
    disc_loss = ops.rtd_bce_loss(disc_logits, labels, am)
    return mlm_loss + 50.0 * disc_loss, sampled, extra, correct.sum(), labels


BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_compiles_fullgraph_and_matches_eager(monkeypatch, backend):
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", backend)
    torch._dynamo.reset()
    b, seq_len, v, h = 3, 16, 40, 8
    ids = torch.randint(4, v, (b, seq_len))
    ids[:, 0], ids[:, -1] = CLS, SEP
    am = torch.ones_like(ids)
    am[1, 10:] = 0
    emb = torch.randn(v, h, requires_grad=True)
    gen_w, disc_w = torch.randn(h, h, requires_grad=True), torch.randn(h, 1, requires_grad=True)
    params = (emb, gen_w, disc_w)

    compiled = torch.compile(rtd_chain, fullgraph=True)
    results = []
    # config.patch, not monkeypatch: pytest 9.2 undoes a patch of inductor's config with delattr, removing the option.
    with torch._inductor.config.patch(fallback_random=True):  # the compiled RNG draws eager's stream
        for fn in (rtd_chain, compiled):
            torch.manual_seed(1234)
            out = fn(ids, am, *params)
            grads = torch.autograd.grad(out[0], params)
            results.append((out, grads))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(comp[1:], eager[1:]):
        assert torch.equal(x, y)
    for x, y in zip(comp_grads, eager_grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@triton_test
@pytest.mark.usefixtures("small_tiles")
def test_triton_kernel_entries_compile_fullgraph_and_match_eager():
    """A generator-loss -> replace -> discriminator-head chain through the Triton entries, compiled whole."""
    K = {name: kernel(name) for name in ("masked_gather", "mlm_loss_and_sample", "replace_tokens", "rtd_head_loss",
                                         "rtd_bce_loss")}
    MLS = K["mlm_loss_and_sample"]
    torch._dynamo.reset()
    b, seq_len, h, n, v = 2, 8, 6, 3, 13
    ids = torch.randint(0, v, (b, seq_len), device=DEVICE)
    pos = torch.stack([torch.randperm(seq_len, device=DEVICE)[:n] for _ in range(b)])
    w = torch.ones(b, n, device=DEVICE)
    hidden, emb = rand(b, seq_len, h).requires_grad_(), rand(v, h).requires_grad_()
    head_w, head_b = rand(1, h).requires_grad_(), rand(1).requires_grad_()

    def chain(hidden, emb, head_w, head_b, seed):
        slots = K["masked_gather"].masked_gather(hidden, pos)
        logits = slots.flatten(0, 1) @ emb.T
        mlm, sampled, correct = MLS.mlm_loss_and_sample(logits, ids.gather(1, pos).flatten(), w.flatten(),
                                                        seed, 1.0, False, v)
        disc_ids, labels = K["replace_tokens"].replace_tokens(ids, pos, w, sampled.view(b, n))
        disc_hidden = torch.tanh(emb[disc_ids])
        disc, acc = K["rtd_head_loss"].rtd_head_loss(disc_hidden, head_w, head_b, labels, torch.ones_like(ids))
        bce = K["rtd_bce_loss"].rtd_bce_loss(disc_hidden.sum(-1), labels, torch.ones_like(ids))
        return mlm + 50.0 * disc + bce, sampled, acc, correct

    params = (hidden, emb, head_w, head_b)
    seed = torch.tensor([11], device=DEVICE)
    results = []
    for fn in (chain, torch.compile(chain, fullgraph=True)):
        out = fn(*params, seed)
        results.append((out, torch.autograd.grad(out[0], params)))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(comp[1:], eager[1:]):
        assert torch.equal(x, y)
    for x, y in zip(comp_grads, eager_grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def _pipeline(hidden, positions, weights, targets, w_out, input_ids, disc_logits):
    # The backend's own entry points, so this checks electra_fast.csrc's ops (fake kernels, autograd) under
    # dynamo independently of the backend switch.
    gathered = cu_gather.masked_gather(hidden, positions)
    logits = gathered.flatten(0, 1) @ w_out
    loss, sampled, _ = cu_mlm.mlm_loss_and_sample(logits, targets, weights.flatten(), cuda_seed(), 1.0, False)
    _, is_replaced = cu_replace.replace_tokens(input_ids, positions, weights, sampled)
    return loss + cu_bce.rtd_bce_loss(disc_logits, is_replaced, torch.ones_like(disc_logits)), sampled


@requires_cuda
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_kernel_entries_compile_fullgraph_and_match_eager(ext, compiler):
    b, seq, h, v = 4, 64, 32, 500
    input_ids = torch.randint(5, v, (b, seq), device="cuda")
    _, positions, weights = ops.mask_tokens(input_ids, mask_token_id=3, special_token_ids=(0,))
    targets = input_ids.gather(1, positions).flatten()
    params = [torch.randn(b, seq, h, device="cuda"), torch.randn(h, v, device="cuda") * 0.1,
              torch.randn(b, seq, device="cuda")]
    results = []
    for fn in (_pipeline, torch.compile(_pipeline, fullgraph=True, backend=compiler)):
        leaves = [p.clone().requires_grad_(True) for p in params]
        torch.manual_seed(11)  # the same seed draws in both (inductor falls back to torch's RNG, below)
        with torch._inductor.config.patch(fallback_random=True):
            loss, sampled = fn(leaves[0], positions, weights, targets, leaves[1], input_ids, leaves[2])
        loss.backward()
        results.append((loss, sampled, [p.grad for p in leaves]))
    (l1, s1, g1), (l2, s2, g2) = results
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_chain_is_defined_on_rows_with_nothing_to_mask():
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [PAD, PAD, PAD, PAD]])
    am = (ids != PAD).long()
    masked, pos, w = ops.mask_tokens(ids, am, mask_prob=0.5, mask_token_id=MASK, special_token_ids=SPECIAL)
    assert w.sum() == 0 and torch.equal(masked, ids) and pos.eq(0).all()
    logits = torch.randn(pos.numel(), 7, requires_grad=True)
    loss, sampled, _ = ops.mlm_loss_and_sample(logits, ids.gather(1, pos).flatten(), w.flatten())
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()
    disc, labels = ops.replace_tokens(ids, pos, w, sampled)
    assert torch.equal(disc, ids) and not labels.any()
    assert ops.rtd_bce_loss(torch.randn(2, 4), labels, am).isfinite()
