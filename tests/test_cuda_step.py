"""The training step on a GPU: bf16 autocast, and a whole step (`TrainStep`: forward, backward, clip, skip, AdamW)
captured in CUDA graphs that draw fresh masks and samples on every replay, follow the seeds of the eager step and
skip non-finite steps. Skipped without CUDA."""
import math

import pytest
import torch

from electra_fast.pretrainer import ElectraPretrainer, param_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
V, B, L = 1000, 8, 64


def make():
    return ElectraPretrainer.from_preset("tiny", vocab_size=V, mask_token_id=4, special_token_ids=range(5),
                                         pad_token_id=0, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0).cuda()


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


def graph_step(model, accum=1, dtype=None, **kwargs):
    from electra_fast.cuda_graph import CUDAGraphStep
    from electra_fast.step import TrainStep

    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=torch.tensor(1e-3, device="cuda"), eps=1e-6, fused=True,
                            capturable=True)
    step = TrainStep(model, opt, accum=accum, max_grad_norm=1.0, amp_dtype=dtype, **kwargs)
    ids, mask = batch()
    return step, CUDAGraphStep(step, {"input_ids": ids, "attention_mask": mask})


def test_cuda_graph_step_with_dropout_takes_flash_varlen_and_trains():
    """ELECTRA's dropouts (0.1) on a padded batch under bf16: the captured step runs flash's variable-length
    attention with its dropout (electra_fast.attention, "varlen"), stays finite and trains."""
    from electra_fast.attention import VarlenMask, flash_varlen_supported, padding_mask

    if not flash_varlen_supported(torch.device("cuda"), torch.bfloat16, 32):
        pytest.skip("flash attention needs sm_80 or later (and a torch built with it)")
    model = ElectraPretrainer.from_preset("tiny", vocab_size=V, mask_token_id=4, special_token_ids=range(5),
                                          pad_token_id=0).cuda()
    ids, mask = batch()
    assert isinstance(padding_mask(mask, "auto", dtype=torch.bfloat16, dropout=True, head_dim=32), VarlenMask)
    _, step = graph_step(model, dtype=torch.bfloat16)
    losses = [step([{"input_ids": ids, "attention_mask": mask}]).loss.item() for _ in range(40)]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-10:]) < sum(losses[:10]), losses
    assert step.read_metrics()["skipped_steps"] == 0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_graph_step_draws_fresh_samples_and_trains(dtype):
    model = make()
    before = [p.detach().clone() for p in model.parameters()]
    _, step = graph_step(model, dtype=dtype)
    # Construction warmed up and captured, but left the weights as they were.
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    ids, mask = batch()
    seen, losses = set(), []
    for i in range(40):
        out = step([{"input_ids": ids, "attention_mask": mask}])
        seen.add(round(out.replaced_frac.item(), 6))
        losses.append(out.loss.item())
        if i == 0:
            assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step updated
    # The same batch every replay, yet the masks and samples differ: randomness is not frozen into the graph.
    assert len(seen) > 5, seen
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-10:]) < sum(losses[:10]), losses  # and it trains
    assert step.read_metrics()["skipped_steps"] == 0

    with pytest.raises(ValueError, match="input_ids must have the captured shape"):
        step([{"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}])
    with pytest.raises(ValueError, match="captured inputs"):
        step([{"input_ids": ids}])


def test_cuda_graph_accumulation_replays_equal_the_eager_step():
    """Seeded micro-step replays draw what the eager step draws: same weights after 3 steps of accum=2."""
    from electra_fast.step import TrainStep, warmup_linear_decay

    model, ref = make(), make()
    ref.load_state_dict(model.state_dict())
    _, step = graph_step(model, accum=2, lr_schedule=warmup_linear_decay(10, 2))
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), lr=torch.tensor(1e-3, device="cuda"), eps=1e-6, fused=True)
    eager = TrainStep(ref, ref_opt, accum=2, max_grad_norm=1.0, lr_schedule=warmup_linear_decay(10, 2))
    for s in range(3):
        mbs = [dict(zip(("input_ids", "attention_mask"), batch())) for _ in range(2)]
        step(mbs, seeds=[10 * s, 10 * s + 1])
        eager(mbs, seeds=[10 * s, 10 * s + 1])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_cuda_graph_skips_a_non_finite_step():
    model = make()
    step, graph = graph_step(model)
    ids, mask = batch()
    graph([{"input_ids": ids, "attention_mask": mask}])
    before = [p.detach().clone() for p in model.parameters()]
    # A NaN weight makes the loss and gradients NaN: the captured step must leave every weight as it was.
    with torch.no_grad():
        model.discriminator.embeddings.word_embeddings.weight[7].fill_(float("nan"))
        before[[id(p) for p in model.parameters()].index(id(model.discriminator.embeddings.word_embeddings.weight))
               ][7].fill_(float("nan"))
    ids[:, 3] = 7
    graph([{"input_ids": ids, "attention_mask": mask}])
    assert all(torch.equal(a.nan_to_num(), p.nan_to_num()) for a, p in zip(before, model.parameters()))
    assert graph.read_metrics()["skipped_steps"] == 1


def test_cuda_graph_step_requires_capturable_optimizer():
    from electra_fast.cuda_graph import CUDAGraphStep
    from electra_fast.step import TrainStep

    model = make()
    ids, mask = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True)
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphStep(TrainStep(model, opt), {"input_ids": ids, "attention_mask": mask})
