"""Gradient-disentangled embedding sharing (GDES, DeBERTa-v3): a discriminator reads each shared embedding
parameter as `stopgrad(shared) + delta`, the delta zero-initialised and its own. The RTD loss through such a read
reaches the delta and no parameter the generator uses; the MLM loss never reaches the delta.

The one implementation of that read, for both model families:
- `gdes_embedding` / `gdes_layer_norm` / `gdes_weight`: the arithmetic. The slim `ElectraEmbeddings` calls them
  with its `embeddings_delta` (`electra_fast.model.encoder.Discriminator(gdes=True)`).
- `GDESEmbedding` / `GDESLayerNorm`: modules that stand in a transformers model's place of an `nn.Embedding` /
  `nn.LayerNorm` (wired by `electra_fast.pretraining.sharing.tie_gdes`); `plain_embeddings` swaps them for plain
  modules holding `shared + delta` while a model is written out.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def gdes_weight(shared: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What the discriminator reads: `stopgrad(shared) + delta`."""
    return shared.detach() + delta


def gdes_embedding(ids: torch.Tensor, shared: torch.Tensor, delta: torch.Tensor,
                   padding_idx: Optional[int]) -> torch.Tensor:
    """`F.embedding(ids, stopgrad(shared) + delta)` as two lookups: no `[V, E]` sum per step."""
    return F.embedding(ids, shared.detach(), padding_idx) + F.embedding(ids, delta, padding_idx)


def gdes_layer_norm(x: torch.Tensor, shared: nn.LayerNorm, delta_weight: torch.Tensor,
                    delta_bias: torch.Tensor) -> torch.Tensor:
    """`shared`'s LayerNorm with weight and bias read through GDES."""
    return F.layer_norm(x, shared.normalized_shape, gdes_weight(shared.weight, delta_weight),
                        gdes_weight(shared.bias, delta_bias), shared.eps)


class GDESEmbedding(nn.Module):
    """An embedding table read as `stopgrad(shared.weight) + delta`.

    `shared` is the generator's `nn.Embedding` (registered here too, so the module moves with the model); `delta`
    starts at zero.
    """

    def __init__(self, shared: nn.Embedding):
        super().__init__()
        self.shared = shared
        self.delta = nn.Parameter(torch.zeros_like(shared.weight))
        self.padding_idx = shared.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The table the discriminator reads (for code that reads `.weight` directly)."""
        return gdes_weight(self.shared.weight, self.delta)

    @property
    def num_embeddings(self) -> int:
        return self.shared.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.shared.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return gdes_embedding(ids, self.shared.weight, self.delta, self.padding_idx)

    def plain(self) -> nn.Embedding:
        """An `nn.Embedding` holding `shared + delta` (what an export writes)."""
        out = copy.deepcopy(self.shared)
        with torch.no_grad():
            out.weight.copy_(self.weight)
        return out

    def keep(self, saved: nn.Module) -> None:
        """Set the delta so this module reads `saved.weight` (a reload of what was exported)."""
        with torch.no_grad():
            self.delta.copy_(saved.weight - self.shared.weight)


class GDESLayerNorm(nn.Module):
    """A LayerNorm whose weight and bias are `stopgrad(shared's) + delta` (zero-initialised deltas)."""

    def __init__(self, shared: nn.LayerNorm):
        super().__init__()
        self.shared = shared
        self.delta_weight = nn.Parameter(torch.zeros_like(shared.weight))
        self.delta_bias = nn.Parameter(torch.zeros_like(shared.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gdes_layer_norm(x, self.shared, self.delta_weight, self.delta_bias)

    def plain(self) -> nn.LayerNorm:
        out = copy.deepcopy(self.shared)
        with torch.no_grad():
            out.weight.add_(self.delta_weight)
            out.bias.add_(self.delta_bias)
        return out

    def keep(self, saved: nn.Module) -> None:
        """Set the deltas so this module reads `saved`'s weight and bias."""
        with torch.no_grad():
            self.delta_weight.copy_(saved.weight - self.shared.weight)
            self.delta_bias.copy_(saved.bias - self.shared.bias)


GDES_TYPES = (GDESEmbedding, GDESLayerNorm)


def gdes_module(shared: nn.Module) -> nn.Module:
    """The GDES module that reads `shared` (an `nn.LayerNorm` or an embedding table)."""
    return GDESLayerNorm(shared) if isinstance(shared, nn.LayerNorm) else GDESEmbedding(shared)


def has_gdes_modules(model: nn.Module) -> bool:
    """Whether any submodule of `model` is a GDES module."""
    return any(isinstance(m, GDES_TYPES) for m in model.modules())


@contextlib.contextmanager
def plain_embeddings(model: nn.Module):
    """Within the block, each GDES module of `model` is a plain module holding `shared + delta` (for export)."""
    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, GDES_TYPES):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, m.plain())
            swapped.append((parent, attr, m))
    try:
        yield model
    finally:
        for parent, attr, m in swapped:
            setattr(parent, attr, m)


__all__ = ["gdes_weight", "gdes_embedding", "gdes_layer_norm", "GDESEmbedding", "GDESLayerNorm", "GDES_TYPES",
           "gdes_module", "has_gdes_modules", "plain_embeddings"]
