"""The training step on a GPU: bf16 autocast, and a whole step (`TrainStep`: forward, backward, clip, skip, AdamW)
captured in CUDA graphs that draw fresh masks and samples on every replay, follow the seeds of the eager step and
skip non-finite steps. Each test runs its body on the CPU too, with the step eager where the GPU captures it (CUDA
graphs and flash attention exist only there), so the test's own logic is proven before a GPU runs it."""
import math

import pytest
import torch

from conftest import gpu_param, requires_cuda
from electra_fast.pretraining.pretrainer import ElectraPretrainer, param_groups

V, B = 1000, 8
SEQ_LEN = {"cuda": 64, "cpu": 32}  # bf16 matmuls are slow on a CPU
DEVICES = ["cpu", gpu_param("cuda")]


def make(device, **dropouts):
    dropouts = dropouts or dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ElectraPretrainer.from_preset("tiny", vocab_size=V, mask_token_id=4, special_token_ids=range(5),
                                         pad_token_id=0, **dropouts).to(device)


def batch(device, generator=None):
    """Ids drawn from 20 tokens (5..24), so what a step learns on one batch holds on another; row 0 padded."""
    seq_len = SEQ_LEN[torch.device(device).type]
    ids = torch.randint(5, 25, (B, seq_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[0, seq_len * 5 // 8:] = 0
    return ids, mask


def held_out(model, device):
    """`(mlm_loss, disc_loss)` on a batch no step trains on, in eval mode, with fixed masks and samples."""
    ids, mask = batch(device, torch.Generator().manual_seed(1234))
    model.eval()
    with torch.no_grad():
        torch.manual_seed(99)
        out = model(ids, mask)
    model.train()
    return out.mlm_loss.item(), out.disc_loss.item()


def assert_trains(before, after):
    # From log(V) = 6.9 the generator learns that only 20 ids occur (40 steps take it down by 1.3-1.6), and the
    # discriminator that a sample outside them is a replacement (0.69 -> 0.1): both show on the held-out batch.
    assert after[0] < before[0] - 0.7 and after[1] < 0.4 * before[1], (before, after)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_is_finite_and_close_to_fp32(device):
    model = make(device)
    ids, mask = batch(device)
    torch.manual_seed(3)
    ref = model(ids, mask)
    torch.manual_seed(3)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(ids, mask)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Same seed: same positions; the MLM loss differs only by bf16 rounding of the logits.
    torch.testing.assert_close(out.mlm_loss, ref.mlm_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.disc_loss, ref.disc_loss, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.replaced_frac, ref.replaced_frac, rtol=0.2, atol=0.02)


def graph_step(model, device, accum=1, dtype=None, **kwargs):
    """`(eager step, what the test calls)`: on a GPU the step captured in CUDA graphs, on the CPU the eager step
    itself (everything the capture takes, without the capture)."""
    from electra_fast.train.step import TrainStep

    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=torch.tensor(1e-3, device=device), eps=1e-6, fused=True,
                            capturable=True)
    step = TrainStep(model, opt, accum=accum, max_grad_norm=1.0, amp_dtype=dtype, **kwargs)
    if device != "cuda":
        return step, step
    from electra_fast.train.cuda_graph import CUDAGraphStep

    ids, mask = batch(device)
    return step, CUDAGraphStep(step, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_step_with_dropout_takes_flash_varlen_and_trains(device):
    """ELECTRA's dropouts (0.1) on a padded batch under bf16: on a GPU the captured step runs flash's
    variable-length attention with its dropout (electra_fast.model.attention, "varlen"), stays finite and trains; the CPU
    takes the same plan and packing ("varlen" without the flash kernel, which only CUDA has), eagerly."""
    from electra_fast.model.attention import VarlenMask, flash_varlen_supported, padding_mask

    model = ElectraPretrainer.from_preset("tiny", vocab_size=V, mask_token_id=4, special_token_ids=range(5),
                                          pad_token_id=0).to(device)
    ids, mask = batch(device)
    if device == "cuda":
        if not flash_varlen_supported(torch.device("cuda"), torch.bfloat16, 32):
            pytest.skip("flash attention needs sm_80 or later (and a torch built with it)")
        assert isinstance(padding_mask(mask, "auto", dtype=torch.bfloat16, dropout=True, head_dim=32), VarlenMask)
    else:
        model.options = model.options.replace(attention="varlen")
    _, step = graph_step(model, device, dtype=torch.bfloat16)
    before = held_out(model, device)
    losses = []
    for _ in range(40):
        ids, mask = batch(device)
        losses.append(step([{"input_ids": ids, "attention_mask": mask}]).loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert_trains(before, held_out(model, device))
    assert step.read_metrics()["skipped_steps"] == 0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_step_draws_fresh_samples_and_trains(device, dtype):
    model = make(device)
    before = [p.detach().clone() for p in model.parameters()]
    eager, step = graph_step(model, device, dtype=dtype)
    # Construction warmed up and captured, but left the weights as they were.
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    ids, mask = batch(device)
    lrs = {id(g["lr"]): g["lr"] for g in eager.optimizer.param_groups}.values()
    for lr in lrs:
        lr.fill_(0.0)  # the weights stay: the losses of one batch then differ only by the masks and samples drawn
    seen = {round(step([{"input_ids": ids, "attention_mask": mask}]).mlm_loss.item(), 6) for _ in range(8)}
    # The same batch and weights every replay, yet the losses differ: randomness is not frozen into the graph.
    assert len(seen) > 5, seen
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for lr in lrs:
        lr.fill_(1e-3)
    start, losses = held_out(model, device), []
    for i in range(40):
        ids, mask = batch(device)
        losses.append(step([{"input_ids": ids, "attention_mask": mask}]).loss.item())
        if i == 0:
            assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step updated
    assert all(math.isfinite(x) for x in losses), losses
    assert_trains(start, held_out(model, device))
    assert step.read_metrics()["skipped_steps"] == 0

    if device == "cuda":  # what only the captured step checks: the inputs it was captured with
        with pytest.raises(ValueError, match="input_ids must have the captured shape"):
            step([{"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}])
        with pytest.raises(ValueError, match="captured inputs"):
            step([{"input_ids": ids}])


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_accumulation_replays_equal_the_eager_step(device):
    """Seeded micro-step replays draw what the eager step draws: same weights after 3 steps of accum=2 (on the
    CPU: the capturable optimizer's step against the plain fused one, both eager)."""
    from electra_fast.train.schedules import warmup_linear_decay
    from electra_fast.train.step import TrainStep

    model, ref = make(device), make(device)
    ref.load_state_dict(model.state_dict())
    init = [p.detach().clone() for p in model.parameters()]
    _, step = graph_step(model, device, accum=2, lr_schedule=warmup_linear_decay(10, 2))
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), lr=torch.tensor(1e-3, device=device), eps=1e-6, fused=True)
    eager = TrainStep(ref, ref_opt, accum=2, max_grad_norm=1.0, lr_schedule=warmup_linear_decay(10, 2))
    for s in range(3):
        mbs = [dict(zip(("input_ids", "attention_mask"), batch(device))) for _ in range(2)]
        step(mbs, seeds=[10 * s, 10 * s + 1])
        eager(mbs, seeds=[10 * s, 10 * s + 1])
    assert not all(torch.equal(a, p) for a, p in zip(init, model.parameters()))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_skips_a_non_finite_step(device):
    model = make(device)
    step, graph = graph_step(model, device)
    ids, mask = batch(device)
    graph([{"input_ids": ids, "attention_mask": mask}])
    # A NaN weight makes the loss and gradients NaN: the captured step must leave every weight as it was.
    with torch.no_grad():
        model.discriminator.embeddings.word.weight[7].fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    ids[:, 3] = 7
    out = graph([{"input_ids": ids, "attention_mask": mask}])
    assert not math.isfinite(out.loss.item())
    assert all(torch.equal(a.nan_to_num(), p.nan_to_num()) for a, p in zip(before, model.parameters()))
    assert graph.read_metrics()["skipped_steps"] == 1


@requires_cuda
def test_cuda_graph_step_requires_capturable_optimizer():
    from electra_fast.train.cuda_graph import CUDAGraphStep
    from electra_fast.train.step import TrainStep

    model = make("cuda")
    ids, mask = batch("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True)
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphStep(TrainStep(model, opt), {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_whole_word_step_draws_fresh_whole_words(device, monkeypatch):
    """Whole-word masking inside the captured step: the vocabulary lookup and the masking op are recorded into the
    graph, so every replay draws new words, and each drawn word is whole. The positions and weights of each replay
    are copied into static buffers by a wrapper around the op (the copy is captured with it)."""
    import electra_fast.pretraining.rtd_step as rtd_step

    table = torch.zeros(V, dtype=torch.bool)
    table[:5] = True  # special tokens are words of their own
    table[5:25:3] = True  # of the batch's ids 5..24, every third begins a word; the others continue one
    model = make(device)
    model.masking = "whole_word"
    model.set_vocab_word_starts(table)
    seq_len = SEQ_LEN[torch.device(device).type]
    n = max(1, int(0.155 * seq_len))
    buffers = {"positions": torch.full((B, n), -1, device=device), "weights": torch.full((B, n), -1.0, device=device)}
    real_mask = rtd_step.mask_tokens

    def recording(*args, **kwargs):
        assert "word_starts" in kwargs  # the step asked for whole words
        masked, positions, weights = real_mask(*args, **kwargs)
        buffers["positions"].copy_(positions)
        buffers["weights"].copy_(weights)
        return masked, positions, weights

    monkeypatch.setattr(rtd_step, "mask_tokens", recording)
    eager, step = graph_step(model, device)
    for g in eager.optimizer.param_groups:
        g["lr"].fill_(0.0)
    ids, mask = batch(device)
    starts = table.to(device)[ids]
    starts[:, 0] = True
    word = starts.long().cumsum(1) - 1  # word id of each token, as the op numbers words
    drawn = set()
    for _ in range(6):
        step([{"input_ids": ids, "attention_mask": mask}])
        positions, weights = buffers["positions"].cpu(), buffers["weights"].cpu()
        assert set(weights.unique().tolist()) <= {0.0, 1.0}
        chosen = torch.zeros(B, seq_len, dtype=torch.bool)
        for b in range(B):
            real = positions[b][weights[b] == 1]
            assert len(real) <= round(float(mask[b].sum()) * 0.15) and torch.all(real[1:] > real[:-1])
            chosen[b, real] = True
        # A word is drawn whole or not at all, and only of real tokens.
        w, c, m = word.cpu(), chosen, mask.cpu().bool()
        for b in range(B):
            for k in w[b].unique():
                members = w[b] == k
                assert c[b][members].all() or not c[b][members].any(), (b, k)
                assert not c[b][members].any() or m[b][members].all(), (b, k)
        assert chosen.sum() > 0
        drawn.add(tuple(chosen.flatten().tolist()))
    assert len(drawn) > 3  # randomness is not frozen into the graph
