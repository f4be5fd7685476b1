"""One optimizer step of the trainer, with nothing read on the host: the same code runs eagerly (CPU, tests, DDP)
and captured in CUDA graphs (`electra_fast.train.cuda_graph.CUDAGraphStep`).

A step is `accum` micro-steps (forward + backward, each micro-batch's loss divided by `accum`, optionally times a
dynamic fp16 loss scale) and a finish: global gradient norm, clip, skip decision, LR, optimizer step, counters.
Everything the host would otherwise read lives in device tensors:

* **Skipping** non-finite steps: the finish computes a 0/1 flag (loss or gradient norm not finite) and hands it to
  the optimizer as `found_inf`, the attribute torch's fused optimizers (and `electra_fast.train.optim.AdamWeightDecay`)
  read to leave weights and state untouched, as `torch.amp.GradScaler` uses it; a device counter adds it up.
* **The LR** is a 0-dim device tensor in the optimizer's groups, written in place from a schedule evaluated on the
  device from a device step counter. Chosen over a host `lr.fill_(value)` per step: nothing crosses per step, the
  whole step (LR included) is one replay, and a resumed run only sets the counter (`load_state_dict`).
* **Metrics** of the micro-batches (and the unscaled gradient norm) are summed on the device over the steps that
  were applied; `read_metrics()` reads and resets them in one transfer, every `--log-interval` steps.
* **fp16**: `DynamicLossScale` keeps the scale on the device, halves it on a skipped step and doubles it after
  `growth_interval` applied steps in a row (GradScaler's rule), inside the same finish. The unscale and the clip are
  one multiply of the gradients.

Reproducibility: `__call__` takes one seed per micro-batch and calls `torch.manual_seed` before each, so masking,
sampling and dropout of a micro-batch do not depend on how the global batch was split. In a CUDA graph the
generator's seed and offset are read from device memory at each replay, so seeding before each replay of a
micro-step graph keeps exactly these semantics (the reason CUDAGraphStep captures one graph per micro-step).
"""
from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import Callable, ContextManager, Mapping, Optional, Sequence

import torch
from torch import nn

from electra_fast.checks import check_int, check_number
from electra_fast.pretraining.pretrainer import PretrainerOutput

METRICS = tuple(f.name for f in fields(PretrainerOutput))  # loss first


class DynamicLossScale:
    """fp16 loss scale held on the device: x `backoff` after a non-finite step, x `growth` after `growth_interval`
    finite steps in a row (the defaults are `torch.amp.GradScaler`'s)."""

    def __init__(self, device, init_scale: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 2000):
        check_number(init_scale, "init_scale", low=0, low_open=True)
        check_number(growth, "growth", low=1, low_open=True)
        check_number(backoff, "backoff", low=0, high=1, low_open=True, high_open=True)
        check_int(growth_interval, "growth_interval", low=1)
        self.scale = torch.tensor(float(init_scale), device=device)
        self.good_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval

    def update(self, found_inf: torch.Tensor) -> None:
        """In place, from the step's 0-dim bool flag."""
        good = torch.where(found_inf, 0, self.good_steps + 1)
        grow = good >= self.growth_interval
        self.scale.mul_(torch.where(found_inf, self.backoff, torch.where(grow, self.growth, 1.0)))
        self.good_steps.copy_(torch.where(grow, 0, good))


