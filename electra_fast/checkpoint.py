"""Training checkpoints: atomic files that resume a run exactly.

A checkpoint is one `torch.save` file, `checkpoint-<step>.pt`, holding the model, optimizer and scheduler state,
the step, the data position (the number of global batches consumed), every RNG state (torch CPU and CUDA,
Python, NumPy) and the run's configuration. It is written to a temporary name in the same directory, flushed to
disk and renamed over the final name (`os.replace` is atomic on POSIX and Windows), so a kill at any moment leaves
the previous checkpoints intact and never a half-written file under a checkpoint's name. Only plain containers
and tensors are stored, so loading uses `torch.load(weights_only=True)` (no arbitrary code from a file).
"""
from __future__ import annotations

import os
import random
import re
from typing import List, Optional, Tuple

import numpy as np
import torch

from electra_fast.errors import InputError

FORMAT = "electra-fast-checkpoint/1"
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


def save_checkpoint(state: dict, directory: str, step: int, keep: int = 3) -> str:
    """Write `state` atomically as `checkpoint-<step>.pt`, then delete all but the `keep` newest (0: keep all)."""
    os.makedirs(directory, exist_ok=True)
    path = checkpoint_path(directory, step)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    for name in os.listdir(directory):  # half-written files of killed runs
        if _NAME.match(name.split(".tmp-")[0]) and ".tmp-" in name and not name.endswith(f".tmp-{os.getpid()}"):
            os.remove(os.path.join(directory, name))
    if keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            os.remove(old)
    return path


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint on the CPU; a corrupt or foreign file is an `InputError` that says what to do."""
    directory = os.path.dirname(path) or "."
    older = [p for s, p in list_checkpoints(directory) if os.path.abspath(p) != os.path.abspath(path)]
    remedy = (f"delete it to resume from {os.path.basename(older[-1])}" if older
              else "delete it and start again without --resume")
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist: pass --resume without a path to use the newest in "
                         "the output directory, or start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file type: all mean the same to the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"checkpoint {path!r} is corrupt or unreadable ({reason}): {remedy}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path!r} is not an electra-fast training checkpoint: {remedy}")
    return state


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
