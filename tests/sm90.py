"""Compile every Triton kernel of `electra_fast.kernels` for sm_90 without a GPU, as the real launches specialise it.

1. Record: the public ops run with `backend="triton"` at ELECTRA-small and -base shapes (`SCENARIOS`, one entry per
   op call, backward included) with `JITFunction.run` replaced by a recorder: each launcher picks its own blocks,
   warps and grid, and Triton's own binder turns the arguments into the signature, constexprs and alignment
   attributes a launch on a GPU would compile. Nothing executes: inputs are untouched `torch.empty` CPU tensors
   (the kernel never writes them, so their pages are never allocated).
2. Compile each distinct specialisation with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` and
   read the cubin with `cuobjdump`: registers, stack and local memory (`-res-usage`), global/local memory
   instructions and their widths (`-sass`). Results are cached on disk by the kernel's source hash (Triton's
   `cache_key` covers the kernel and every @triton.jit function and global it uses) + the specialisation + the
   Triton version + the analysis code, under `$ELECTRA_FAST_SM90_CACHE` (default `~/.cache/electra_fast_sm90`).

Run as a script (`python tests/sm90.py`, prints the JSON report) in a process where `TRITON_INTERPRET` is unset:
`@triton.jit` gives interpreter functions there, which cannot be compiled. tests/test_compile_sm90.py runs it so.
To cover a new op or kernel, add a `Scenario` (a new kernel file in `kernels/` is discovered by itself, and the
test fails until some scenario launches each of its kernels).
"""
from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional
from unittest import mock

