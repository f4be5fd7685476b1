"""Training checkpoints: atomic files that resume a run exactly.

A checkpoint is one `torch.save` file, `checkpoint-<step>.pt`, holding the model, optimizer and scheduler state,
the step, the data position (the number of global batches consumed), every RNG state (torch CPU and CUDA,
Python, NumPy) and the run's configuration. It is written to a temporary name in the same directory, flushed to
disk and renamed over the final name (`os.replace` is atomic on POSIX and Windows), so a kill at any moment leaves
the previous checkpoints intact and never a half-written file under a checkpoint's name. Only plain containers
and tensors are stored, so loading uses `torch.load(weights_only=True)` (no arbitrary code from a file).

A file can still be damaged later (disk, copy, sync tool): torch's zip reader does not check its CRCs, so zeroed
bytes inside a tensor load silently. Each checkpoint therefore carries a SHA-256 of its payload (every tensor's
bytes, dtype and shape, and every other value), verified on loading; a mismatch names the newest intact one.
`newest_intact_checkpoint` (`--resume auto`) passes over damaged files and unfinished writes to the newest that
verifies.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from electra_fast.errors import InputError

FORMAT = "electra-fast-checkpoint/2"  # /1: the same without a checksum
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"checkpoint-{step:08d}.pt")


def list_checkpoints(directory: str) -> List[Tuple[int, str]]:
    """`[(step, path), ...]` of the finished checkpoints in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory: str) -> Optional[str]:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_atomic(obj: dict, path: str) -> None:
    """`torch.save(obj)` to `path` or nothing: a hidden temporary beside it, flushed to disk, then renamed (a failed
    or killed write leaves no file under `path`; the temporary is removed on failure, or by the next save)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def save_checkpoint(state: dict, directory: str, step: int, keep: int = 3) -> str:
    """Write `state` atomically as `checkpoint-<step>.pt`, then delete all but the `keep` newest (0: keep all)."""
    os.makedirs(directory, exist_ok=True)
    path = checkpoint_path(directory, step)
    # One host copy of every device tensor, hashed and saved (torch.save would copy each one again).
    payload = _on_cpu({"format": FORMAT, "step": step, **state}, {})
    _save_atomic({**payload, "checksum": payload_checksum(payload)}, path)
    for name in os.listdir(directory):  # half-written files of killed runs
        if _NAME.match(name.split(".tmp-")[0]) and ".tmp-" in name and not name.endswith(f".tmp-{os.getpid()}"):
            os.remove(os.path.join(directory, name))
    if keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            os.remove(old)
    return path


def _on_cpu(x, memo: dict):
    """`x` with every tensor on the CPU (a tensor met twice stays one tensor), containers rebuilt as they were."""
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            memo[id(x)] = x.detach().cpu()
        return memo[id(x)]
    if isinstance(x, dict):
        return type(x)((k, _on_cpu(v, memo)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        items = [_on_cpu(v, memo) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def payload_checksum(payload) -> str:
    """SHA-256 over a checkpoint's contents: containers in order, tensors by dtype, shape and bytes."""
    h = hashlib.sha256()

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                visit(k)
                visit(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                visit(v)
        else:  # str, int, float, bool, None
            h.update(f"{type(x).__name__}:{x!r};".encode())

    visit(payload)
    return h.hexdigest()


def _read(path: str):
    """`(state, None)` for an intact checkpoint, else `(None, what is wrong)`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, bad pickle, wrong file type: torch's messages do not help here
        return None, "damaged: it cannot be read as a checkpoint"
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, "electra-fast-checkpoint/1"):
        return None, "not an electra-fast training checkpoint"
    if state["format"] == FORMAT and state.pop("checksum", None) != payload_checksum(state):
        return None, "damaged: its contents do not match their checksum"
    if "sharded" in state:  # an FSDP run's manifest: its shards must be there too
        state["sharded"]["directory"] = os.path.dirname(os.path.abspath(path))
        problem = _shards_problem(state)
        if problem is not None:
            return None, problem
    return state, None


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint on the CPU and verify its checksum; a damaged or foreign file is an `InputError` naming the
    newest intact checkpoint before it (checked the same way) to resume from."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist: pass --resume without a path to use the newest in "
                         "the output directory, or start without --resume")
    state, problem = _read(path)
    if problem is None:
        return state
    remedy = "delete it and start again without --resume (no earlier checkpoint is intact)"
    here = os.path.abspath(path)
    name = _NAME.match(os.path.basename(here))
    for step, older in reversed(list_checkpoints(os.path.dirname(here))):
        if (name is None or step < int(name.group(1))) and os.path.abspath(older) != here and _read(older)[1] is None:
            remedy = f"delete it to resume from the previous good one, {older!r}"
            break
    raise InputError(f"checkpoint {path!r} is {problem}: {remedy}")


def newest_intact_checkpoint(directory: str, warn: Callable[[str], None]) -> Optional[dict]:
    """The newest checkpoint in `directory` whose contents match their checksum, loaded (what `--resume auto` takes).

    Every file passed over on the way, a damaged or foreign checkpoint or an unfinished write (the temporary of a save
    that was killed), is told to `warn` in one line. None where `directory` holds no checkpoint (a fresh start); an
    `InputError` where it holds some but none is intact (starting afresh over them is for a person to decide).
    """
    if not os.path.isdir(directory):
        return None
    for name in sorted(os.listdir(directory)):
        if ".tmp-" in name and _NAME.match(name.split(".tmp-")[0]):
            warn(f"skipping {os.path.join(directory, name)!r}: an unfinished write (a save was interrupted; the "
                 "next save removes it)")
    found = list_checkpoints(directory)
    for _, path in reversed(found):
        state, problem = _read(path)
        if problem is None:
            return state
        warn(f"skipping {path!r}: it is {problem}")
    if found:
        raise InputError(f"--resume auto: none of the {len(found)} checkpoint(s) in {directory!r} is intact: delete "
                         "them to start afresh, or pass --resume PATH to a good copy")
    return None


# ----------------------------------------------------------------------------------------------- sharded saves
# An FSDP run saves without gathering: every process writes its part, `checkpoint-<step>.shard-<r>-of-<n>.pt`, and
# then rank 0 writes `checkpoint-<step>.pt` as a manifest: the run's other state as usual, plus "sharded": every
# shard's checksum and size. The manifest comes last, so it only exists once every shard is whole on disk; loading it
# checks that its shards exist at their sizes, and each process verifies its shard's checksum when it reads it.
SHARD_FORMAT = "electra-fast-checkpoint-shard/1"
_SHARD = re.compile(r"^checkpoint-(\d+)\.shard-\d+-of-\d+\.pt(\.tmp-\d+)?$")


def shard_path(directory: str, step: int, rank: int, world_size: int) -> str:
    return os.path.join(directory, f"checkpoint-{step:08d}.shard-{rank:05d}-of-{world_size:05d}.pt")


def save_shard(state: dict, directory: str, step: int, rank: int, world_size: int) -> Tuple[str, int]:
    """Write one process's part of a sharded checkpoint atomically (`_save_atomic`). -> (its checksum, its size in
    bytes), which the manifest records."""
    os.makedirs(directory, exist_ok=True)
    path = shard_path(directory, step, rank, world_size)
    payload = _on_cpu({"format": SHARD_FORMAT, "step": step, "rank": rank, "world_size": world_size, **state}, {})
    checksum = payload_checksum(payload)
    _save_atomic({**payload, "checksum": checksum}, path)
    return checksum, os.path.getsize(path)


def read_shard(manifest: dict, rank: int) -> dict:
    """Shard `rank` of a loaded manifest, its checksum verified; an `InputError` naming it where it does not match."""
    info = manifest["sharded"]
    path = shard_path(info["directory"], manifest["step"], rank, info["world_size"])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    expected = info["checksums"][rank]
    if not isinstance(state, dict) or state.pop("checksum", None) != expected or payload_checksum(state) != expected:
        raise InputError(f"checkpoint shard {path!r} is damaged (missing, unreadable, or its contents do not match the "
                         f"manifest's checksum): delete {checkpoint_path(info['directory'], manifest['step'])!r} "
                         "to resume from the previous checkpoint (--resume auto skips it)")
    return state


def _shards_problem(manifest: dict) -> Optional[str]:
    info = manifest["sharded"]
    for rank, size in enumerate(info["sizes"]):
        path = shard_path(info["directory"], manifest["step"], rank, info["world_size"])
        if not os.path.isfile(path):
            return f"missing its shard {path!r}"
        if os.path.getsize(path) != size:
            return f"damaged: its shard {path!r} holds {os.path.getsize(path)} bytes, not {size}"
    return None


def remove_stale_shards(directory: str, step: int) -> None:
    """Delete the shards that no manifest names (pruned or never finished) but step `step`'s, and unfinished
    writes of shards: what rank 0 does once a sharded checkpoint is complete."""
    steps = {s for s, _ in list_checkpoints(directory)} | {step}
    for name in os.listdir(directory):
        m = _SHARD.match(name)
        if m and (m.group(2) or int(m.group(1)) not in steps):
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass


# -------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Every RNG a training step may touch, as plain tensors/lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        # A run resumed on fewer GPUs restores the ones it has.
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i], i)
