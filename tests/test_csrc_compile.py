"""The CUDA sources build with the machine's nvcc, without a GPU (CI).

- every `csrc/*.cu` compiles (sm_90, torch's nvcc defines, our flags) with no warning from our files;
- `csrc/bindings.cpp` compiles against the installed torch: it includes only torch's device-generic headers, so
  a CPU-only torch wheel (which lacks c10/cuda's generated headers) builds it too;
- the objects link into an extension module that imports here and exposes every function `electra_fast/cuda.py`
  calls, with the binding's argument checks working;
- the Philox generator and Gumbel transform the kernels share (`csrc/philox.cuh`, host+device code) reproduce
  Random123's known-answer vectors and draw Gumbel variates (checked on the CPU).
Running the kernels needs a GPU: tests/test_cuda_backend.py. Skipped when nvcc is absent.
"""
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import numpy as np
import pytest
import torch

from electra_fast import _cuda_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
CXX = os.environ.get("CXX", "c++")
pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")

MODULE_NAME = "electra_fast_cuda_ci"
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))

# Random123's published known-answer vectors for Philox4x32-10: (counter, key) -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
GUMBEL_BITS = [0, 1, 2**20, 2**22 - 1, 2**22, 2**31, 0xDEADBEEF, 2**32 - 256, 2**32 - 1]
NUM_SAMPLES = 400_000

# A host program over philox.cuh: KATs, the transform at chosen bits, vector-vs-scalar agreement of the noise
# at every alignment, and a stream of noise (seed from argv) written to a file.
PHILOX_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "philox.cuh"
using namespace electra_fast;
int main(int argc, char** argv) {
  const unsigned long long seed = std::strtoull(argv[1], nullptr, 10);
  const long n = std::atol(argv[2]);
  unsigned v[6];
  for (int k = 0; k < %(num_kat)d; ++k) {
    for (int i = 0; i < 6; ++i) if (std::scanf("%%x", &v[i]) != 1) return 2;
    const Philox4 r = philox4x32_10(Philox4{v[0], v[1], v[2], v[3]}, v[4], v[5]);
    std::printf("kat %%08x %%08x %%08x %%08x\n", r.x, r.y, r.z, r.w);
  }
  const unsigned bits[] = {%(bits)s};
  for (unsigned b : bits) std::printf("gumbel %%u %%.9e\n", b, gumbel_from_bits(b));
  long mismatches = 0;
  for (unsigned long long e0 = 0; e0 < 64; ++e0) {
    float vec[8], one[1];
    gumbel_noise<8>(seed, e0, vec);
    for (int j = 0; j < 8; ++j) {
      gumbel_noise<1>(seed, e0 + j, one);
      mismatches += vec[j] != one[0];
    }
  }
  std::printf("mismatches %%ld\n", mismatches);
  FILE* f = std::fopen(argv[3], "wb");
  for (long e = 0; e < n; e += 8) {
    float g[8];
    gumbel_noise<8>(seed, static_cast<unsigned long long>(e), g);
    std::fwrite(g, sizeof(float), 8, f);
  }
  std::fclose(f);
  return 0;
}
"""


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _nvcc_cmd(src, obj):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # One architecture keeps CI fast; device-code errors (templates, intrinsics, ptxas) all show up here.
    return [NVCC, "-c", os.path.join(CSRC, src), "-o", obj, "-std=c++17", "-arch=sm_90", "-I", CSRC,
            "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS, *_cuda_build.NVCC_FLAGS]


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

    with open(os.path.join(ROOT, "electra_fast", "cuda.py")) as f:
        used = set(re.findall(r"extension\(\)\.(\w+)\(", f.read()))
    assert used and used <= set(dir(module)), f"cuda.py calls {sorted(used - set(dir(module)))}, not bound"

    # The binding's own checks run on the host: a CPU tensor is refused with a message naming the argument.
    with pytest.raises(ValueError, match="hidden must be a CUDA tensor"):
        module.masked_gather(torch.zeros(2, 3, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        module.mlm_forward(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2),
                           torch.zeros(1, dtype=torch.long), 1.0, False)


@pytest.fixture(scope="module")
def philox_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("philox")
    src = out / "philox_check.cpp"
    src.write_text(PHILOX_PROGRAM % {"num_kat": len(PHILOX_KAT), "bits": ", ".join(f"{b}u" for b in GUMBEL_BITS)})
    exe = str(out / "philox_check")
    rc, output = _run([CXX, "-std=c++17", "-O2", "-I", CSRC, str(src), "-o", exe], str(out))
    assert rc == 0, output
    kat_input = "\n".join(" ".join(f"{w:x}" for w in ctr + key) for ctr, key, _ in PHILOX_KAT)

    def run(seed):
        path = out / f"noise_{seed}.bin"
        proc = subprocess.run([exe, str(seed), str(NUM_SAMPLES), str(path)], input=kat_input, capture_output=True,
                              text=True, check=True)
        return proc.stdout, np.fromfile(path, dtype=np.float32).astype(np.float64)

    return run


def test_philox_known_answers(philox_run):
    stdout, _ = philox_run(seed=1)
    got = [tuple(int(w, 16) for w in line.split()[1:]) for line in stdout.splitlines() if line.startswith("kat")]
    assert got == [want for _, _, want in PHILOX_KAT]


def test_gumbel_transform_matches_float64(philox_run):
    stdout, _ = philox_run(seed=1)
    rows = [line.split()[1:] for line in stdout.splitlines() if line.startswith("gumbel")]
    assert [int(b) for b, _ in rows] == GUMBEL_BITS
    for bits, value in rows:
        w = min((int(bits) + 0.5) / 2**32, 1 - 2**-24)  # the kernel's w = 1 - U, clamped below 1
        want = -np.log(-np.log1p(-w))
        assert abs(float(value) - want) <= 2e-6 * max(1.0, abs(want)), (bits, value, want)


def test_vector_and_scalar_noise_agree_at_every_alignment(philox_run):
    stdout, _ = philox_run(seed=12345)
    assert "mismatches 0" in stdout


def test_noise_is_standard_gumbel(philox_run):
    _, g = philox_run(seed=987654321)
    assert g.shape == (NUM_SAMPLES,) and np.isfinite(g).all()
    # Kolmogorov-Smirnov against F(g) = exp(-exp(-g)); 1.95 / sqrt(n) is the 0.1% critical value.
    x = np.sort(g)
    cdf = np.exp(-np.exp(-x))
    n = len(x)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert d < 1.95 / np.sqrt(n), d
    # Mean (Euler-Mascheroni) and variance (pi^2 / 6), within 5 standard errors.
    assert abs(g.mean() - 0.5772156649) < 5 * np.sqrt(np.pi**2 / 6 / n)
    # Var(sample variance) = (mu4 - sigma^4) / n, and mu4 = 5.4 sigma^4 for a Gumbel (excess kurtosis 12/5).
    assert abs(g.var() - np.pi**2 / 6) < 5 * np.sqrt(4.4 * (np.pi**2 / 6) ** 2 / n)
    # The upper tail decides every argmax: P(g > 6) = 1 - exp(-exp(-6)) ~ 2.5e-3, a binomial count.
    p = 1 - np.exp(-np.exp(-6.0))
    assert abs((g > 6).sum() - n * p) < 5 * np.sqrt(n * p)


def test_noise_streams_differ_between_seeds(philox_run):
    _, a = philox_run(seed=1)
    _, b = philox_run(seed=2)
    assert np.abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(len(a))
    assert np.abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 5 / np.sqrt(len(a))  # neighbours independent too
