"""The slim ELECTRA model: one BERT-style encoder, a generator (MLM) and a discriminator (RTD), in one file.

Design (SPEC sections 1-3):
- ELECTRA's embedding scheme: word, position and token-type embeddings plus the embedding LayerNorm live in one
  `ElectraEmbeddings` module that the generator and the discriminator share (pass the same instance to both);
  each model owns its `embeddings_project` (E -> H) when E differs from its hidden size. Optional GDES
  (DeBERTa-v3): the discriminator reads `stopgrad(E_gen) + E_delta` for every one of those parameters.
- Attention (`electra_fast.model.attention`) over one fused QKV projection (a single Linear of width 3H;
  `electra_fast.io.hf` splits it into transformers' query/key/value): SDPA without any mask when `attention_mask`
  is None (flash on GPU), else the padding mask built once per forward for all layers (`attention_impl`; where
  flash runs, its variable-length kernel, each row's real tokens first for the whole layer stack).
- The generator's LM head runs only at gathered slots (`Generator.forward(..., positions=)` or
  `encode` + `electra_fast.ops.masked_gather` + `lm_logits`), never at all L positions.
- The vocabulary is padded inside the model to `padded_vocab_size` (a multiple of `pad_vocab_multiple`, 128 by
  default) so the logits' row stride is a multiple of 16 elements and the MLM kernels can use 16-byte loads. The
  padded rows of the word table (and of the GDES delta and the generator's output bias) start at zero and, since
  no id reaches them and the MLM loss ignores logit columns >= vocab_size, never get a gradient, so weight decay
  keeps them at exactly zero. `vocab_size` is always the logical size; `electra_fast.io.hf` slices on export and pads
  on import, so checkpoints hold the logical vocabulary only.
- bf16 under autocast: each encoder layer casts its parameters in one launch and runs in bf16, LayerNorm
  included (fp32 statistics); fp32 master weights and gradients are untouched (`electra_fast.model.layers`).
GELU is the erf form, LayerNorm eps 1e-12, as the reference and transformers; weights initialised as the reference
does (truncated normal, Glorot for two layers) or as transformers does (`ElectraModelConfig.initializer`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from electra_fast.model.attention import PaddingMask, VarlenMask, attend, attention_bias, padding_mask
from electra_fast.model.layers import autocast_parameters, compute_dtype, dropout_seed, residual_layer_norm
from electra_fast.ops import masked_gather


INITIALIZERS = ("reference", "normal")


@dataclass
class ElectraModelConfig:
    """Shape and regularisation of one ELECTRA encoder (generator or discriminator).

    Field names follow `transformers.ElectraConfig` so configs convert one to one (`electra_fast.io.hf`).
    """
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    pad_vocab_multiple: int = 128  # rows of the vocabulary tables: vocab_size rounded up to this (1: no padding)
    # Weight init (`_Encoder.init_weights`). "reference": google-research/electra's, the default because this
    # library trains from scratch and its job is the reference's pretraining: every weight from
    # tf.truncated_normal_initializer(initializer_range) (N(0, 0.02) redrawn beyond 2 std, so std 0.02 * 0.8796),
    # except the layers built with tf.layers.dense's default Glorot-uniform kernel: the discriminator's final
    # dense(H -> 1) and each model's embeddings_project. "normal": transformers' `_init_weights`, N(0, 0.02)
    # everywhere; what matters there is loading a checkpoint, not the init. Both: zero biases, LayerNorm 1/0,
    # zero pad row (padding_idx; no real token reads it) and zero padded vocabulary rows.
    initializer: str = "reference"

    def __post_init__(self):
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "pad_vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size must be a multiple of num_attention_heads ({self.num_attention_heads}), "
                             f"got {self.hidden_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"initializer must be one of {INITIALIZERS}, got {self.initializer!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the word embedding, the GDES delta and the generator's output bias (and width of its logits):
        `vocab_size` rounded up to a multiple of `pad_vocab_multiple`."""
        return -(-self.vocab_size // self.pad_vocab_multiple) * self.pad_vocab_multiple

    def replace(self, **changes) -> "ElectraModelConfig":
        return dataclasses.replace(self, **changes)


# Reference `util/training_utils.py` / `configure_pretraining.py` (SPEC 2). "discriminator": its config fields
# (vocab_size and pad_token_id come from the tokenizer); "generator": what differs from the discriminator (the
# generator keeps the discriminator's layer count, embeddings and everything else).
PRESETS: dict[str, dict] = {
    "tiny": dict(  # for tests: ~33k parameters per discriminator layer, a step takes milliseconds on a CPU
        discriminator=dict(embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128),
        generator=dict(hidden_size=32, num_attention_heads=1, intermediate_size=64),
        # lr: tuned for the demo (1000 steps of `electra-fast pretrain`, measured on held-out rows): at 1e-3 and 5e-4
        # the generator outpaces a discriminator this small (ROC-AUC ~0.65 and 0.74, +0.000 and +0.005 accuracy over
        # labelling every token original); at 3e-4, 0.88 and +0.032.
        mask_prob=0.15, lr=3e-4, batch_size=16, seq_len=64),
    "small": dict(
        discriminator=dict(embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                           intermediate_size=1024),
        generator=dict(hidden_size=64, num_attention_heads=1, intermediate_size=256),
        mask_prob=0.15, lr=5e-4, batch_size=128, seq_len=128),
    "base": dict(
        discriminator=dict(embedding_size=768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072),
        generator=dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024),
        mask_prob=0.15, lr=2e-4, batch_size=256, seq_len=512),
    "large": dict(
        discriminator=dict(embedding_size=1024, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096),
        generator=dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024),
        mask_prob=0.25, lr=2e-4, batch_size=2048, seq_len=512),
}
GENERATOR_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size")


