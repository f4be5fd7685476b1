"""The stages of benchmarks/validate_gpu.py whose work is Python rather than a command line (`--stage-body NAME`,
still each in its own process): the environment and default-backend check, the CUDA extension's build, and the
MLM kernel's microbenchmark."""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import date

from gpu_processes import nvidia_smi
from gpu_results import read_ops
from gpu_stage import HERE


def body_env(out: str, smoke: bool) -> int:
    """Versions, the device, and each op's default backend; exit 1 when a default is not the intended one."""
    import platform

    import torch

    from electra_fast.ops import _backend

    info = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "smoke": smoke,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available()
            else None, "driver": nvidia_smi("driver_version"),
            "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    for name in ("triton", "transformers", "electra_fast"):
        try:
            info[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            info[name] = None
    try:
        from electra_fast.csrc import _extension as ef_cuda

        info["cuda_backend"] = ef_cuda.unavailable_reason() or "available"
    except ImportError as exc:
        info["cuda_backend"] = f"not importable: {exc}"
    info["device"] = info["gpu"] or f"CPU ({platform.processor() or platform.machine()}), smoke run"
    problems = []
    if not smoke and not torch.cuda.is_available():
        problems.append("no CUDA GPU visible (torch.cuda.is_available() is False)")
    # On a CPU (the smoke) the default path is the torch reference by design; on the GPU it must be the op's first
    # choice, since the default order would otherwise fall back without a word.
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    table = {}
    for op, order in _backend.DEFAULT_ORDER.items():
        want = "torch" if device.type == "cpu" else order[0]
        try:
            got = _backend.resolve(op, None, device, torch.bfloat16)[0]
        except Exception as exc:  # resolution itself failing is the same failure, with its reason
            got = f"error: {type(exc).__name__}: {exc}"
        row = {"default": got, "intended": want, "available": _backend.available_backends(device, op)}
        if got != want:
            row["why_not_intended"] = _backend._why_unavailable(want, op, device)
            problems.append(f"{op}: default path takes {got!r}, not {want!r} ({row['why_not_intended']})")
        table[op] = row
    info["default_backends"] = {"device": str(device), "ops": table}
    info["problems"] = problems
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps({k: v for k, v in info.items() if k != "default_backends"}, indent=1))
    for op, row in table.items():
        print(f"{op:26s} default {row['default']:8s} intended {row['intended']:8s} available {row['available']}")
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


def body_build(out: str, smoke: bool) -> int:
    """Remove a stale JIT lock, then build (or load) the CUDA extension; without a GPU (the smoke) say why not."""
    from electra_fast.csrc import _extension as ef_cuda

    rec = {"stale_lock_removed": ef_cuda.clear_stale_build_lock(),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}
    reason = ef_cuda.unavailable_reason()
    rc = 0
    if reason:
        rec.update(built=False, reason=reason)
        rc = 0 if smoke else 1  # on the GPU machine the CUDA C++ tests and the op matrix would then lack it
    else:
        t0 = time.perf_counter()
        try:
            module = ef_cuda.extension()
            rec.update(built=True, seconds=round(time.perf_counter() - t0, 1),
                       module=getattr(module, "__file__", None))
        except RuntimeError as exc:
            rec.update(built=False, reason=str(exc)[:2000])
            rc = 1
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(rec, f, indent=2)
    print(json.dumps(rec, indent=1))
    return rc


def body_ops_mlm(out: str, smoke: bool) -> int:
    """bench_ops.py for the fused MLM loss + sample only, Triton and the torch reference only (the other
    implementations belong to the op matrix of --rest)."""
    sys.path.insert(0, HERE)
    import bench_ops

    keep = ("torch",) if smoke else ("triton", "torch")
    every = bench_ops.implementations
    bench_ops.implementations = lambda *a, **k: [i for i in every(*a, **k) if i in keep]
    shapes = ["tiny"] if smoke else ["small", "base"]
    bench_ops.main(["--ops", "mlm_loss_and_sample", "--out", out] + (["--smoke"] if smoke else
                                                                      ["--shapes", ",".join(shapes)]))
    rows = read_ops(out)["rows"]
    missing = [(s, p, i) for s in shapes for p in ("fwd", "fwd+bwd") for i in keep
               if not any((r["shape"], r["pass"], r["impl"]) == (s, p, i) for r in rows)]
    for m in missing:
        print(f"FAILED: no row for {m}", file=sys.stderr)
    return 1 if missing else 0


BODIES = {"env": body_env, "build": body_build, "ops_mlm": body_ops_mlm}
