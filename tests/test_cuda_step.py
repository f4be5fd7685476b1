"""The training step on a GPU: bf16 autocast, and a whole step (forward, backward, AdamW) captured in a CUDA graph
that draws fresh masks and samples on every replay. Skipped without CUDA."""
import math

import pytest
import torch

from electra_fast.pretrainer import ElectraPretrainer, param_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
V, B, L = 1000, 8, 64


def make():
    return ElectraPretrainer.from_preset("tiny", vocab_size=V, mask_token_id=4, special_token_ids=range(5),
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).cuda()


def batch():
    ids = torch.randint(5, V, (B, L), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, 40:] = 0
    return ids, mask


def test_bf16_step_is_finite_and_close_to_fp32():
    model = make()
    ids, mask = batch()
    torch.manual_seed(3)
    ref = model(ids, mask)
    torch.manual_seed(3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, mask)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Same seed: same positions; the MLM loss differs only by bf16 rounding of the logits.
    torch.testing.assert_close(out.mlm_loss, ref.mlm_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.disc_loss, ref.disc_loss, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.replaced_frac, ref.replaced_frac, rtol=0.2, atol=0.02)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_graph_step_draws_fresh_samples_and_trains(dtype):
    from electra_fast.cuda_graph import CUDAGraphStep

    model = make()
    opt = torch.optim.AdamW(param_groups(model), lr=torch.tensor(1e-3, device="cuda"), eps=1e-6, capturable=True)
    ids, mask = batch()
    before = [p.detach().clone() for p in model.parameters()]
    step = CUDAGraphStep(model, opt, ids, mask, max_grad_norm=1.0, dtype=dtype)
    # Construction warmed up and captured, but left the weights as they were.
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    seen, losses = set(), []
    for i in range(40):
        out = step(ids, mask)
        seen.add(round(out.replaced_frac.item(), 6))
        losses.append(out.loss.item())
        if i == 0:
            assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step updated
    # The same batch every replay, yet the masks and samples differ: randomness is not frozen into the graph.
    assert len(seen) > 5, seen
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-10:]) < sum(losses[:10]), losses  # and it trains

    with pytest.raises(ValueError, match="input_ids must have the captured shape"):
        step(ids[:, :-1], mask[:, :-1])
    with pytest.raises(ValueError, match="attention_mask must be given"):
        step(ids)


def test_cuda_graph_step_requires_capturable_optimizer():
    from electra_fast.cuda_graph import CUDAGraphStep

    model = make()
    ids, mask = batch()
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ids, mask)