class TrainStep:
    """One optimizer step over `accum` micro-batches, with no host sync; call it once per global batch.

    Example::

        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=torch.tensor(5e-4, device=dev), eps=1e-6, fused=True)
        step = TrainStep(model, opt, accum=2, max_grad_norm=1.0, lr_schedule=warmup_linear_decay(steps, warmup),
                         amp_dtype=torch.bfloat16)
        for s in range(steps):
            step([mb0, mb1], seeds=[chunk_seed(seed, s, 0), chunk_seed(seed, s, 1)])
            if (s + 1) % log_interval == 0:
                print(step.read_metrics())

    Args:
        model: module called as `forward(**batch)`, returning a `PretrainerOutput` (or anything with its fields).
        optimizer: one that reads `found_inf` (torch's fused AdamW/Adam/SGD,
            `electra_fast.train.optim.AdamWeightDecay`).
        accum: micro-batches per step; each loss is divided by it.
        max_grad_norm: clip the global gradient norm (torch's rule: x min(1, max / (norm + 1e-6))), or None.
        lr_schedule: `factor(step_tensor) -> tensor` written as `lr = base_lr * factor` into every group's LR
            tensor before each optimizer step (groups must then hold 0-dim tensor LRs); None leaves the LR alone.
            `electra_fast.train.schedules.warmup_linear_decay` is the reference's.
        amp_dtype: autocast dtype (torch.bfloat16, torch.float16) or None.
        loss_scale: a `DynamicLossScale` (fp16), or None.
        forward: what to call instead of `model` (a DDP wrapper); `compile=True` wraps it in `torch.compile`.
        grad_sync: `grad_sync(last) -> context manager` around each micro-step (DDP's `no_sync` except on the last).
        metrics: output fields summed for `read_metrics`; must include "loss" (the skip test reads it).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, accum: int = 1,
                 max_grad_norm: Optional[float] = 1.0,
                 lr_schedule: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 amp_dtype: Optional[torch.dtype] = None, loss_scale: Optional[DynamicLossScale] = None,
                 forward: Optional[Callable] = None, compile: bool = False,
                 grad_sync: Optional[Callable[[bool], ContextManager]] = None, metrics: Sequence[str] = METRICS):
        check_int(accum, "accum", low=1)
        if max_grad_norm is not None:
            check_number(max_grad_norm, "max_grad_norm", low=0, low_open=True)
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(f"optimizer must skip a step on its found_inf flag (torch.optim.AdamW(..., fused=True) "
                             f"or electra_fast.train.optim.AdamWeightDecay), got {type(optimizer).__name__} without it")
        if "loss" not in metrics:
            raise ValueError(f"metrics must include 'loss', got {tuple(metrics)}")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self.params:
            raise ValueError("optimizer has no parameters")
        device = self.params[0].device
        self.model, self.optimizer, self.accum, self.max_grad_norm = model, optimizer, accum, max_grad_norm
        self.lr_schedule, self.amp_dtype, self.loss_scale, self.device = lr_schedule, amp_dtype, loss_scale, device
        self.metrics, self.grad_sync = tuple(metrics), grad_sync
        forward = forward if forward is not None else model
        self.forward = torch.compile(forward) if compile else forward
        self.base_lrs = []
        if lr_schedule is not None:
            for i, group in enumerate(optimizer.param_groups):
                lr = group["lr"]
                if not (isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.device == device):
                    raise ValueError(f"with lr_schedule, optimizer.param_groups[{i}]['lr'] must be a 0-dim tensor on "
                                     f"{device} (e.g. lr=torch.tensor(5e-4, device='{device}')), got {lr!r}")
                self.base_lrs.append(float(group.get("initial_lr", lr)))  # one read, at construction
        n = len(self.metrics)
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)  # schedule position (skips count)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps, since the start
        # Per step: the metrics over its micro-batches; per window: metrics, grad norm, applied steps.
        self._step_sums = torch.zeros(n, device=device)
        self._window = torch.zeros(n + 2, device=device)
        self._loss_at, self._one = self.metrics.index("loss"), torch.ones(1, device=device)  # per-step constants
        self._found_inf = torch.zeros((), device=device)  # the optimizer's view of the skip flag (fp32, as fused)
        self.keep_grads = False  # CUDAGraphStep: zero gradients in place (static addresses) instead of freeing them

    # ------------------------------------------------------------------ the two phases (CUDAGraphStep captures them)
    def micro_step(self, batch: Mapping[str, torch.Tensor], last: bool):
        """Forward and backward of one micro-batch (gradients accumulate); returns the model output."""
        sync = self.grad_sync(last) if self.grad_sync is not None else contextlib.nullcontext()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None, cache_enabled=False):
                out = self.forward(**batch)
            loss = out.loss / self.accum
            if self.loss_scale is not None:
                loss = loss * self.loss_scale.scale
            loss.backward()
        self._step_sums += torch.stack([getattr(out, m).detach().float() for m in self.metrics]) / self.accum
        return out

    def finish(self) -> None:
        """Norm, clip, skip flag, LR, optimizer step, counters; then zero the gradients for the next step."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        norm = norm.float()
        if self.loss_scale is not None:
            norm = norm / self.loss_scale.scale
        found = ~(torch.isfinite(norm) & torch.isfinite(self._step_sums[self._loss_at]))
        self._found_inf.copy_(found)
        coef = None
        if self.max_grad_norm is not None:
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        if self.loss_scale is not None:
            coef = 1.0 / self.loss_scale.scale if coef is None else coef / self.loss_scale.scale
        if coef is not None:
            torch._foreach_mul_(grads, coef)  # NaN on a skipped step: the optimizer then reads no gradient
        if self.lr_schedule is not None:
            factor = self.lr_schedule(self.step_count)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"].copy_(factor * base)
        self.optimizer.found_inf, self.optimizer.grad_scale = self._found_inf, None
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale
        if self.loss_scale is not None:
            self.loss_scale.update(found)
        applied = torch.cat([self._step_sums, norm.reshape(1), self._one])
        self._window += torch.where(found, 0.0, applied)  # a select: a NaN step leaves no trace in the sums
        self.skipped += found
        self.step_count += 1
        self._step_sums.zero_()
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)

    def __call__(self, batches: Sequence[Mapping[str, torch.Tensor]], seeds: Optional[Sequence[int]] = None):
        """One optimizer step over `accum` micro-batches; `seeds[i]` seeds torch's RNG before micro-batch i.
        Returns the last micro-batch's output (device tensors; reading them is the caller's sync)."""
        self.check_batches(batches, seeds)
        for i, batch in enumerate(batches):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            out = self.micro_step(batch, last=i == self.accum - 1)
        self.finish()
        return out

    def check_batches(self, batches, seeds) -> None:
        if len(batches) != self.accum:
            raise ValueError(f"batches must hold accum={self.accum} micro-batches, got {len(batches)}")
        if seeds is not None and len(seeds) != self.accum:
            raise ValueError(f"seeds must hold accum={self.accum} seeds, got {len(seeds)}")

    # ------------------------------------------------------------------------------------------- host side
    def read_metrics(self, reset: bool = True) -> dict:
        """Means over the steps applied since the last read (one host sync; all-reduced across processes when
        torch.distributed is initialised): the metrics, `grad_norm`, and `skipped_steps` (total since the start),
        `lr` (the last step's), `loss_scale` with fp16. NaN means where no step of the window was applied."""
        window = self._window.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(window)
        extra = [self.skipped.to(window.dtype).reshape(1)]
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):
            extra.append(lr.to(self.device, window.dtype).reshape(1))
        if self.loss_scale is not None:
            extra.append(self.loss_scale.scale.reshape(1))
        values = torch.cat([window] + extra).tolist()
        n = len(self.metrics)
        applied = values[n + 1]
        record = {m: (values[i] / applied if applied else float("nan")) for i, m in enumerate(self.metrics)}
        record["grad_norm"] = values[n] / applied if applied else float("nan")
        record["skipped_steps"] = int(values[n + 2])
        record["lr"] = values[n + 3] if isinstance(lr, torch.Tensor) else float(lr)
        if self.loss_scale is not None:
            record["loss_scale"] = values[-1]
        if reset:
            self._window.zero_()
        return record

    def state_dict(self) -> dict:
        """The device counters as Python numbers (a sync; for checkpoints)."""
        state = {"step": int(self.step_count), "skipped": int(self.skipped)}
        if self.loss_scale is not None:
            state.update(loss_scale=float(self.loss_scale.scale), good_steps=int(self.loss_scale.good_steps))
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self.step_count.fill_(int(state["step"]))
        self.skipped.fill_(int(state["skipped"]))
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.scale.fill_(float(state["loss_scale"]))
            self.loss_scale.good_steps.fill_(int(state["good_steps"]))


__all__ = ["TrainStep", "DynamicLossScale", "METRICS"]
