"""electra-fast: fused kernels and a slim model for fast ELECTRA (replaced-token detection) pretraining.

Layers, each importing only those before it: `ops` (public ops, PyTorch references; kernels in `kernels/` and
`csrc/`) -> `model` (slim encoder, its transformers format) -> `data` and `io` (training checkpoints, transformers
model objects) -> `pretraining` (`ElectraPretrainer`, saving a pair) -> `train` (with export and warm starts) ->
`cli`. docs/architecture.md has the map.
"""
import importlib as _importlib
import os as _os

__version__ = "0.1.0"

# In a source checkout used in place (PYTHONPATH=.), `kernels/` and `csrc/` sit beside this package rather
# than inside it (setup.py maps them in at install time); let the import system find them there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "_common.py")
):
    __path__.append(_root)  # noqa: F821  (module __path__)


# The public names and the module each lives in. Everything imports lazily: `electra-fast --help` must answer
# before torch is imported, and `import electra_fast.ops` must not pull in the model.
_PUBLIC = {
    "ops": "electra_fast",
    **dict.fromkeys(("ElectraPretrainer", "param_groups"), "electra_fast.pretraining.pretrainer"),
    **dict.fromkeys(("PretrainerOutput", "rtd_step"), "electra_fast.pretraining.rtd_step"),
    "tie_embeddings": "electra_fast.pretraining.sharing",
    "tokenizer_ids": "electra_fast.pretraining.token_ids",
    "word_starts_from_vocab": "electra_fast.data.word_starts",
    **dict.fromkeys(("ElectraModelConfig", "PRESETS"), "electra_fast.model.config"),
    **dict.fromkeys(("Generator", "Discriminator"), "electra_fast.model.encoder"),
    "AdamWeightDecay": "electra_fast.train.optim",
    "CUDAGraphStep": "electra_fast.train.cuda_graph",
}


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'electra_fast' has no attribute {name!r}")
    if name == "ops":
        return _importlib.import_module("electra_fast.ops")
    return getattr(_importlib.import_module(_PUBLIC[name]), name)
