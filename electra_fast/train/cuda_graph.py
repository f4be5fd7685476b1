"""Replay a whole training step (`electra_fast.train.step.TrainStep`: forward, backward, clip, skip, LR, optimizer) from
CUDA graphs, so the host only copies the batch in and launches.

Why explicit capture rather than `torch.compile(mode="reduce-overhead")`: the embeddings that the generator and
discriminator share made the cudagraph trees of reduce-overhead fail ("accessing tensor output of CUDAGraphs that
has been overwritten"), and a graph that also holds the backward and the optimizer removes every launch
of the step, which is what the launch-bound small model needs. `TrainStep(compile=True)` compiles the forward
inside the captured step (the two can be measured apart).

Why one graph per micro-step, not all `accum` micro-batches in one graph: a replay reads the RNG's seed and offset
from device memory when it starts, so `torch.manual_seed(chunk_seed)` before each micro-step replay gives every
micro-batch the masks, samples and dropout of the eager step, however the global batch is split. Graph "micro"
(forward + backward, gradients accumulated in place) is replayed `accum - 1` times, then graph "last" (the last
micro-batch + the finish) once; they share one memory pool, as they never run at the same time. The cost over one
graph is `accum - 1` launches per step. Gradients are allocated before capture and zeroed in place by the finish,
so their addresses stay fixed. With accum=1 the step is exactly one graph.

Constraints: static shapes (batches must match the example's), a capturable optimizer (`capturable=True`; the
reference `AdamWeightDecay` always is) and every learning rate a 0-dim CUDA tensor (a Python float would be frozen
into the graph at capture: a schedule would silently change nothing). Single process: DDP/FSDP steps run eagerly.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from electra_fast.checks import check_int
from electra_fast.train.step import TrainStep


def check_graph_lr(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless every param group's LR is a 0-dim CUDA tensor (what a captured optimizer step can follow)."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            raise ValueError(
                f"optimizer.param_groups[{i}]['lr'] is the Python number {lr!r}, which a CUDA graph freezes at capture "
                "(a schedule would silently change nothing): build the optimizer with a tensor learning rate, e.g. "
                "lr=torch.tensor(5e-4, device=\"cuda\"), and update it in place (TrainStep(lr_schedule=...) does)")
        if lr.dim() != 0 or lr.device.type != "cuda":
            raise ValueError(f"optimizer.param_groups[{i}]['lr'] must be a 0-dim CUDA tensor, e.g. "
                             f"lr=torch.tensor(5e-4, device=\"cuda\"); got shape {tuple(lr.shape)} on {lr.device}")


class CUDAGraphStep:
    """A `TrainStep` captured in CUDA graphs; call it like the step, once per global batch.

    Example::

        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=torch.tensor(5e-4, device="cuda"), eps=1e-6,
                                fused=True, capturable=True)
        step = TrainStep(model, opt, accum=2, lr_schedule=warmup_linear_decay(steps, warmup), amp_dtype=torch.bfloat16)
        graph_step = CUDAGraphStep(step, example_micro_batch)
        for s, (mb0, mb1) in enumerate(batches):
            out = graph_step([mb0, mb1], seeds=[chunk_seed(seed, s, 0), chunk_seed(seed, s, 1)])

    Args:
        step: the eager step to capture (its model, optimizer, accumulation, schedule, loss scale).
        example: one micro-batch (`{name: CUDA tensor}`) fixing the input names and shapes.
        warmup_steps: eager steps on a side stream before capture (lazy state, cuBLAS handles, Triton autotuning,
            torch.compile). Weights, optimizer state, LRs and the step's counters are restored afterwards, so
            construction does not train on the example batch.
    """

    def __init__(self, step: TrainStep, example: Mapping[str, torch.Tensor], *, warmup_steps: int = 3):
        check_graph_lr(step.optimizer)
        if not all(group.get("capturable", False) for group in step.optimizer.param_groups):
            raise ValueError("the optimizer must be built with capturable=True (e.g. torch.optim.AdamW(..., "
                             "fused=True, capturable=True)); got capturable=False")
        check_int(warmup_steps, "warmup_steps", low=1)
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphStep needs a CUDA GPU")
        for name, t in example.items():
            if not (isinstance(t, torch.Tensor) and t.is_cuda):
                raise ValueError(f"example[{name!r}] must be a CUDA tensor, got "
                                 f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
        self.step = step
        self.inputs = {k: v.detach().clone() for k, v in example.items()}
        for p in step.params:  # fixed gradient buffers: backward accumulates into them, the finish zeroes them
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        step.keep_grads = True

        saved = self._device_state()
        before = [t.clone() for t in saved]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._micro_steps()
                self._last_step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, b in zip(saved, before):
                t.copy_(b)
            known = {id(t) for t in saved}
            for t in self._device_state():  # optimizer state the warm-up created: Adam-family state starts at 0
                if id(t) not in known:
                    t.zero_()
        del saved, before

        self.micro_graph: Optional[torch.cuda.CUDAGraph] = None
        pool = None
        if step.accum > 1:
            self.micro_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.micro_graph):
                self._micro_steps()
            pool = self.micro_graph.pool()
        self.last_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.last_graph, pool=pool):
            self.output = self._last_step()

    def _micro_steps(self):
        return self.step.micro_step(self.inputs, last=False) if self.step.accum > 1 else None

    def _last_step(self):
        out = self.step.micro_step(self.inputs, last=True)
        self.step.finish()
        return out

    def _device_state(self) -> list:
        s, opt = self.step, self.step.optimizer
        tensors = [p for p in s.params] + [g["lr"] for g in opt.param_groups]
        tensors += [v for p in s.params for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
        tensors += [s.step_count, s.skipped, s._window, s._step_sums]
        if s.loss_scale is not None:
            tensors += [s.loss_scale.scale, s.loss_scale.good_steps]
        return list({id(t): t for t in tensors}.values())  # groups may share one LR tensor

    def _load(self, batch: Mapping[str, torch.Tensor]) -> None:
        if batch.keys() != self.inputs.keys():
            raise ValueError(f"batch must have the captured inputs {sorted(self.inputs)}, got {sorted(batch)}")
        for name, static in self.inputs.items():
            new = batch[name]
            if new.shape != static.shape:
                raise ValueError(f"{name} must have the captured shape {tuple(static.shape)}, got {tuple(new.shape)}")
            static.copy_(new, non_blocking=True)

    def __call__(self, batches: Sequence[Mapping[str, torch.Tensor]], seeds: Optional[Sequence[int]] = None):
        """Copy each micro-batch into the captured buffers and replay; `seeds[i]` seeds torch's RNG before
        micro-batch i. Returns the captured output of the last micro-batch, overwritten by the next call."""
        self.step.check_batches(batches, seeds)
        for i, batch in enumerate(batches):
            self._load(batch)
            if seeds is not None:
                torch.manual_seed(seeds[i])
            (self.last_graph if i == len(batches) - 1 else self.micro_graph).replay()
        return self.output

    def read_metrics(self, reset: bool = True) -> dict:
        """`TrainStep.read_metrics` of the captured step."""
        return self.step.read_metrics(reset)


__all__ = ["CUDAGraphStep", "check_graph_lr"]
