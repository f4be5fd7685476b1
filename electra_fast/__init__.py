"""electra-fast: fused kernels and a slim model for fast ELECTRA (replaced-token detection) pretraining.

Layout: `electra_fast.ops` (public functional ops, each with a PyTorch reference and registered with
`torch.library`) -> `electra_fast.model` (slim encoder) -> `ElectraPretrainer` -> CLI.
Kernels live in `electra_fast.kernels` (Triton) and `electra_fast.cuda` (CUDA C++ from `csrc/`).
"""
import os as _os

__version__ = "0.1.0"

# In a source checkout used in place (PYTHONPATH=.), `kernels/` and `csrc/` sit beside this package rather
# than inside it (setup.py maps them in at install time); let the import system find them there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "_common.py")
):
    __path__.append(_root)  # noqa: F821  (module __path__)


def __getattr__(name):
    # Everything imports lazily: `electra-fast --help` must answer before torch is imported, and
    # `import electra_fast.ops` must not pull in the model.
    if name == "ops":
        import importlib

        return importlib.import_module("electra_fast.ops")
    if name in ("ElectraPretrainer", "PretrainerOutput", "rtd_step", "param_groups", "tie_embeddings", "tokenizer_ids"):
        from electra_fast import pretrainer

        return getattr(pretrainer, name)
    if name in ("ElectraModelConfig", "PRESETS", "Generator", "Discriminator"):
        from electra_fast import model

        return getattr(model, name)
    if name == "AdamWeightDecay":
        from electra_fast.optim import AdamWeightDecay

        return AdamWeightDecay
    if name == "CUDAGraphStep":
        from electra_fast.cuda_graph import CUDAGraphStep

        return CUDAGraphStep
    raise AttributeError(f"module 'electra_fast' has no attribute {name!r}")
