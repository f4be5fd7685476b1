"""Capture a whole ELECTRA training step (forward, backward, optimizer step) in one CUDA graph.

Why explicit capture rather than `torch.compile(mode="reduce-overhead")`: the embeddings that the generator and
discriminator share made the cudagraph trees of reduce-overhead fail ("accessing tensor output of CUDAGraphs that
has been overwritten", SPEC 5), and a graph that also holds the backward and the optimizer removes every launch
of the step, which is what the launch-bound small model needs.

Why randomness stays fresh: every random draw of the step (masking, the kernels' Philox seeds, dropout) comes
from torch's default CUDA generator, whose seed/offset a captured graph reads from device memory and advances
on each replay; nothing is frozen into the graph as a Python number.

Constraints: static shapes (batches must match the example's), an optimizer built with `capturable=True`
(AdamW's step counter then lives on the GPU), and the learning rate as a CUDA tensor if a scheduler changes it
(`torch.optim.lr_scheduler` writes into a tensor lr in place).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class CUDAGraphStep:
    """One training step of `model` (an `ElectraPretrainer`) captured in a CUDA graph; call it per batch.

    Example::

        opt = torch.optim.AdamW(param_groups(model), lr=torch.tensor(5e-4, device="cuda"), betas=(0.9, 0.999),
                                eps=1e-6, capturable=True)
        step = CUDAGraphStep(model, opt, example_ids, example_mask, max_grad_norm=1.0, dtype=torch.bfloat16)
        for batch in loader:
            out = step(batch["input_ids"], batch["attention_mask"])  # a PretrainerOutput, overwritten next call
            scheduler.step()

    Args:
        model: module whose `forward(input_ids, attention_mask, token_type_ids)` returns an object with `.loss`.
        optimizer: its optimizer, built with `capturable=True`.
        input_ids, attention_mask, token_type_ids: an example batch fixing shapes and which inputs exist.
        max_grad_norm: clip the global gradient norm (inside the graph, no sync), or None.
        dtype: autocast dtype (e.g. torch.bfloat16) or None for full precision.
        warmup_steps: eager steps on a side stream before capture (lazy state, cuBLAS handles, Triton autotuning).
            Parameters are restored afterwards and optimizer state created by them is zeroed (Adam-family state
            starts at zero), so construction does not train on the example batch.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None, *,
                 max_grad_norm: Optional[float] = None, dtype: Optional[torch.dtype] = None, warmup_steps: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphStep needs a CUDA GPU")
        if not input_ids.is_cuda:
            raise ValueError(f"input_ids must be a CUDA tensor, got device {input_ids.device}")
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("optimizer must be built with capturable=True (e.g. torch.optim.AdamW(..., "
                             "capturable=True)); got capturable=False")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.model, self.optimizer, self.max_grad_norm, self.dtype = model, optimizer, max_grad_norm, dtype
        self.inputs = tuple(None if t is None else t.detach().clone() for t in (input_ids, attention_mask,
                                                                                   token_type_ids))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                       for p in self.params if p in optimizer.state}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, saved in zip(self.params, saved_params):
                p.copy_(saved)
            for p in self.params:
                for k, v in optimizer.state[p].items():
                    if torch.is_tensor(v):
                        before = saved_state.get(id(p), {}).get(k)
                        if before is None:
                            v.zero_()
                        else:
                            v.copy_(before)
        del saved_params, saved_state

        # Gradients set to None: the captured backward allocates them in the graph's pool and every replay
        # overwrites them (nothing accumulates across replays).
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._body()

    def _body(self):
        # Autocast's weight cache would hold casts made during capture; graphs need it off.
        with torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                            cache_enabled=False):
            out = self.model(*self.inputs)
        out.loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return out

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None):
        """Copy the batch into the captured input buffers and replay. Returns the captured output object, whose
        tensors the next call overwrites (clone what you keep)."""
        for name, static, new in zip(("input_ids", "attention_mask", "token_type_ids"), self.inputs,
                                     (input_ids, attention_mask, token_type_ids)):
            if (static is None) != (new is None):
                raise ValueError(f"{name} must be {'None' if static is None else 'given'} as in the captured "
                                 f"example batch, got {'None' if new is None else 'a tensor'}")
            if static is not None:
                if new.shape != static.shape:
                    raise ValueError(f"{name} must have the captured shape {tuple(static.shape)}, "
                                     f"got {tuple(new.shape)}")
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.output


__all__ = ["CUDAGraphStep"]
