"""The ops chained as in one RTD step trace with torch.compile(fullgraph=True) and give the eager results."""
import os

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from electra_fast import ops

PAD, CLS, SEP, MASK = 0, 1, 2, 3


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