def preset_configs(name: str, *, vocab_size: int = 30522, pad_token_id: int = 0, generator: Optional[dict] = None,
                   **overrides) -> tuple[ElectraModelConfig, ElectraModelConfig]:
    """`(generator_config, discriminator_config)` for a preset.

    `overrides` are `ElectraModelConfig` fields for the discriminator (shared fields such as `embedding_size`
    or `num_hidden_layers` reach the generator too); `generator` overrides the generator's own
    `hidden_size` / `num_attention_heads` / `intermediate_size`.
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(ElectraModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown ElectraModelConfig field(s) {sorted(unknown)}; expected some of {sorted(fields)}")
    gen_changes = {**PRESETS[name]["generator"], **(generator or {})}
    bad = set(gen_changes) - set(GENERATOR_FIELDS)
    if bad:
        raise TypeError(f"generator overrides must be among {GENERATOR_FIELDS}, got {sorted(bad)}")
    disc = ElectraModelConfig(vocab_size=vocab_size, pad_token_id=pad_token_id,
                              **{**PRESETS[name]["discriminator"], **overrides})
    return disc.replace(**gen_changes), disc


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
        else:  # two lookups rather than one into `word + delta`: no [V, E] sum per step
            x = F.embedding(input_ids, self.word.weight.detach(), pad) + F.embedding(input_ids, delta.word.weight, pad)
            position = self.position.weight[:l].detach() + delta.position.weight[:l]
            token_type = self.token_type.weight.detach() + delta.token_type.weight
            weight, bias = self.norm.weight.detach() + delta.norm.weight, self.norm.bias.detach() + delta.norm.bias
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
                salt: int = 0) -> torch.Tensor:
        """`x [B, L, H]` and the encoder's `attention.padding_mask(...)` (built once for all layers); `seed`, `salt`:
        the encoder's `layers.dropout_seed` and this layer's two salts `salt`, `salt + 1`."""
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
        x = residual_layer_norm(F.linear(a.reshape(b, l, h), wo, bo), x, g1, b1, p, eps, train, seed, salt)
        return residual_layer_norm(F.linear(F.gelu(F.linear(x, wi, bi)), wf, bf), x, g2, b2, p, eps, train, seed,
                                   salt + 1)


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
        self.attention_impl = "auto"  # or "sdpa" (dense additive mask), "varlen", "flex": electra_fast.model.attention

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
        mask = padding_mask(attention_mask, self.attention_impl,
                            dtype=compute_dtype(x.device.type, self.layers[0].qkv.weight.dtype),
                            dropout=self.training and cfg.attention_probs_dropout_prob > 0,
                            head_dim=cfg.hidden_size // cfg.num_attention_heads)
        varlen = isinstance(mask, VarlenMask)
        if varlen:  # real tokens first in every row, for all layers (electra_fast.model.attention, "varlen")
            x = mask.pack(x)
        seed = dropout_seed(x, cfg.hidden_dropout_prob, self.training)  # one draw for every layer
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, seed, 2 * i)
        return mask.unpack(x) if varlen else x

    # initializer="reference": the layers google-research/electra builds with tf.layers.dense's default kernel
    # initializer (Glorot uniform) instead of its truncated normal.
    _glorot_uniform: tuple = ("embeddings_project",)
    _zero_init: tuple = ()  # submodules whose parameters all start at zero

    def init_weights(self) -> None:
        """Linear/Embedding weights as `config.initializer` says: "reference", N(0, initializer_range) truncated
        at 2 std, Glorot uniform for `_glorot_uniform` layers; "normal", N(0, initializer_range). Zero biases,
        LayerNorm 1/0, zero pad row, zero padded vocabulary rows (>= vocab_size), zero `_zero_init` modules.

        Embeddings passed in by the caller (shared with the other model) are left as they are.
        """
        std, reference = self.config.initializer_range, self.config.initializer == "reference"
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
        """Write `config.json` + `model.safetensors` in transformers' format (see `electra_fast.io.hf`)."""
        from electra_fast.io import hf

        hf.save(self, directory)

    @classmethod
    def from_pretrained(cls, path, embeddings: Optional[ElectraEmbeddings] = None, **kwargs):
        """Load a transformers-format checkpoint (ours or one written by transformers' `save_pretrained`)."""
        from electra_fast.io import hf

        return hf.load(cls, path, embeddings=embeddings, **kwargs)


