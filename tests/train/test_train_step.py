"""The trainer's step (`electra_fast.train.step.TrainStep`) on a CPU, against plain loops: LR tensor schedules, skipped
non-finite steps, gradient accumulation, fp16 loss scaling, no host sync; and CUDAGraphStep's argument checks."""
import math

import pytest
import torch

from electra_fast.train.optim import AdamWeightDecay
from electra_fast.pretraining.pretrainer import ElectraPretrainer, param_groups
from electra_fast.train.schedules import warmup_linear_decay
from electra_fast.train.step import METRICS, DynamicLossScale, TrainStep
from electra_fast.train.loop import chunk_seed
from helpers import lr_factor

V, B, L = 60, 4, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(dropout=0.0):
    torch.manual_seed(0)
    model = ElectraPretrainer.from_preset("tiny", vocab_size=V, mask_token_id=4, special_token_ids=range(5),
                                          pad_token_id=0, hidden_dropout_prob=dropout,
                                          attention_probs_dropout_prob=dropout, num_hidden_layers=1)
    model.validate = False
    return model


def make_batch(rows=B):
    ids = torch.randint(5, V, (rows, L))
    mask = torch.ones_like(ids)
    mask[0, L - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_optimizer(model, kind, lr):
    groups = param_groups(model, 0.01)
    if kind == "fused":
        return torch.optim.AdamW(groups, lr=lr, eps=1e-6, fused=True)
    return AdamWeightDecay(groups, lr=lr)


def state_of(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])


def assert_same(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol) if tol else torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fused", "reference"])
def test_device_schedule_matches_a_plain_loop_with_the_same_lrs(kind):
    steps, warmup, peak = 6, 2, 1e-2
    batches = [make_batch() for _ in range(steps)]
    model, ref = make_model(), make_model()
    opt = make_optimizer(model, kind, torch.tensor(peak))
    ref_opt = make_optimizer(ref, kind, peak)
    step = TrainStep(model, opt, max_grad_norm=1.0, lr_schedule=warmup_linear_decay(steps, warmup))
    for s, batch in enumerate(batches):
        step([batch], seeds=[chunk_seed(7, s, 0)])
        # The plain loop: host LR from the trainer's lr_factor, torch's clip.
        for g in ref_opt.param_groups:
            g["lr"] = peak * lr_factor(s, steps, warmup)
        torch.manual_seed(chunk_seed(7, s, 0))
        ref(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert opt.param_groups[0]["lr"].item() == pytest.approx(peak * lr_factor(s, steps, warmup), rel=1e-6)
    assert lr_factor(0, steps, warmup) == 0  # the first step moved nothing but the moments; later ones did
    # atol: 1e-3 of one step (lr 1e-2); the fp32 LR tensor and a Python float LR round apart.
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()],
                rtol=1e-5, atol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), make_model().parameters()))
    assert step.read_metrics()["skipped_steps"] == 0


def test_device_schedule_equals_lr_factor():
    factor = warmup_linear_decay(1000, 100)
    for s in [0, 1, 50, 99, 100, 101, 500, 999, 1000, 1200]:
        assert factor(torch.tensor(s)).item() == lr_factor(s, 1000, 100)
    assert warmup_linear_decay(10, 0)(torch.tensor(3)).item() == lr_factor(3, 10, 0)


def poison_loss(model, on_call, value=float("nan")):
    """Make the model's loss `value` on its `on_call`-th forward from now (0-based), through autograd."""
    forward, calls = model.forward, [0]

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        if calls[0] == on_call:
            out.loss = out.loss * value
        calls[0] += 1
        return out

    model.forward = patched


