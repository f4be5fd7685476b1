"""CI runs the GPU validation script in its CPU smoke mode (issue 9.3), so the GPU run cannot die on a typo:
every part runs as a subprocess, and the merged results (JSON, markdown, CSV) must exist and parse."""
import json
import math
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "validate_gpu.py")


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


def smoke(out, *parts):
    done = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out), "--budget-s", "300",
                           *[arg for part in parts for arg in ("--part", part)]],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def test_smoke_run_writes_every_section(tmp_path):
    # Two calls, as on the GPU (one part per device call): the second merges into the folder the first wrote.
    out = tmp_path / "gpu"
    first = smoke(out, "tests", "e2e-small", "e2e-base")
    assert set(first["parts"]) == {"tests", "e2e-small", "e2e-base"}
    res = smoke(out, "ops")
    assert res["tests"] == first["tests"] and res["e2e"] == first["e2e"]  # the first call's results are kept
    assert set(res) >= {"env", "parts", "tests", "ops", "e2e", "targets"}
    assert set(res["parts"]) == {"tests", "ops", "e2e-small", "e2e-base"}
    assert all(p["status"] != "timeout" for p in res["parts"].values())
    for key in ("torch", "cuda", "triton", "transformers", "driver", "device", "date"):
        assert key in res["env"]
    assert res["tests"]["passed"] + res["tests"]["skipped"] > 0  # junit read back
    ops = res["ops"]["rows"]
    assert {r["op"] for r in ops} >= {"mlm_loss_and_sample", "masked_gather", "rtd_bce_loss"}
    assert all(r["ms"] > 0 and r["GB/s"] >= 0 for r in ops)
    rows = [r for part in res["e2e"].values() for r in part["rows"]]
    assert {r["impl"] for r in rows} == {"transformers", "hf-dropin", "ours"}
    assert all("error" not in r and r["ms_per_step"] > 0 and math.isfinite(r["first_loss"]) for r in rows)
    assert set(res["targets"]) == {"small_vs_hf_eager", "small_vs_hf_compiled", "base_vs_hf_eager", "base_mfu",
                                   "mlm_frac_copy_bw"}
    assert all(math.isfinite(x) for x in _finite_numbers(res))
    md = (out / "validation.md").read_text()
    for section in ("## GPU validation", "### Parts", "### GPU tests", "### Op microbenchmarks", "### End to end",
                    "### Targets"):
        assert section in md
    assert (out / "ops" / "ops.csv").read_text().startswith("op,shape,pass,impl,ms")
    assert (out / "e2e-small" / "e2e.csv").exists()
