"""The reference's optimizer: `AdamWeightDecayOptimizer` of google-research/electra (`model/optimization.py`).

It is Adam with decoupled weight decay but **no bias correction**:

    m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (sqrt(v) + eps) + wd * p)

so its steps differ from torch's AdamW, whose bias correction makes them 0.15x / 0.31x / 0.80x of the reference's
at steps 10 / 100 / 1000. Together with the reference's
10k-step warm-up this is what the published ELECTRA models were trained with; `electra-fast pretrain
--optimizer electra_adam` picks it. The update is a handful of `torch._foreach_*` calls with no step counter and no
host read, so it is capturable in a CUDA graph as it is, and `lr` may be a 0-dim device tensor updated in place.

Like torch's fused optimizers it reads the attributes `grad_scale` (divide the gradients by it) and `found_inf`
(a device flag: 1 skips the step, leaving weights and state untouched) that `torch.amp.GradScaler` and
`electra_fast.train.step.TrainStep` set, so a non-finite step is skipped without a host sync. The skip zeroes the
gradients with one `torch.where` per tensor (a select, so NaN and inf cannot leak through) and turns the decays
and the LR into multipliers of 1 and 0; torch's fused AdamW does the same check inside its kernel for free.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

from electra_fast.checks import check_number


class AdamWeightDecay(torch.optim.Optimizer):
    """Adam with decoupled weight decay and no bias correction, as ELECTRA's reference optimizer.

    Args:
        params: parameters or parameter groups (e.g. `electra_fast.param_groups(model, 0.01)`; a group's
            `weight_decay` applies to its parameters).
        lr: learning rate, a float or a 0-dim tensor (on the parameters' device, to update it in place under a
            captured CUDA graph).
        betas, eps, weight_decay: as the reference (0.9, 0.999), 1e-6, 0.0 (the group value wins).
    """

    def __init__(self, params: Iterable, lr: Union[float, torch.Tensor] = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        if not isinstance(lr, torch.Tensor):
            check_number(lr, "lr", low=0)
        for i, beta in enumerate(betas):
            check_number(beta, f"betas[{i}]", low=0, high=1, high_open=True)
        check_number(eps, "eps", low=0, low_open=True)
        check_number(weight_decay, "weight_decay", low=0)
        # capturable: the update never reads the device on the host, whatever the settings (CUDAGraphStep checks it).
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, capturable=True))

    _step_supports_amp_scaling = True  # GradScaler then hands over grad_scale / found_inf instead of syncing

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale.to(params[0].device))
            decay1, decay2 = b1, b2
            if found_inf is not None:
                skip = found_inf.to(params[0].device).reshape(()) != 0
                grads = [torch.where(skip, 0.0, g) for g in grads]
                keep = (~skip).to(params[0].dtype)
                decay1, decay2 = 1 - (1 - b1) * keep, 1 - (1 - b2) * keep  # 1 when skipped: m, v stay
                lr = lr * keep
            torch._foreach_mul_(m, decay1)
            torch._foreach_add_(m, grads, alpha=1 - b1)
            torch._foreach_mul_(v, decay2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, denom)
            if wd:
                torch._foreach_add_(update, params, alpha=wd)
            if isinstance(lr, torch.Tensor):
                torch._foreach_mul_(update, lr)
                torch._foreach_sub_(params, update)
            else:
                torch._foreach_add_(params, update, alpha=-lr)
        return loss


__all__ = ["AdamWeightDecay"]
