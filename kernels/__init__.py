"""Triton kernels for the hot ELECTRA RTD ops (`electra_fast.kernels`, the "triton" backend of `electra_fast.ops`).

Each function here is a backend entry with the contract of `electra_fast.ops._backend` (canonical, contiguous
inputs); each runs registered `torch.library` custom ops (`electra_fast::*_triton`) with fake kernels and autograd,
so `torch.compile(fullgraph=True)` traces them and CUDA graphs capture them. Importing needs `triton`
(ImportError otherwise, which the backend switch reports as "unavailable"). On CPU tensors the kernels run only
under `TRITON_INTERPRET=1`.
"""
if __name__ != "electra_fast.kernels":
    # Imported under another name: with the repository root on sys.path (pytest, `python -m` in a checkout) this
    # folder is the top-level `kernels`, the name of Hugging Face's kernels package, which transformers probes by
    # importing it. Running the op modules twice would re-register every `electra_fast::*_triton` op, and torch
    # frees the first registration while handles to it live on: later calls crashed in its dispatcher (issue 12.7).
    __path__ = []
    __all__ = []
else:
    from .dropout_add_layer_norm import dropout_add_layer_norm
    from .gumbel_sample import gumbel_sample
    from .lm_head import lm_head_loss_and_sample
    from .mask_tokens import mask_tokens
    from .masked_gather import masked_gather
    from .mlm_loss_sample import mlm_loss_and_sample
    from .replace_tokens import replace_tokens
    from .rtd_bce import rtd_bce_loss
    from .rtd_head import rtd_head_loss
    from .varlen_plan import varlen_plan

    __all__ = ["gumbel_sample", "lm_head_loss_and_sample", "mask_tokens", "masked_gather", "mlm_loss_and_sample",
               "replace_tokens", "rtd_bce_loss", "rtd_head_loss", "dropout_add_layer_norm",
               "varlen_plan"]
