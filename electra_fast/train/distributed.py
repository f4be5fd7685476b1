"""Processes of a multi-process run (torchrun's environment): who is who, DDP / FSDP2 wiring, and full state dicts
for checkpoints. One process (no torchrun) is a `Dist()` of world size 1, for which all of this is a no-op."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
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


def init_distributed(device: Optional[str], collective_timeout: Optional[float] = None) -> tuple:
    """`(Dist, torch.device)`: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process.

    `collective_timeout`: the step watchdog's limit (`electra_fast.train.watchdog`). The process group's own timeout
    is a backstop behind it, at least 30 minutes: outside the steps, ranks wait at barriers while rank 0 alone
    tokenizes the data or writes the export, which may take long.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(), dev
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # NCCL: a timed-out collective aborts the communicator and ends the process instead of hanging (what
        # torchrun sets; here also for other launchers).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backstop = timedelta(seconds=max(2 * (collective_timeout or 0), 1800))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=backstop,
                                **_restart_store(rank, world, backstop))
    return Dist(rank, world, local), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def _restart_store(rank: int, world: int, timeout: timedelta) -> dict:
    """`init_process_group`'s store for a group torchrun restarted (`--max-restarts`), else nothing.

    Under torchrun's static rendezvous (`--master-addr/--master-port`) every attempt shares one key-value store, so
    the restarted processes would read the dead ones' addresses (gloo: "connectFullMesh failed ... Connection
    refused"). Each restart gets its own key prefix instead.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0":
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return {"store": dist.PrefixStore(f"electra-fast/restart-{restart}", store), "rank": rank, "world_size": world}


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


def _local_shards(tree, path: tuple, dtensors: list, memo: dict):
    """`tree` with every DTensor replaced by this process's part of it (on the CPU), whose path goes to `dtensors`."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(tree, DTensor):
        if tree.device_mesh.ndim != 1 or tuple(tree.placements) != (Shard(0),):
            raise NotImplementedError(f"sharded checkpoints hold FSDP2's dim-0 shards, got {tree.placements} at "
                                      f"{'/'.join(map(str, path))}")
        dtensors.append(list(path))
        if id(tree) not in memo:  # a shared parameter (the tied embeddings) is saved once
            local = tree.to_local().detach()
            memo[id(tree)] = local.cpu() if local.device.type != "cpu" else local.clone()
        return memo[id(tree)]
    if isinstance(tree, dict):
        return {k: _local_shards(v, path + (k,), dtensors, memo) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_local_shards(v, path + (i,), dtensors, memo) for i, v in enumerate(tree))
    return tree


def save_sharded(model, optimizer, extra: dict, directory: str, step: int, env: Dist, keep: int) -> Optional[str]:
    """Save an FSDP2 run without gathering it: every process writes its own shard of the model and optimizer state
    (`checkpoint.save_shard`, atomic), then rank 0 the manifest `checkpoint-<step>.pt` with `extra` (step, data
    position, RNG, config) and the shards' checksums. Every process calls it (two collectives). -> the manifest, on
    rank 0. A shard that cannot be written (OSError) is an OSError on every process, and no manifest is written."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from electra_fast.io.checkpoint import remove_stale_shards, save_checkpoint, save_shard, shard_path

    dtensors: dict = {"model": [], "optimizer": []}
    memo: dict = {}
    model_state = _local_shards(model.state_dict(), (), dtensors["model"], memo)
    optim_state = _local_shards(get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=False)), (), dtensors["optimizer"], memo)
    error = checksum = size = None
    try:
        checksum, size = save_shard({"model": model_state, "optimizer": optim_state, "dtensors": dtensors}, directory,
                                    step, env.rank, env.world_size)
    except OSError as e:
        error = e
    written = [None] * env.world_size
    dist.all_gather_object(written, (checksum, size, None if error is None else f"{error.strerror or error}"))
    failed = [(rank, why) for rank, (_, _, why) in enumerate(written) if why is not None]
    if failed:
        if error is not None:
            raise error
        with contextlib.suppress(OSError):
            os.remove(shard_path(directory, step, env.rank, env.world_size))
        raise OSError(f"rank {failed[0][0]} could not write its shard ({failed[0][1]})")
    if not env.is_main:
        return None
    path = save_checkpoint({**extra, "sharded": {"world_size": env.world_size, "checksums": [w[0] for w in written],
                                                 "sizes": [w[1] for w in written]}}, directory, step, keep=keep)
    remove_stale_shards(directory, step)
    return path


def load_sharded(model, optimizer, manifest: dict) -> None:
    """Restore this process's shard of a sharded checkpoint (`save_sharded`; the same number of processes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    from electra_fast.io.checkpoint import read_shard

    saved_world, world = manifest["sharded"]["world_size"], dist.get_world_size() if dist.is_initialized() else 1
    if saved_world != world:
        raise InputError(f"checkpoint at step {manifest['step']} is sharded over {saved_world} processes, this run "
                         f"has {world}: resume it with {saved_world} processes (torchrun --nnodes x --nproc-per-node)")
    shard = read_shard(manifest, dist.get_rank())
    current = model.state_dict()

    def place_like(local: torch.Tensor, like) -> torch.Tensor:
        local = local.to(like.device)
        if not isinstance(like, DTensor):
            return local
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())

    model.load_state_dict({name: place_like(shard["model"][name], like) for name, like in current.items()})
    optim_state = shard["optimizer"]
    for path in shard["dtensors"]["optimizer"]:  # ["state", fqn, "exp_avg"]: shaped and placed as the parameter
        holder = optim_state
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = place_like(holder[path[-1]], current[path[1]])
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=False))


def model_weights(checkpoint: dict) -> dict:
    """The whole model state dict of a loaded checkpoint, sharded (`consolidated_model`) or not."""
    return consolidated_model(checkpoint) if "sharded" in checkpoint else checkpoint["model"]


def consolidated_model(manifest: dict) -> dict:
    """The whole model state dict of a sharded checkpoint, from all its shards (each verified) on this process:
    what exporting it needs (one CPU copy of the weights, no optimizer state)."""
    from electra_fast.io.checkpoint import read_shard

    shards, sharded = [], set()
    for rank in range(manifest["sharded"]["world_size"]):
        shard = read_shard(manifest, rank)
        shards.append(shard["model"])
        sharded.update(path[0] for path in shard["dtensors"]["model"])
    return {name: torch.cat([s[name] for s in shards]) if name in sharded else value
            for name, value in shards[0].items()}


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


__all__ = ["Dist", "init_distributed", "apply_fsdp", "load_state_dicts", "save_sharded",
           "load_sharded", "consolidated_model", "model_weights", "grad_sync"]
