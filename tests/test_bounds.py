"""Issue 12.7: every Triton kernel stays inside its buffers. The checks live in tests/bounds_checks.py; they patch
the Triton interpreter's memory operations and run here in their own process, so that their patching cannot touch
the state of the rest of the suite (a crash inside torch's dispatcher was seen twice in CI runs right after them)."""
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
