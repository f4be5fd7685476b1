"""Public functional ops for ELECTRA replaced-token detection (their contracts: docs/contracts.md).

Each op has a plain PyTorch reference (the CPU path and the test oracle), is registered with `torch.library`
(fake kernel, autograd where differentiable) so `torch.compile(fullgraph=True)` traces it, and dispatches to a
Triton or CUDA kernel through the backend switch in `_backend` (`electra_fast.kernels.<op>`, `electra_fast.csrc.<op>`).
What an op shares with its kernel modules (constants, the autograd glue, fake kernels) is in `_contract`, which both
import; the kernel modules never import an op's module.
"""
from electra_fast.ops._backend import BACKENDS, available_backends, get_backend, set_backend
from electra_fast.ops.gumbel_sample import gumbel_sample
from electra_fast.ops.dropout_add_layer_norm import dropout_add_layer_norm
from electra_fast.ops.lm_head_loss_and_sample import lm_head_loss_and_sample
from electra_fast.ops.mask_tokens import mask_tokens, num_slots
from electra_fast.ops.masked_gather import masked_gather
from electra_fast.ops.mlm_loss_and_sample import mlm_loss_and_sample
from electra_fast.ops.replace_tokens import replace_tokens
from electra_fast.ops.rtd_bce_loss import rtd_bce_loss
from electra_fast.ops.rtd_head_loss import rtd_head_loss
from electra_fast.ops.varlen_plan import varlen_plan

__all__ = [
    "BACKENDS", "available_backends", "get_backend", "set_backend",
    "mask_tokens", "num_slots", "masked_gather", "mlm_loss_and_sample", "lm_head_loss_and_sample", "gumbel_sample",
    "replace_tokens", "rtd_bce_loss", "rtd_head_loss", "dropout_add_layer_norm",
    "varlen_plan",
]
