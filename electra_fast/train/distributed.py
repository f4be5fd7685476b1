"""Processes of a multi-process run (torchrun's environment): who is who, DDP / FSDP2 wiring, and full state dicts
for checkpoints. One process (no torchrun) is a `Dist()` of world size 1, for which all of this is a no-op."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from electra_fast.errors import InputError

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: Optional[str]) -> tuple:
    """`(Dist, torch.device)`: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(), dev
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def apply_fsdp(model) -> None:
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError:  # torch < 2.6
        raise InputError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard): upgrade torch or "
                         "leave --fsdp out to use DDP") from None
    for encoder in (model.generator, model.discriminator):
        for layer in encoder.layers:
            fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "scores")  # evaluation's entry point gathers the parameters as forward does


def full_state_dicts(model, optimizer, fsdp: bool) -> tuple:
    """Full (unsharded) CPU model and optimizer state dicts; a collective under FSDP (every rank calls it)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state_dicts(model, optimizer, model_state, optim_state, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    # The model by hand: `set_model_state_dict` leaves the second name of a shared parameter (the generator's
    # and discriminator's common embeddings) a plain tensor and then fails to copy it into the DTensor.
    sharded = {}
    for name, current in model.state_dict().items():
        full = model_state[name].to(current.device, current.dtype)
        sharded[name] = (distribute_tensor(full, current.device_mesh, current.placements)
                         if isinstance(current, DTensor) else full)
    model.load_state_dict(sharded)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))


def grad_sync(model, ddp, fsdp: bool) -> Optional[Callable]:
    """`TrainStep`'s `grad_sync(last)`: gradients are reduced across processes once, after the last micro-batch."""
    if ddp is not None:
        return lambda last: contextlib.nullcontext() if last else ddp.no_sync()
    if not fsdp:
        return None

    def sync(last: bool):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return sync


__all__ = ["Dist", "init_distributed", "apply_fsdp", "full_state_dicts", "load_state_dicts", "grad_sync"]
