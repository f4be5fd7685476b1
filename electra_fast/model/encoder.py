"""The slim ELECTRA model: one BERT-style encoder, a generator (MLM) and a discriminator (RTD).

Design (docs/algorithm.md):
- ELECTRA's embedding scheme: word, position and token-type embeddings plus the embedding LayerNorm live in one
  `ElectraEmbeddings` module that the generator and the discriminator share (pass the same instance to both);
  each model owns its `embeddings_project` (E -> H) when E differs from its hidden size. Optional GDES
  (DeBERTa-v3, `electra_fast.model.gdes`): the discriminator reads `stopgrad(E_gen) + E_delta` for every one of
  those parameters.
- Attention (`electra_fast.model.attention`) over one fused QKV projection (a single Linear of width 3H;
  `electra_fast.model.hf_format` splits it into transformers' query/key/value): SDPA without any mask when
  `attention_mask` is None (flash on GPU), else the padding mask built once per forward for all layers (the path
  is `config.options.attention`; where flash runs, its variable-length kernel, each row's real tokens first for the
  whole layer stack).
- The generator's LM head runs only at gathered slots (`Generator.forward(..., positions=)` or
  `encode` + `electra_fast.ops.masked_gather` + `lm_logits`), never at all L positions.
- The vocabulary is padded inside the model to `padded_vocab_size` (a multiple of `pad_vocab_multiple`, 128 by
  default) so the logits' row stride is a multiple of 16 elements and the MLM kernels can use 16-byte loads. The
  padded rows of the word table (and of the GDES delta and the generator's output bias) start at zero and, since
  no id reaches them and the MLM loss ignores logit columns >= vocab_size, never get a gradient, so weight decay
  keeps them at exactly zero. `vocab_size` is always the logical size; `electra_fast.model.hf_format` slices on
  export and pads on import, so checkpoints hold the logical vocabulary only.
- bf16 under autocast: each encoder layer casts its parameters in one launch and runs in bf16, LayerNorm
  included (fp32 statistics); fp32 master weights and gradients are untouched (`electra_fast.model.layers`).
- The ops the encoder calls run on `config.options.backend` (None: each op's default).
GELU is the erf form, LayerNorm eps 1e-12, as the reference and transformers; weights initialised as the reference
does (truncated normal, Glorot for two layers) or as transformers does (`ElectraModelConfig.initializer`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from electra_fast.model import hf_format
from electra_fast.model.attention import PaddingMask, VarlenMask, attend, padding_mask
from electra_fast.model.config import ElectraModelConfig
from electra_fast.model.gdes import gdes_embedding, gdes_weight
from electra_fast.model.heads import GeneratorHead, RTDHead
from electra_fast.model.layers import autocast_parameters, compute_dtype, dropout_seed, residual_layer_norm
from electra_fast.ops import masked_gather


class ElectraEmbeddings(nn.Module):
    """Word + position + token-type embeddings and their LayerNorm: the part the two models share (size E)."""

    def __init__(self, config: ElectraModelConfig):
        super().__init__()
        self.word = nn.Embedding(config.padded_vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                delta: Optional["ElectraEmbeddings"] = None) -> torch.Tensor:
        """`LayerNorm(word[ids] + position[:L] + token_type[types])`, `[B, L, E]`.

        `delta` (GDES, the discriminator's `embeddings_delta`): every parameter is read as `stopgrad(own) +
        delta's`, so a loss through this call reaches the delta's parameters and none of these shared ones.
        """
        l, pad = input_ids.shape[1], self.word.padding_idx
        if delta is None:
            x = self.word(input_ids)
            position, token_type, weight, bias = (self.position.weight[:l], self.token_type.weight, self.norm.weight,
                                                  self.norm.bias)
        else:  # electra_fast.model.gdes: stopgrad(own) + delta's, parameter by parameter
            x = gdes_embedding(input_ids, self.word.weight, delta.word.weight, pad)
            position = gdes_weight(self.position.weight[:l], delta.position.weight[:l])
            token_type = gdes_weight(self.token_type.weight, delta.token_type.weight)
            weight = gdes_weight(self.norm.weight, delta.norm.weight)
            bias = gdes_weight(self.norm.bias, delta.norm.bias)
        # A slice and a broadcast row instead of index lookups: the common case has no token types at all.
        x = x + (token_type[0] if token_type_ids is None else F.embedding(token_type_ids, token_type)) + position
        return F.layer_norm(x, self.norm.normalized_shape, weight, bias, self.norm.eps)


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer block (BERT): attention and FFN, each `LN(x + dropout(f(x)))`."""

    def __init__(self, config: ElectraModelConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(h, 3 * h)  # rows: query, key, value (transformers' order, split on save)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: Optional[PaddingMask], seed: Optional[torch.Tensor] = None,
                salt: int = 0, backend: Optional[str] = None) -> torch.Tensor:
        """`x [B, L, H]` and the encoder's `attention.padding_mask(...)` (built once for all layers); `seed`, `salt`:
        the encoder's `layers.dropout_seed` and this layer's two salts `salt`, `salt + 1`; `backend`: the fused
        residual + LayerNorm's (the config's `options.backend`)."""
        b, l, h = x.shape
        # Under autocast: every parameter cast in one launch and the whole block in bf16 (`electra_fast.model.layers`).
        wqkv, bqkv, wo, bo, g1, b1, wi, bi, wf, bf, g2, b2 = autocast_parameters([
            self.qkv.weight, self.qkv.bias, self.attn_out.weight, self.attn_out.bias, self.attn_norm.weight,
            self.attn_norm.bias, self.ffn_in.weight, self.ffn_in.bias, self.ffn_out.weight, self.ffn_out.bias,
            self.ffn_norm.weight, self.ffn_norm.bias], x.device.type)
        x, eps = x.to(wqkv.dtype), self.attn_norm.eps
        # unbind on dim 2 of [B, L, 3, heads, D]: its backward stacks the three gradients straight into the
        # packed [B, L, 3H] layout (no stack into [3, B, heads, L, D] plus a clone to reshape it back).
        q, k, v = F.linear(x, wqkv, bqkv).view(b, l, 3, self.num_heads, -1).unbind(2)
        a = attend(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        p, train = self.dropout.p, self.training
        x = residual_layer_norm(F.linear(a.reshape(b, l, h), wo, bo), x, g1, b1, p, eps, train, seed, salt, backend)
        return residual_layer_norm(F.linear(F.gelu(F.linear(x, wi, bi)), wf, bf), x, g2, b2, p, eps, train, seed,
                                   salt + 1, backend)


class _Encoder(nn.Module):
    """Shared embeddings -> own `embeddings_project` (if E != H) -> dropout -> layers. Base of both models."""

    def __init__(self, config: ElectraModelConfig, embeddings: Optional[ElectraEmbeddings]):
        super().__init__()
        self.config = config
        owns = embeddings is None
        if owns:
            embeddings = ElectraEmbeddings(config)
        else:
            _check_embeddings(embeddings, config)
        self._owns_embeddings = owns
        self.embeddings = embeddings
        # E -> H when they differ; per model, never shared (reference `model/modeling.py`).
        self.embeddings_project = (nn.Linear(config.embedding_size, config.hidden_size)
                                   if config.embedding_size != config.hidden_size else None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def embed(self, input_ids, token_type_ids):
        return self.embeddings(input_ids, token_type_ids)

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states `[B, L, H]`. `attention_mask` None means every token is real (fastest path); with
        one, the states at padding positions are unspecified (they depend on the attention path)."""
        # Dropout on the E-dim embeddings, before the projection, as the reference and transformers do.
        x = self.dropout(self.embed(input_ids, token_type_ids))
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        # The padding mask once for all layers, in the dtype the attention scores have (autocast's, if on).
        cfg = self.config
        mask = padding_mask(attention_mask, cfg.options.resolved_attention,
                            dtype=compute_dtype(x.device.type, self.layers[0].qkv.weight.dtype),
                            dropout=self.training and cfg.attention_probs_dropout_prob > 0,
                            head_dim=cfg.hidden_size // cfg.num_attention_heads, backend=cfg.options.backend)
        varlen = isinstance(mask, VarlenMask)
        if varlen:  # real tokens first in every row, for all layers (electra_fast.model.attention, "varlen")
            x = mask.pack(x)
        backend = cfg.options.backend
        seed = dropout_seed(x, cfg.hidden_dropout_prob, self.training, backend)  # one draw for every layer
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, seed, 2 * i, backend)
        return mask.unpack(x) if varlen else x

    # initializer="truncated_normal": the layers google-research/electra builds with tf.layers.dense's default kernel
    # initializer (Glorot uniform) instead of its truncated normal.
    _glorot_uniform: tuple = ("embeddings_project",)
    _zero_init: tuple = ()  # submodules whose parameters all start at zero

    def init_weights(self) -> None:
        """Linear/Embedding weights as `config.initializer` says: "truncated_normal", N(0, initializer_range) truncated
        at 2 std, Glorot uniform for `_glorot_uniform` layers; "normal", N(0, initializer_range). Zero biases,
        LayerNorm 1/0, zero pad row, zero padded vocabulary rows (>= vocab_size), zero `_zero_init` modules.

        Embeddings passed in by the caller (shared with the other model) are left as they are.
        """
        std, reference = self.config.initializer_range, self.config.initializer == "truncated_normal"
        for name, m in self.named_modules():
            top = name.split(".")[0]
            if not self._owns_embeddings and top == "embeddings":
                continue
            if top in self._zero_init:
                for p in m.parameters(recurse=False):
                    nn.init.zeros_(p)
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                if reference and name in self._glorot_uniform:
                    nn.init.xavier_uniform_(m.weight)
                elif reference:  # tf.truncated_normal_initializer: std is the untruncated one, bounds +-2 std
                    nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                else:
                    nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self._owns_embeddings:
            with torch.no_grad():  # padded vocabulary rows: no id reaches them, they stay exactly zero
                self.embeddings.word.weight[self.config.vocab_size:].zero_()

    def save_pretrained(self, directory) -> None:
        """Write `config.json` + `model.safetensors` in transformers' format (see `electra_fast.model.hf_format`)."""
        hf_format.save(self, directory)

    @classmethod
    def from_pretrained(cls, path, embeddings: Optional[ElectraEmbeddings] = None, **kwargs):
        """Load a transformers-format checkpoint (ours or one written by transformers' `save_pretrained`): a local
        directory or a hub id; `kwargs`: `gdes=` (Discriminator) and `ElectraModelConfig` fields that replace the
        checkpoint's (see `electra_fast.model.hf_format.load`)."""
        return hf_format.load(cls, path, embeddings=embeddings, **kwargs)


def _check_embeddings(embeddings: ElectraEmbeddings, config: ElectraModelConfig) -> None:
    got = (embeddings.word.num_embeddings, embeddings.word.embedding_dim, embeddings.position.num_embeddings,
           embeddings.token_type.num_embeddings)
    want = (config.padded_vocab_size, config.embedding_size, config.max_position_embeddings, config.type_vocab_size)
    if got != want:
        raise ValueError("embeddings must match the config's (padded_vocab_size, embedding_size, "
                         f"max_position_embeddings, type_vocab_size) = {want}, got {got}")


class Generator(_Encoder):
    """The ELECTRA generator: a small masked-LM whose output layer is tied to the shared word embeddings."""
    hf_architecture = hf_format.GENERATOR_ARCHITECTURE

    def __init__(self, config: ElectraModelConfig, embeddings: Optional[ElectraEmbeddings] = None):
        super().__init__(config, embeddings)
        self.head = GeneratorHead(config.hidden_size, config.embedding_size, config.padded_vocab_size,
                                  config.layer_norm_eps)
        self.init_weights()

    def lm_head_parts(self, hidden: torch.Tensor):
        """`(features, weight, bias)` with `lm_logits(hidden) = F.linear(features, weight, bias)`: what the fused
        `ops.lm_head_loss_and_sample` takes (weight: the tied word table)."""
        return self.head.features(hidden), self.embeddings.word.weight, self.head.bias

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on any `[..., H_g]` hidden states -> `[..., padded_vocab_size]` logits.

        Columns >= `config.vocab_size` are padding (no token has those ids): give the logits to
        `ops.mlm_loss_and_sample(..., vocab_size=config.vocab_size)`, or slice `[..., :vocab_size]`.
        """
        return F.linear(*self.lm_head_parts(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits `[B, N, V]` at `positions [B, N]` (the masked slots), or `[B, L, V]` when positions is None.

        V is the logical `vocab_size`: a view of `lm_logits`' padded columns that leaves the padding out.
        """
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if positions is not None:
            hidden = masked_gather(hidden, positions, backend=self.config.options.backend)
        return self.lm_logits(hidden)[..., : self.config.vocab_size]


class Discriminator(_Encoder):
    """The ELECTRA discriminator: an encoder and a per-token "was this token replaced?" logit.

    `gdes=True`: gradient-disentangled embedding sharing (DeBERTa-v3) for every shared parameter. The discriminator
    owns `embeddings_delta`, an `ElectraEmbeddings` of zero-initialised deltas (word, position and token-type
    tables, LayerNorm weight and bias; its modules never run, only their parameters are read) and reads each
    embedding parameter as `stopgrad(shared) + delta`: the RTD loss reaches the deltas and no parameter the
    generator uses, the MLM loss never reaches the deltas. A delta rather than a copy for the LayerNorm too: the
    discriminator keeps following what the generator learns, starts equal to it whatever order the shared
    embeddings are built or loaded in, and one rule (`effective = shared + delta`) serves export and import.
    """
    hf_architecture = hf_format.DISCRIMINATOR_ARCHITECTURE
    _glorot_uniform = ("embeddings_project", "head.out")
    _zero_init = ("embeddings_delta",)

    def __init__(self, config: ElectraModelConfig, embeddings: Optional[ElectraEmbeddings] = None,
                 gdes: bool = False):
        super().__init__(config, embeddings)
        self.head = RTDHead(config.hidden_size)
        self.embeddings_delta = ElectraEmbeddings(config) if gdes else None
        self.init_weights()

    @property
    def gdes(self) -> bool:
        """Whether the discriminator reads `stopgrad(shared embeddings) + embeddings_delta`."""
        return self.embeddings_delta is not None

    def embed(self, input_ids, token_type_ids):
        return self.embeddings(input_ids, token_type_ids, self.embeddings_delta)

    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """`gelu(dense(hidden))`: what the final `head.out` projection (or a fused projection + loss) reads."""
        return self.head.features(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replaced-token logits `[B, L]`."""
        return self.head(self.encode(input_ids, attention_mask, token_type_ids))


def num_parameters(module: nn.Module) -> int:
    """Distinct parameters (shared embeddings counted once)."""
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared one once


__all__ = ["ElectraEmbeddings", "EncoderLayer", "Generator", "Discriminator", "num_parameters"]
