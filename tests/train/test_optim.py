"""The reference optimizer (`electra_fast.train.optim.AdamWeightDecay`) against the update rule of google-research/electra
`model/optimization.py::AdamWeightDecayOptimizer`, transcribed in NumPy float64 below."""
import numpy as np
import pytest
import torch

from electra_fast import param_groups
from electra_fast.train.optim import AdamWeightDecay


def reference_steps(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
    """The reference's apply_gradients, step by step (no bias correction, decay added to the update)."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * np.square(g)
        update = m / (np.sqrt(v) + eps) + wd * p
        p = p - lr * update
    return p


@pytest.mark.parametrize("lr_tensor", [False, True])
def test_matches_reference_update(lr_tensor):
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    grads_w = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    grads_b = [torch.randn(3, dtype=torch.float64) for _ in range(6)]
    want_w = reference_steps(w.detach().numpy().copy(), [g.numpy() for g in grads_w], lr=0.01, wd=0.01)
    want_b = reference_steps(b.detach().numpy().copy(), [g.numpy() for g in grads_b], lr=0.01, wd=0.0)
    lr = torch.tensor(0.01, dtype=torch.float64) if lr_tensor else 0.01
    opt = AdamWeightDecay([{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}], lr=lr)
    for gw, gb in zip(grads_w, grads_b):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    np.testing.assert_allclose(w.detach().numpy(), want_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.detach().numpy(), want_b, rtol=1e-12, atol=1e-14)


def test_first_step_differs_from_torch_adamw_by_the_bias_correction():
    """Without bias correction the first step is (1 - b1) / sqrt(1 - b2) = 3.16x AdamW's (whose m and v are
    divided by 1 - b1 and 1 - b2)."""
    p1, p2 = (torch.nn.Parameter(torch.zeros(100)) for _ in range(2))
    g = torch.randn(100)
    p1.grad, p2.grad = g.clone(), g.clone()
    AdamWeightDecay([p1], lr=1e-3).step()
    torch.optim.AdamW([p2], lr=1e-3, eps=1e-6, weight_decay=0.0).step()
    ratio = (p1.detach() / p2.detach()).median().item()
    assert ratio == pytest.approx((1 - 0.9) / (1 - 0.999) ** 0.5, rel=1e-3)


def test_lr_tensor_updated_in_place_takes_effect():
    p = torch.nn.Parameter(torch.ones(4))
    lr = torch.tensor(0.0)
    opt = AdamWeightDecay([p], lr=lr)
    p.grad = torch.ones(4)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))  # lr 0: nothing moves
    lr.fill_(0.5)
    opt.step()
    assert (p.detach() < 1).all()


def test_param_groups_and_state_dict_roundtrip():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = AdamWeightDecay(param_groups(model, 0.01), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    again = AdamWeightDecay(param_groups(model, 0.01), lr=1e-3)
    again.load_state_dict(opt.state_dict())
    for p in model.parameters():
        torch.testing.assert_close(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.parametrize("kwargs, name", [(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), "betas"),
                                          (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay")])
def test_bad_arguments_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdamWeightDecay([torch.nn.Parameter(torch.zeros(1))], **kwargs)