def _check_embeddings(embeddings: ElectraEmbeddings, config: ElectraModelConfig) -> None:
    got = (embeddings.word.num_embeddings, embeddings.word.embedding_dim, embeddings.position.num_embeddings,
           embeddings.token_type.num_embeddings)
    want = (config.padded_vocab_size, config.embedding_size, config.max_position_embeddings, config.type_vocab_size)
    if got != want:
        raise ValueError("embeddings must match the config's (padded_vocab_size, embedding_size, "
                         f"max_position_embeddings, type_vocab_size) = {want}, got {got}")


class GeneratorHead(nn.Module):
    """dense(H_g -> E) -> gelu -> LayerNorm(E); the logits reuse the word embeddings plus this bias."""

    def __init__(self, config: ElectraModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))


class Generator(_Encoder):
    """The ELECTRA generator: a small masked-LM whose output layer is tied to the shared word embeddings."""

    def __init__(self, config: ElectraModelConfig, embeddings: Optional[ElectraEmbeddings] = None):
        super().__init__(config, embeddings)
        self.head = GeneratorHead(config)
        self.init_weights()

    def lm_head_parts(self, hidden: torch.Tensor):
        """`(features, weight, bias)` with `lm_logits(hidden) = F.linear(features, weight, bias)`: what the fused
        `ops.lm_head_loss_and_sample` takes (weight: the tied word table)."""
        return self.head.norm(F.gelu(self.head.dense(hidden))), self.embeddings.word.weight, self.head.bias

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
            hidden = masked_gather(hidden, positions)
        return self.lm_logits(hidden)[..., : self.config.vocab_size]


class DiscriminatorHead(nn.Module):
    """dense(H -> H) -> gelu -> dense(H -> 1)."""

    def __init__(self, config: ElectraModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, 1)


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
    _glorot_uniform = ("embeddings_project", "head.out")
    _zero_init = ("embeddings_delta",)

    def __init__(self, config: ElectraModelConfig, embeddings: Optional[ElectraEmbeddings] = None,
                 gdes: bool = False):
        super().__init__(config, embeddings)
        self.head = DiscriminatorHead(config)
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
        return F.gelu(self.head.dense(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replaced-token logits `[B, L]`."""
        features = self.head_features(self.encode(input_ids, attention_mask, token_type_ids))
        return self.head.out(features).squeeze(-1)


def num_parameters(module: nn.Module) -> int:
    """Distinct parameters (shared embeddings counted once)."""
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared one once


__all__ = ["ElectraModelConfig", "PRESETS", "preset_configs", "ElectraEmbeddings", "Generator", "Discriminator",
           "num_parameters", "attention_bias"]
