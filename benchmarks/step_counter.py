"""Counting one training step op by op on fake tensors: the TorchDispatchMode that sees every ATen op (and every
Triton launch) of the step and records its kernel launches, FLOPs, bytes moved and the live storage bytes, by the
rules benchmarks/step_model.py's docstring states (what launches, multi_tensor_apply's chunking, views and
metadata launching nothing, boolean indices replaced by their expected size)."""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

aten = torch.ops.aten
NO_LAUNCH = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten._local_scalar_dense.default, aten.lift_fresh.default,
             aten.set_.source_Storage_storage_offset, aten.resize_.default}
# cuda/MultiTensorApply.cuh
CHUNK, MAX_BLOCKS, MAX_TENSORS = 65536, 320, {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}


# ------------------------------------------------------------------------------------------- counting rules
def is_view(func) -> bool:
    """Ops whose every output aliases an input without writing it launch nothing."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def multi_tensor_launches(numels: list, depth: int) -> int:
    """Kernel launches of CUDA's multi_tensor_apply over tensors of these sizes with `depth` lists."""
    max_t, launches, tensors, blocks = MAX_TENSORS[min(max(depth, 1), 5)], 0, 0, 0
    for n in numels:
        if n == 0:
            continue
        tensors += 1
        chunks = -(-n // CHUNK)
        for c in range(chunks):
            blocks += 1
            last = c == chunks - 1
            if blocks == MAX_BLOCKS or (tensors == max_t and last):
                launches, blocks, tensors = launches + 1, 0, 0 if last else 1
    return launches + (blocks > 0)


def _tensors(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


@dataclass
class Launch:
    """One kernel (or one op's worth of kernels) of the step."""
    op: str
    phase: str
    group: str
    launches: int
    flops: float = 0.0
    nbytes: int = 0
    vocab: bool = False       # a matmul with the vocabulary as one of its dimensions: the LM head
    attention: bool = False
    fusible: bool = False     # elementwise / reduction / copy: what torch.compile fuses
    reads: list = field(default_factory=list)   # storage ids
    writes: list = field(default_factory=list)


class StepCounter(TorchDispatchMode):
    """Counts launches, FLOPs and bytes per op and tracks live storage bytes (see the module docstring)."""

    def __init__(self, tracker: ModuleTracker, groups, vocab_sizes, bool_fraction: float):
        super().__init__()
        self.tracker, self.groups, self.vocab_sizes = tracker, groups, set(vocab_sizes)
        self.bool_fraction = bool_fraction
        self.flop_formulas = flop_registry
        self.records: list[Launch] = []
        self.counting, self.phase, self.syncs = False, "forward", 0
        self.live = self.peak = 0
        self._ids: dict = {}        # id(storage) -> serial, while the storage lives
        self._serial = 0
        self._track_memory = True
        self._body = False

    # -- memory
    def storage_id(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        key = id(st)
        if key not in self._ids:
            self._serial += 1
            self._ids[key] = self._serial
            nbytes = st.nbytes() if self._track_memory else 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, nbytes)
        return self._ids[key]

    def _free(self, key, nbytes):
        self._ids.pop(key, None)
        self.live -= nbytes

    def alive_ids(self) -> set:
        return set(self._ids.values())

    # -- attribution
    def group(self) -> str:
        if self.phase == "optimizer":
            return "optimizer"
        names = sorted(self.tracker.parents - {"Global"}, key=len, reverse=True)
        for name in names:
            for pattern, label in self.groups:
                if re.search(pattern, name):
                    return label
        return "step glue (masking, losses, sampling, tied LM projection)"

    def record(self, op: str, launches: int, args, out, func=None, fusible=False):
        if not self.counting or launches == 0:
            return
        ins, outs = _tensors(args), _tensors(out)
        flops = 0.0
        if func is not None and func._overloadpacket in self.flop_formulas:
            flops = float(self.flop_formulas[func._overloadpacket](*args[0], **args[1], out_val=out))
        written = list(outs)
        if func is not None:  # mutated arguments are written as well as read
            for a, v in zip(func._schema.arguments, list(args[0]) + [args[1].get(a.name) for a in
                                                                     func._schema.arguments[len(args[0]):]]):
                if a.alias_info is not None and a.alias_info.is_write:
                    written += _tensors(v)
        uniq = {id(t): t for t in ins}
        nbytes = sum(_nbytes(t) for t in uniq.values()) + sum(_nbytes(t) for t in written)
        dims = {d for t in ins + outs for d in t.shape}
        self.records.append(Launch(op, self.phase, self.group(), launches, flops, nbytes,
                                   vocab=flops > 0 and bool(dims & self.vocab_sizes),
                                   attention="scaled_dot_product" in op or "flash_attention" in op,
                                   fusible=fusible,
                                   reads=[self.storage_id(t) for t in uniq.values()],
                                   writes=[self.storage_id(t) for t in written]))

    def triton_launch(self, fn, args):
        self.record(f"triton:{getattr(fn, '__name__', None) or fn.fn.__name__}", 1, (args, {}), ())

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
            args = self._unmask(args)
        if func.namespace not in ("aten", "prims", "prim", "profiler"):
            return self._custom(func, args, kwargs)
        out = func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            self.syncs += self.counting
        for t in _tensors(out):
            self.storage_id(t)
        self.record(str(func.overloadpacket.__name__), self._launches(func, args, kwargs, out), (args, kwargs), out,
                    func, fusible=self._fusible(func))
        return out

    def _launches(self, func, args, kwargs, out) -> int:
        name = func._schema.name
        if func in NO_LAUNCH or is_view(func) or "_foreach_" in name or "_fused_" in name:
            if "_foreach_" in name or "_fused_" in name:
                lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple)) and a
                         and isinstance(a[0], torch.Tensor)]
                big = [lst for lst in lists if any(t.numel() > 1 for t in lst)]
                depth = len(big) + (not func._schema.name.endswith("_") and "_fused_" not in name)
                return multi_tensor_launches([t.numel() for t in big[0]], depth) if big else 1
            return 0
        outs = _tensors(out)
        if not outs or not any(t.numel() for t in outs):
            return 0
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        return int(writes or not all(t.untyped_storage()._cdata in inputs for t in outs))  # else a view in effect

    @staticmethod
    def _fusible(func) -> bool:
        return func._overloadpacket not in flop_registry and not any(
            s in func._schema.name for s in ("_foreach_", "_fused_", "embedding", "scaled_dot_product", "nonzero"))

    def _unmask(self, args):
        """Boolean indices -> long indices of the expected count (one nonzero launch and a host sync each)."""
        new = []
        for idx in args[1]:
            if idx is not None and idx.dtype == torch.bool:
                n = round(self.bool_fraction * idx.numel())
                new += [torch.empty(n, dtype=torch.long, device=idx.device) for _ in range(idx.dim())]
                self.record("nonzero", 1, ((idx,), {}), ())
                self.syncs += self.counting
            else:
                new.append(idx)
        return (args[0], new, *args[2:])

    def _custom(self, func, args, kwargs):
        """A custom op: count what its body launches (ATen ops and Triton kernels), return its fake result."""
        opdef = torch._library.custom_ops.OPDEFS.get(func._schema.name)
        if opdef is not None and self.counting and not self._body:
            track, self._track_memory, self._body = self._track_memory, False, True
            try:
                with self:
                    opdef._init_fn(*args, **kwargs)
            finally:
                self._track_memory, self._body = track, False
        elif self.counting:
            self.record(func._schema.name, 1, (args, kwargs), ())
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self.storage_id(t)
        return out