@pytest.mark.parametrize("kind", ["fused", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_step_is_skipped_without_trace(kind, value):
    model = make_model()
    opt = make_optimizer(model, kind, torch.tensor(1e-2))
    step = TrainStep(model, opt, accum=2, max_grad_norm=1.0)
    batches = [[make_batch(B // 2), make_batch(B // 2)] for _ in range(4)]
    step(batches[0])
    first = step.read_metrics(reset=False)
    before = state_of(model, opt)
    poison_loss(model, on_call=1, value=value)  # the second micro-batch of the next step
    step(batches[1])
    after = state_of(model, opt)
    assert_same(after[0], before[0])
    assert_same(after[1], before[1])  # moments and (fused) step count untouched
    metrics = step.read_metrics(reset=False)
    assert metrics["skipped_steps"] == 1
    assert metrics["loss"] == pytest.approx(first["loss"])  # the window holds the applied step only
    assert math.isfinite(metrics["grad_norm"])
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradients are gone
    step(batches[2])  # the next steps proceed
    assert not any(torch.equal(a, p) for a, p in zip(before[0], model.parameters()) if p.dim() == 2)
    metrics = step.read_metrics()
    assert metrics["skipped_steps"] == 1 and all(math.isfinite(metrics[m]) for m in METRICS)
    assert step.step_count.item() == 3  # the schedule counts the skipped step (the data moved on)


def test_accumulation_equals_one_large_batch():
    """accum=2 of B/2 rows == one update from the mean of the halves' losses, each half seeded as the trainer seeds
    chunks (dropout on): what makes 1 process x 2 micro-batches equal 2 processes x 1 up to summation order."""
    batch = make_batch()
    halves = [{k: v[:B // 2] for k, v in batch.items()}, {k: v[B // 2:] for k, v in batch.items()}]
    seeds = [chunk_seed(3, 0, 0), chunk_seed(3, 0, 1)]
    model, ref = make_model(dropout=0.1), make_model(dropout=0.1)
    opt = make_optimizer(model, "reference", torch.tensor(1e-2))
    ref_opt = make_optimizer(ref, "reference", torch.tensor(1e-2))
    TrainStep(model, opt, accum=2, max_grad_norm=0.5)(halves, seeds=seeds)
    for seed, half in zip(seeds, halves):
        torch.manual_seed(seed)
        (ref(**half).loss / 2).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()],
                rtol=1e-5, atol=1e-6)


def test_metrics_are_means_over_the_window_and_reset():
    model = make_model()
    opt = make_optimizer(model, "fused", torch.tensor(1e-3))
    step = TrainStep(model, opt)
    losses = []
    for s in range(3):
        out = step([make_batch()], seeds=[s])
        losses.append(out.loss.item())
    metrics = step.read_metrics()
    assert metrics["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert metrics["lr"] == pytest.approx(1e-3)
    assert math.isnan(step.read_metrics()["loss"])  # reset: nothing applied since


def test_step_makes_no_host_sync(monkeypatch):
    """Every host read raises inside the step, except in the model's forward, whose ops range-check ids on CPU
    tensors only (skipped on CUDA and under torch.compile): what is checked is the step's own work."""
    model = make_model()
    opt = make_optimizer(model, "reference", torch.tensor(1e-2))
    step = TrainStep(model, opt, accum=2, lr_schedule=warmup_linear_decay(10, 2),
                     loss_scale=DynamicLossScale("cpu", growth_interval=3))
    batches = [make_batch(B // 2), make_batch(B // 2)]
    in_forward, forward = [False], model.forward

    def unguarded_forward(*args, **kwargs):
        in_forward[0] = True
        try:
            return forward(*args, **kwargs)
        finally:
            in_forward[0] = False

    model.forward = unguarded_forward

    def guard():
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
            real = getattr(torch.Tensor, name)

            def guarded(self, *args, _real=real, **kwargs):
                if not in_forward[0]:
                    raise AssertionError("host sync inside the step")
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, guarded)

    guard()
    step(batches, seeds=[1, 2])
    step(batches, seeds=[3, 4])
    with pytest.raises(AssertionError, match="host sync"):  # the guard fires on a read outside the forward
        step.state_dict()
    monkeypatch.undo()
    assert step.read_metrics()["skipped_steps"] == 0 and step.step_count.item() == 2


def test_fp16_loss_scale_halves_on_overflow_and_grows_after_finite_steps():
    model, ref = make_model(), make_model()
    opt = make_optimizer(model, "fused", torch.tensor(1e-2))
    ref_opt = make_optimizer(ref, "fused", torch.tensor(1e-2))
    scale = DynamicLossScale("cpu", init_scale=2.0 ** 10, growth_interval=2)
    step = TrainStep(model, opt, max_grad_norm=1.0, loss_scale=scale)
    batch = make_batch()
    step([batch], seeds=[5])
    # Unscaled and clipped: the same update as the unscaled loop (fp32 here, so the scale is exact in powers of 2).
    torch.manual_seed(5)
    ref(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()],
                rtol=1e-5, atol=1e-6)
    assert scale.scale.item() == 2.0 ** 10
    step([batch], seeds=[6])
    assert scale.scale.item() == 2.0 ** 11  # two finite steps in a row
    before = state_of(model, opt)
    poison_loss(model, on_call=0, value=float("inf"))
    step([batch], seeds=[7])
    assert scale.scale.item() == 2.0 ** 10 and scale.good_steps.item() == 0
    assert_same(state_of(model, opt)[0], before[0])
    metrics = step.read_metrics()
    assert metrics["skipped_steps"] == 1 and metrics["loss_scale"] == 2.0 ** 10


def test_state_dict_restores_the_counters():
    model = make_model()
    step = TrainStep(model, make_optimizer(model, "fused", torch.tensor(1e-3)),
                     loss_scale=DynamicLossScale("cpu", init_scale=8.0))
    step.load_state_dict({"step": 41, "skipped": 2, "loss_scale": 4.0, "good_steps": 7})
    assert step.state_dict() == {"step": 41, "skipped": 2, "loss_scale": 4.0, "good_steps": 7}


def test_reference_optimizer_honours_grad_scale_and_found_inf():
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    a, b = AdamWeightDecay([p], lr=1e-2, weight_decay=0.01), AdamWeightDecay([q], lr=1e-2, weight_decay=0.01)
    g = torch.randn(6, dtype=torch.float64)
    p.grad, q.grad = g * 8, g.clone()
    a.grad_scale, a.found_inf = torch.tensor(8.0, dtype=torch.float64), torch.tensor(0.0)
    a.step()
    b.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
    saved = p.detach().clone(), a.state[p]["exp_avg"].clone()
    p.grad = torch.full_like(g, float("nan"))
    a.found_inf = torch.tensor(1.0)
    a.step()
    assert torch.equal(p.detach(), saved[0]) and torch.equal(a.state[p]["exp_avg"], saved[1])


def test_bad_arguments_are_named():
    model = make_model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="found_inf"):
        TrainStep(model, plain)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be a 0-dim tensor"):
        TrainStep(model, make_optimizer(model, "fused", 1e-3), lr_schedule=warmup_linear_decay(10, 1))
    with pytest.raises(ValueError, match="accum"):
        TrainStep(model, make_optimizer(model, "fused", torch.tensor(1e-3)), accum=0)
    step = TrainStep(model, make_optimizer(model, "fused", torch.tensor(1e-3)), accum=2)
    with pytest.raises(ValueError, match="accum=2 micro-batches, got 1"):
        step([make_batch()])


def test_cuda_graph_step_refuses_a_float_lr_and_says_how_to_pass_a_tensor():
    from electra_fast.train.cuda_graph import CUDAGraphStep

    model = make_model()
    step = TrainStep(model, make_optimizer(model, "reference", 5e-4))
    with pytest.raises(ValueError, match=r"Python number 0\.0005.*lr=torch\.tensor\(5e-4, device=\"cuda\"\)"):
        CUDAGraphStep(step, make_batch())
    step = TrainStep(model, make_optimizer(model, "reference", torch.tensor(5e-4)))
    with pytest.raises(ValueError, match="0-dim CUDA tensor"):
        CUDAGraphStep(step, make_batch())