# Run as a script (tests/ first on sys.path), the checkout is used in place, as pytest's conftest does.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
KERNEL_PACKAGE = "electra_fast.kernels"
CACHE_DIR = os.environ.get("ELECTRA_FAST_SM90_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "electra_fast_sm90"))
VOCAB, PADDED_VOCAB = 30522, 30592  # BERT's WordPiece vocabulary, and padded to a multiple of 128 as the models do
SIZES = {"small": dict(b=128, seq_len=128, h=256, n=19), "base": dict(b=64, seq_len=512, h=768, n=79)}
WIDE_LOAD, WIDE_STORE = "LDG.E.128", "STG.E.128"


@dataclasses.dataclass
class Scenario:
    """One public-op call (forward and backward). `wide`: kernel name -> SASS instructions every specialisation of
    that kernel launched here must contain (the 16-byte accesses of the logits with a padded vocabulary)."""
    name: str
    run: Callable[[], None]
    wide: dict = dataclasses.field(default_factory=dict)


def cpu_tensor(*shape, dtype=torch.float32, grad=False):
    """Untouched memory: never written (no kernel runs), so never paged in, whatever its size."""
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _mlm(m, width, dtype, sampler=None, **kw):
    from electra_fast import ops

    logits = cpu_tensor(m, width, dtype=dtype, grad=True)
    loss = ops.mlm_loss_and_sample(logits, torch.zeros(m, dtype=torch.long), torch.ones(m), vocab_size=VOCAB,
                                   backend="triton", sampler=sampler, **kw)[0]
    torch.autograd.grad(loss, logits)


def _gumbel(m, width, dtype, **kw):
    from electra_fast import ops
    ops.gumbel_sample(cpu_tensor(m, width, dtype=dtype), vocab_size=VOCAB, backend="triton", **kw)


def _lm_head(m, e, dtype):
    """The fused LM head launches the MLM kernels once per chunk of rows (row_offset = the chunk's first row)."""
    from electra_fast import ops
    hidden, weight = cpu_tensor(m, e, dtype=dtype, grad=True), cpu_tensor(PADDED_VOCAB, e, dtype=dtype, grad=True)
    bias = cpu_tensor(PADDED_VOCAB, dtype=dtype, grad=True)
    loss = ops.lm_head_loss_and_sample(hidden, weight, bias, torch.zeros(m, dtype=torch.long), torch.ones(m),
                                       vocab_size=VOCAB, backend="triton")[0]
    torch.autograd.grad(loss, (hidden, weight, bias))


def _mask(b, seq_len, replacement, whole_word=False):
    from electra_fast import ops
    ids = torch.zeros(b, seq_len, dtype=torch.long)
    starts = torch.ones(b, seq_len, dtype=torch.bool) if whole_word else None
    ops.mask_tokens(ids, torch.ones_like(ids), mask_token_id=103, special_token_ids=[0, 100, 101, 102, 103],
                    replacement=replacement, word_starts=starts, backend="triton")


def _disc(b, seq_len, h, n, dtype):
    """The discriminator side of a step: gather (and its scatter-add backward), replace, BCE, fused head."""
    from electra_fast import ops
    hidden = cpu_tensor(b, seq_len, h, dtype=dtype, grad=True)
    pos = torch.zeros(b, n, dtype=torch.long)
    torch.autograd.grad(ops.masked_gather(hidden, pos, backend="triton").sum(), hidden)
    ops.replace_tokens(torch.zeros(b, seq_len, dtype=torch.long), pos, torch.ones(b, n),
                       torch.zeros(b * n, dtype=torch.long), backend="triton")
    logits, mask = cpu_tensor(b, seq_len, dtype=dtype, grad=True), torch.ones(b, seq_len, dtype=torch.long)
    torch.autograd.grad(ops.rtd_bce_loss(logits, torch.zeros(b, seq_len, dtype=torch.bool), mask, backend="triton"),
                        logits)
    weight, bias = cpu_tensor(1, h, dtype=dtype, grad=True), cpu_tensor(1, dtype=dtype, grad=True)
    loss = ops.rtd_head_loss(hidden, weight, bias, torch.zeros(b, seq_len, dtype=torch.bool), mask,
                             backend="triton")[0]
    torch.autograd.grad(loss, (hidden, weight, bias))


def _varlen_plan(b, seq_len, dtype=torch.long):
    from electra_fast import ops
    ops.varlen_plan(torch.ones(b, seq_len, dtype=dtype), backend="triton")


def _residual_layer_norm(rows, h, dtype):
    """The encoder's fused `LN(residual + dropout(x))`, forward and backward (dweight/dbias partial sums)."""
    from electra_fast import ops
    x, res = cpu_tensor(rows, h, dtype=dtype, grad=True), cpu_tensor(rows, h, dtype=dtype, grad=True)
    weight, bias = cpu_tensor(h, dtype=dtype, grad=True), cpu_tensor(h, dtype=dtype, grad=True)
    y = ops.dropout_add_layer_norm(x, res, weight, bias, p=0.1, eps=1e-12, seed=torch.zeros(1, dtype=torch.long),
                                   salt=3, backend="triton")
    torch.autograd.grad(y, (x, res, weight, bias), cpu_tensor(rows, h, dtype=dtype))


def _scenarios() -> list:
    out = []
    streaming = {"_sample_rows_kernel": (WIDE_LOAD,), "_mlm_backward_kernel": (WIDE_LOAD, WIDE_STORE)}
    for size, s in SIZES.items():
        m = s["b"] * s["n"]
        for dtype in (torch.bfloat16, torch.float32):
            tag = f"{size} {str(dtype)[6:]}"
            out.append(Scenario(f"mlm {tag} W={PADDED_VOCAB}",
                                lambda m=m, d=dtype: _mlm(m, PADDED_VOCAB, d), streaming))
            out.append(Scenario(f"mlm {tag} W={VOCAB}", lambda m=m, d=dtype: _mlm(m, VOCAB, d)))
            out.append(Scenario(f"disc {tag}", lambda s=s, d=dtype: _disc(**s, dtype=d)))
        for replacement in (False, True):
            out.append(Scenario(f"mask_tokens {size} replacement={replacement}",
                                lambda s=s, r=replacement: _mask(s["b"], s["seq_len"], r)))
        out.append(Scenario(f"mask_tokens {size} whole_word",
                            lambda s=s: _mask(s["b"], s["seq_len"], False, whole_word=True)))
        out.append(Scenario(f"dropout_add_layer_norm {size} bfloat16",
                            lambda s=s: _residual_layer_norm(s["b"] * s["seq_len"], s["h"], torch.bfloat16)))
        out.append(Scenario(f"varlen_plan {size}", lambda s=s: _varlen_plan(s["b"], s["seq_len"])))
    m, bf16, fwd = SIZES["base"]["b"] * SIZES["base"]["n"], torch.bfloat16, {"_sample_rows_kernel": (WIDE_LOAD,)}
    out += [  # the other sampling paths, at base in bf16
        Scenario("mlm T=0.7 disallow_correct", lambda: _mlm(m, PADDED_VOCAB, bf16, temperature=0.7,
                                                            disallow_correct=True), streaming),
        Scenario("mlm gumbel sampler", lambda: _mlm(m, PADDED_VOCAB, bf16, sampler="gumbel"), streaming),
        Scenario("gumbel_sample", lambda: _gumbel(m, PADDED_VOCAB, bf16), fwd),
        Scenario("gumbel_sample T=0.7 disallow", lambda: _gumbel(m, PADDED_VOCAB, bf16, temperature=0.7,
                                                                 disallow=torch.zeros(m, dtype=torch.long)), fwd),
        # Its chunks' logits come from real CPU GEMMs here, so few rows (still two chunks) and a narrow E: the
        # kernels' specialisations depend on neither.
        Scenario("lm_head", lambda: _lm_head(600, 8, bf16), streaming),
        Scenario("varlen_plan bool mask", lambda: _varlen_plan(64, 512, torch.bool)),
    ]
    return out


SCENARIOS = _scenarios()


# ---------------------------------------------------------------- discovery

def kernel_modules() -> list:
    pkg = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}") for info in pkgutil.iter_modules(pkg.__path__)]


