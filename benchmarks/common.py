"""Shared measuring tools for the benchmarks (docs/contracts.md#how-we-measure): median of CUDA-event timings after
warm-up, inputs rotated through more than the L2 cache, the device-to-device copy bandwidth measured in the same run,
and CSV/PNG output."""
from __future__ import annotations

import contextlib
import csv
import importlib
import os
import platform
import statistics
import sys
import time
from datetime import date
from typing import Optional

import torch

L2_BYTES = 50 * 2**20  # H100: 50 MB; rotating through > 2x this keeps timings honest about DRAM


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU (none found); nothing measured.", file=sys.stderr)
        raise SystemExit(2)


def do_bench(fn, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median milliseconds per call: triton.testing.do_bench, CUDA events after warm-up, L2 cleared before each
    timed call (the callers rotate their inputs as well, so no call finds the previous one's inputs cached).
    Without CUDA (the `--smoke` runs that check the scripts on a CPU): the median of a few wall-clock calls."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def rotation(make, nbytes: int):
    """Enough independent input sets (from `make()`) that cycling through them exceeds twice the L2 cache."""
    copies = max(2, -(-2 * L2_BYTES // max(nbytes, 1)))
    return [make() for _ in range(min(copies, 64))]


def cycle(fn, sets):
    """A zero-argument callable applying `fn` to the next input set each call."""
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def prepare_backends() -> dict:
    """Build (or load) the CUDA extension and import every op's Triton module before anything is timed, so no timed
    call and no first-call figure pays for nvcc or an import. Returns what happened, for env.json / the e2e env:
    `{"cuda_extension": "loaded in N s" | "unavailable: why" | "build failed: why", "triton_modules": [...]}`."""
    from electra_fast.ops import _backend

    info = {}
    try:
        from electra_fast.csrc import _extension as cuda
    except ImportError as exc:  # a checkout without the extension's sources
        info["cuda_extension"] = f"unavailable: {exc}"
    else:
        if not cuda.is_available():
            info["cuda_extension"] = f"unavailable: {cuda.unavailable_reason()}"
        else:
            removed = cuda.clear_stale_build_lock()  # a build killed half-way leaves torch's lock file: it would hang
            if removed:
                info["stale_build_lock_removed"] = removed
            t0 = time.perf_counter()
            try:
                cuda.extension()  # the JIT build (or the cached / ahead-of-time module): never inside a timed op
                info["cuda_extension"] = f"loaded in {time.perf_counter() - t0:.1f} s"
            except RuntimeError as exc:  # the default order then moves on to the next backend, as in training
                info["cuda_extension"] = f"build failed: {str(exc)[:300]}"
    modules = sorted({_backend._module_name("triton", op) for op in _backend.DEFAULT_ORDER})
    info["triton_modules"] = [m for m in modules if _import_ok(m)]  # compiled kernels come at each first call
    return info


def _import_ok(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@contextlib.contextmanager
def record_backends():
    """Within the block, every op's backend choice (`electra_fast.ops._backend.resolve`) as `{op: backend}` in call
    order (several choices of one op joined with "|"): what really ran, not what was asked for."""
    from electra_fast.ops import _backend

    seen: dict = {}
    choose = _backend._choose

    def spy(op, *args, **kwargs):
        name = choose(op, *args, **kwargs)
        names = seen.setdefault(op, [])
        if name not in names:
            names.append(name)
        return name

    _backend._choose = spy
    result: dict = {}
    try:
        yield result
    finally:
        _backend._choose = choose
        result.update({op: "|".join(names) for op, names in seen.items()})


def sampler_of(backend: str, sampler: Optional[str] = None) -> str:
    """`<backend>:<sampler>` of the MLM / Gumbel sampling ops on `backend` called with `sampler=` (None: the ops'
    default, `ELECTRA_FAST_SAMPLER` or "cdf", exact inverse CDF): Gumbel-max over torch.rand noise for the torch
    reference, whatever was asked."""
    if backend == "torch":
        return "torch:gumbel"
    if backend in ("triton", "cuda"):
        from electra_fast.options import env_sampler

        return f"{backend}:{sampler or env_sampler()}"
    return backend


def backends_text(backends: dict) -> str:
    """`op=backend` pairs, one string (a CSV cell)."""
    return " ".join(f"{op}={name}" for op, name in backends.items())


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (host memory without CUDA)."""
    if not torch.cuda.is_available():
        nbytes = min(nbytes, 2**24)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device()).random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return nbytes / (ms * 1e-3) / 1e9


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'host'})"


def environment() -> dict:
    import triton

    return {"device": device_name(), "date": date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def write_csv(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def bar_plot(path: str, title: str, rows: list, copy_gbs: float) -> bool:
    """One PNG per op: GB/s per implementation, grouped by (shape, pass); the copy bandwidth as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot for {title}", file=sys.stderr)
        return False
    groups = sorted({(r["shape"], r["pass"]) for r in rows}, key=str)
    impls = sorted({r["impl"] for r in rows}, key=str)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(groups), 4))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        ys = [next((r["GB/s"] for r in rows if (r["shape"], r["pass"]) == g and r["impl"] == impl), 0) for g in groups]
        ax.bar([i + k * width for i in range(len(groups))], ys, width, label=impl)
    ax.axhline(copy_gbs, color="k", linestyle="--", linewidth=1, label=f"copy {copy_gbs:.0f} GB/s")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{s}\n{p}" for s, p in groups])
    ax.set_ylabel("GB/s (bytes that must move / median time)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
