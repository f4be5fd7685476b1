"""From the checkout root (pytest, `python -c`, a notebook, PYTHONPATH=. on a GPU machine) the repository's top-level
`kernels/` and `csrc/` folders must never stand in for a real package: transformers imports Hugging Face's `kernels`
package, and our Triton modules must run only as `electra_fast.kernels`. Each case is a fresh interpreter started
in the checkout root, since what is imported first decides."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.transformers


TRANSFORMERS = """
import torch
from transformers import ElectraConfig, ElectraForPreTraining
config = ElectraConfig(vocab_size=40, embedding_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, max_position_embeddings=16)
logits = ElectraForPreTraining(config)(torch.randint(0, 40, (2, 6))).logits
assert logits.shape == (2, 6) and torch.isfinite(logits).all()
"""

OURS = """
import importlib, os, torch
import torch._library.custom_ops as custom_ops
from electra_fast import ops
hidden, positions = torch.randn(2, 7, 5), torch.tensor([[1, 4], [0, 6]])
backends = ops.available_backends("cpu", "masked_gather")
assert backends == (["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]), backends
for backend in backends:
    out = ops.masked_gather(hidden, positions, backend=backend)
    assert torch.equal(out, torch.stack([hidden[0, [1, 4]], hidden[1, [0, 6]]])), backend
REGISTERED = {q: d for q, d in custom_ops.OPDEFS.items() if q.startswith("electra_fast::")}
"""

CHECKS = """
assert all(custom_ops.OPDEFS[q] is d for q, d in REGISTERED.items()), "an op was registered again"
import kernels
ours = os.path.join(os.getcwd(), "kernels")
if REAL_KERNELS:
    assert ours not in list(kernels.__path__), f"import kernels found the checkout's folder: {kernels.__path__}"
    assert hasattr(kernels, "CUDAProperties"), dir(kernels)  # what transformers imports from it
else:
    try:
        importlib.import_module("kernels.masked_gather")
    except ImportError as e:
        assert "electra_fast.kernels" in str(e), e
    else:
        raise AssertionError("the Triton modules ran as the top-level package kernels")
print("ok")
"""


def _real_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("order", ["transformers_first", "ours_first"])
@pytest.mark.parametrize("interpret", ["0", "1"], ids=["torch", "torch+triton"])
def test_checkout_root_imports_transformers_and_runs_our_ops(order, interpret):
    pytest.importorskip("transformers")
    if interpret == "1":
        pytest.importorskip("triton")
    body = TRANSFORMERS + OURS if order == "transformers_first" else OURS + TRANSFORMERS
    code = f"REAL_KERNELS = {_real_kernels_installed()}\n{body}{CHECKS}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["TRITON_INTERPRET"] = interpret
    # `python -c` puts the working directory first on sys.path, as a user's shell in the checkout does.
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