def kernel_name(fn: JITFunction) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


def launch_targets() -> set:
    """Every @triton.jit function some module of the package launches (`kernel[grid](...)`, also `mod.kernel[...]`)."""
    found = set()
    for mod in kernel_modules():
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                obj = _resolve(node.func.value, vars(mod))
                if isinstance(obj, JITFunction):
                    found.add(kernel_name(obj))
    return found


def _resolve(node, scope):
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_resolve(node.value, scope), node.attr, None)
    return None


# ---------------------------------------------------------------- recording

@contextlib.contextmanager
def recording(sink: list):
    """Launches append `(fn, signature, constexprs, attrs, options, grid)` to `sink` instead of running."""
    backend = make_backend(TARGET)
    binders = {}

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        sink.append((self, signature, constexprs, attrs, options.__dict__, grid(bound) if callable(grid) else grid))

    kernel_modules()  # imported before TRITON_INTERPRET is set: their kernels stay compilable JITFunctions
    # The backend switch lets Triton take CPU tensors only under TRITON_INTERPRET=1; the kernels never run here.
    with mock.patch.object(JITFunction, "run", run), mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        yield


def record(scenarios) -> list:
    """Distinct specialisations: dicts with the kernel, what compiles it, the scenarios that launch it."""
    specs = {}
    for sc in scenarios:
        sink = []
        with recording(sink):
            sc.run()
        for fn, signature, constexprs, attrs, options, grid in sink:
            name = kernel_name(fn)
            key = hashlib.sha256(json.dumps([name, fn.cache_key, signature, sorted(map(repr, constexprs.items())),
                                             sorted(map(repr, attrs.items())), options, triton.__version__,
                                             _ANALYSIS], sort_keys=True, default=str).encode()).hexdigest()[:24]
            spec = specs.setdefault(key, dict(key=key, kernel=name, module=fn.fn.__module__, fn=fn.fn.__name__,
                                              signature=signature, constexprs=constexprs, attrs=attrs,
                                              options=options, grid=list(grid), scenarios=[], wide=set()))
            spec["scenarios"].append(sc.name)
            spec["wide"].update(sc.wide.get(fn.fn.__name__, ()))
    return list(specs.values())


