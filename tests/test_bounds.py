"""Issue 12.7: every Triton kernel stays inside its buffers. The checks live in tests/bounds_checks.py; they patch
the Triton interpreter's memory operations and run here in their own process, so the patching stays out of the
rest of the suite. (The dispatcher crashes once blamed on them were the op registrations freed by a second import
of the kernels as top-level `kernels`: see tests/test_kernels_triton.py.)"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the bounds checks need TRITON_INTERPRET=1")
def test_every_kernel_access_stays_inside_its_buffers():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(HERE, "bounds_checks.py")], capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(HERE))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
