"""ELECTRA's output heads: `RTDHead`, the discriminator's, which the slim `Discriminator` and the transformers
encoders wrapped in `electra_fast.pretraining.families.rtd_head.RTDDiscriminator` both use; and `GeneratorHead`,
the slim generator's LM head (its output layer is the shared word table)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RTDHead(nn.Module):
    """dense(H -> H) -> gelu -> dense(H -> 1): one replaced-token logit per token.

    The step fuses the last projection with the loss (`ops.rtd_head_loss` reads `features(hidden)` and `out`).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """`gelu(dense(hidden))`: what `out` (or a fused projection + loss) reads."""
        return F.gelu(self.dense(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[...]` for hidden states `[..., H]`."""
        return self.out(self.features(hidden)).squeeze(-1)


class GeneratorHead(nn.Module):
    """dense(H_g -> E) -> gelu -> LayerNorm(E); the logits reuse the word embeddings plus this `bias`
    (`padded_vocab_size` entries)."""

    def __init__(self, hidden_size: int, embedding_size: int, padded_vocab_size: int, layer_norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, embedding_size)
        self.norm = nn.LayerNorm(embedding_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(padded_vocab_size))

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """`LayerNorm(gelu(dense(hidden)))`: the LM logits are `F.linear(features, word table, bias)`."""
        return self.norm(F.gelu(self.dense(hidden)))


__all__ = ["RTDHead", "GeneratorHead"]