# ---------------------------------------------------------------- compiling and reading the cubin

def cuobjdump() -> Optional[str]:
    """The cuobjdump that Triton ships (or `TRITON_CUOBJDUMP_PATH`), else the one on PATH."""
    with contextlib.suppress(Exception):
        path = triton.knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    return shutil.which("cuobjdump")


SASS_MEM = re.compile(r"\b((?:LDG|STG|LDL|STL|LD|ST|ATOMG|RED)(?:\.[A-Z0-9_]+)*)\b")


def analyse(ptx: str, cubin: bytes) -> dict:
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    mem = collections.Counter(SASS_MEM.findall(sass))
    return dict(regs=int(res["REG"]), stack=int(res["STACK"]), local=int(res["LOCAL"]), shared=int(res["SHARED"]),
                ptx_local=bool(re.search(r"^\s*\.local\b", ptx, re.M)), mem=dict(sorted(mem.items())))


# A change to how a cubin is read invalidates the cache; a change to the scenarios does not.
_ANALYSIS = hashlib.sha256((inspect.getsource(analyse) + SASS_MEM.pattern).encode()).hexdigest()


def compile_spec(spec: dict) -> dict:
    """Compile one specialisation for sm_90 (cached on disk); {"error": ...} when Triton or ptxas fails."""
    path = os.path.join(CACHE_DIR, spec["key"] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    fn = getattr(importlib.import_module(spec["module"]), spec["fn"])
    try:
        kernel = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"]), target=TARGET,
                                options=spec["options"])
        result = analyse(kernel.asm["ptx"], kernel.asm["cubin"])
    except Exception as exc:  # the report names the kernel; an error is not cached, so a fix is picked up
        return dict(error=f"{type(exc).__name__}: {exc}"[:4000])
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return result


def _cached(spec) -> bool:
    return os.path.exists(os.path.join(CACHE_DIR, spec["key"] + ".json"))


def report(workers: int = os.cpu_count() or 1) -> dict:
    """Record every scenario, compile every specialisation; JSON-ready."""
    start = time.perf_counter()
    specs = record(SCENARIOS)
    todo = [s for s in specs if not _cached(s)]
    recorded = time.perf_counter()
    results = {}
    if len(todo) > 1 and workers > 1:
        # Fresh interpreters (spawn): no forked torch thread pools, and TRITON_INTERPRET is unset in this process.
        import multiprocessing
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = dict(zip((s["key"] for s in todo), pool.map(compile_spec, todo)))
    launches = []
    for spec in specs:
        result = results.get(spec["key"]) or compile_spec(spec)
        args = list(spec["signature"])
        launches.append(dict(
            kernel=spec["kernel"], key=spec["key"], scenarios=spec["scenarios"], wide=sorted(spec["wide"]),
            num_warps=spec["options"]["num_warps"], grid=spec["grid"],
            constexprs={args[i]: v for (i,), v in spec["constexprs"].items()},
            signature={k: v for k, v in spec["signature"].items() if v != "constexpr"},
            divisible_by_16=[args[i] for (i,), v in spec["attrs"].items() if ["tt.divisibility", 16] in v],
            **result))
    print(f"sm90: {len(specs)} specialisations recorded in {recorded - start:.1f} s, {len(todo)} compiled in "
          f"{time.perf_counter() - recorded:.1f} s", file=sys.stderr)
    return dict(triton=triton.__version__, target=f"sm_{TARGET.arch}", kernels=sorted(launch_targets()),
                launches=launches)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled for sm_90")
    json.dump(report(), sys.stdout, default=str, indent=1)
