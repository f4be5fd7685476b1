"""The CUDA sources build with the machine's nvcc, without a GPU (CI).

- every `csrc/*.cu` compiles (sm_90, torch's nvcc defines, our flags) with no warning from our files, and ptxas
  (`-Xptxas -v`, the same compile) reports no register spill and no stack frame for any kernel, and the MLM
  kernels within their register budgets;
- the SASS of the MLM kernels streams the logits with 16-byte loads (and the backward stores 16 bytes);
- `csrc/bindings.cpp` compiles against the installed torch: it includes only torch's device-generic headers, so
  a CPU-only torch wheel (which lacks c10/cuda's generated headers) builds it too;
- the objects link into an extension module that imports here and exposes every function the launchers
  (`csrc/*.py`) call, with the binding's argument checks working.
The sampling arithmetic the kernels share with the host (Philox, Gumbel, inverse CDF): tests/test_csrc_host_sampling.py.
Running the kernels needs a GPU: the CUDA backend's tests in tests/ops/. Skipped when nvcc is absent.
"""
import collections
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

from electra_fast.csrc import _build as _cuda_build
from helpers import ROOT

CSRC = os.path.join(ROOT, "csrc")
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
CXX = os.environ.get("CXX", "c++")


def _find_cuobjdump():
    """cuobjdump from PATH, next to nvcc, or the copy Triton ships (found without importing Triton)."""
    candidates = [shutil.which("cuobjdump")]
    if NVCC:
        candidates.append(os.path.join(os.path.dirname(NVCC), "cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


CUOBJDUMP = _find_cuobjdump()
pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")

MODULE_NAME = "electra_fast_cuda_ci"
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _nvcc_cmd(src, obj):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # One architecture keeps CI fast; device-code errors (templates, intrinsics, ptxas) all show up here, and
    # -Xptxas -v reports each kernel's registers, stack frame and spills from this same compile.
    return [NVCC, "-c", os.path.join(CSRC, src), "-o", obj, "-std=c++17", "-arch=sm_90", "-I", CSRC,
            "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS, *_cuda_build.NVCC_FLAGS, "-Xptxas", "-v"]


def _cxx_cmd(obj):
    from torch.utils.cpp_extension import include_paths

    # -O0: this compile checks the binding against torch's headers; optimising it would only cost CI time.
    return [CXX, "-c", os.path.join(CSRC, "bindings.cpp"), "-o", obj, "-std=c++20", "-O0", "-fPIC", "-I", CSRC,
            *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
            f"-DTORCH_EXTENSION_NAME={MODULE_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compiles every source in parallel; returns {source: (returncode, output, object path)}."""
    out = tmp_path_factory.mktemp("csrc_build")
    jobs = {src: (_nvcc_cmd(src, str(out / f"{src}.o")), str(out / f"{src}.o")) for src in CU_FILES}
    jobs["bindings.cpp"] = (_cxx_cmd(str(out / "bindings.o")), str(out / "bindings.o"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {src: pool.submit(_run, cmd, str(out)) for src, (cmd, _) in jobs.items()}
        results = {src: (*fut.result(), jobs[src][1]) for src, fut in futures.items()}
    results["_dir"] = out
    return results


def test_build_lists_every_source():
    # A .cu file missing from the build definition would compile here and never reach users.
    on_disk = sorted(f for f in os.listdir(CSRC) if f.endswith((".cu", ".cpp")))
    assert sorted(_cuda_build.SOURCES) == on_disk
    headers = sorted(f for f in os.listdir(CSRC) if f.endswith((".cuh", ".h")))
    assert sorted(_cuda_build.HEADERS) == headers


@pytest.mark.parametrize("src", CU_FILES)
def test_cu_file_compiles(build, src):
    rc, output, _ = build[src]
    assert rc == 0, f"nvcc failed on {src}:\n{output}"
    ours = [line for line in output.splitlines() if "warning" in line.lower() and "csrc" in line]
    assert not ours, "nvcc warnings in our sources:\n" + "\n".join(ours)


def _demangle(names):
    """Kernel names without namespaces and parameter lists (e.g. `mlm_backward_kernel<float>`); as mangled if
    c++filt is missing."""
    names = list(names)
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return dict(zip(names, names))
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = [re.sub(r"^void |\(.*$", "", n.replace("electra_fast::(anonymous namespace)::", ""))
             for n in out.splitlines()]
    return dict(zip(names, short))


def _ptxas_report(output):
    """{kernel: {registers, stack, spill_stores, spill_loads}} from the -Xptxas -v lines of a compile."""
    stats, name = {}, None
    for line in output.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m[1]
            stats[name] = {}
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            stats[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            stats[name]["registers"] = int(m[1])
    short = _demangle(stats)
    return {short[k]: v for k, v in stats.items()}


# Kernels allowed a stack frame (local memory: off-chip traffic per thread), with the reason. None needs one.
STACK_ALLOWED = {}
# Register ceilings where occupancy hangs on them (512-thread blocks, 64K registers per SM): the MLM row kernels
# keep two blocks resident per SM, the backward four (the SM's 2048 threads).
REGISTER_BUDGET = {"mlm_sample_rows_kernel": 64, "mlm_backward_kernel": 32}


@pytest.mark.parametrize("src", CU_FILES)
def test_no_register_spills_or_local_memory(build, src):
    rc, output, _ = build[src]
    assert rc == 0, f"nvcc failed on {src}:\n{output}"
    kernels = _ptxas_report(output)
    assert kernels, f"no ptxas report for {src} (is -Xptxas -v still passed?):\n{output}"
    table = "\n".join(f"  {k}: {st.get('registers')} registers, {st.get('stack')} B stack, spills "
                      f"{st.get('spill_stores')} B stored / {st.get('spill_loads')} B loaded"
                      for k, st in sorted(kernels.items()))
    assert all(len(st) == 4 for st in kernels.values()), f"unparsed ptxas report for {src}:\n{table}"
    bad = [k for k, st in kernels.items() if st["spill_stores"] or st["spill_loads"]
           or st["stack"] > STACK_ALLOWED.get(k.split("<")[0], 0)]
    assert not bad, f"register spills or local memory in {src}: {bad}\n{table}"
    over = [k for k, st in kernels.items() if st["registers"] > REGISTER_BUDGET.get(k.split("<")[0], 255)]
    assert not over, f"over the register budget {REGISTER_BUDGET}: {over}\n{table}"


def _sass_global_accesses(obj):
    """{kernel: Counter of (LDG|STG, bits)} from the object's SASS."""
    text = subprocess.run([CUOBJDUMP, "-sass", obj], capture_output=True, text=True, check=True).stdout
    found, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            name = m[1]
            found[name] = collections.Counter()
        elif name and (m := re.search(r"\b(LDG|STG)\.E((?:\.\w+)*)", line)):
            mods = m[2].split(".")
            bits = next((int(x) for x in mods if x in ("64", "128")), None) or \
                next((int(x[1:]) for x in mods if x in ("U8", "S8", "U16", "S16")), 32)
            found[name][(m[1], bits)] += 1
    short = _demangle(found)
    return {short[k]: v for k, v in found.items()}


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or Triton's copy)")
def test_mlm_kernels_stream_logits_with_16_byte_accesses(build):
    rc, output, obj = build["mlm_loss_and_sample.cu"]
    assert rc == 0, output
    sass = _sass_global_accesses(obj)
    rows = {k: v for k, v in sass.items() if k.startswith("mlm_sample_rows_kernel<")}
    backward = {k: v for k, v in sass.items() if k.startswith("mlm_backward_kernel<")}
    assert len(rows) == 12 and len(backward) == 3, sorted(sass)  # 3 dtypes x (loss or not) x (cdf or gumbel)
    for name, ops in rows.items():
        assert ops[("LDG", 128)] >= 1, f"{name} reads no 16-byte vector: {dict(ops)}"
    for name, ops in backward.items():
        assert ops[("LDG", 128)] >= 1 and ops[("STG", 128)] >= 1, f"{name}: {dict(ops)}"


def test_binding_compiles_against_cpu_torch(build):
    rc, output, _ = build["bindings.cpp"]
    assert rc == 0, f"{CXX} failed on bindings.cpp:\n{output}"
    ours = [line for line in output.splitlines() if "warning" in line and "bindings.cpp" in line]
    assert not ours, "compiler warnings in bindings.cpp:\n" + "\n".join(ours)


def test_extension_links_and_imports(build):
    objects = [build[src][2] for src in _cuda_build.SOURCES]
    assert all(build[src][0] == 0 for src in _cuda_build.SOURCES), "a source failed to compile (see above)"
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    so = str(build["_dir"] / f"{MODULE_NAME}.so")
    # nvcc as the linker driver adds the CUDA runtime (static); torch's libraries are already loaded by `import torch`.
    rc, output = _run([NVCC, "-shared", "-o", so, *objects, f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu",
                       "-ltorch_python"], str(build["_dir"]))
    assert rc == 0, f"linking failed (an undefined or duplicate symbol?):\n{output}"
    spec = importlib.util.spec_from_file_location(MODULE_NAME, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    used = set()
    for name in sorted(f for f in os.listdir(CSRC) if f.endswith(".py")):
        with open(os.path.join(CSRC, name)) as f:
            used |= set(re.findall(r"extension\(\)\.(\w+)\(", f.read()))
    assert used and used <= set(dir(module)), f"csrc/*.py call {sorted(used - set(dir(module)))}, not bound"

    # The binding's own checks run on the host: a CPU tensor is refused with a message naming the argument.
    with pytest.raises(ValueError, match="hidden must be a CUDA tensor"):
        module.masked_gather(torch.zeros(2, 3, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        module.mlm_forward(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2),
                           torch.zeros(1, dtype=torch.long), 1.0, False, 3, False)


