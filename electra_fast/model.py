"""The slim ELECTRA model: one BERT-style encoder, a generator (MLM) and a discriminator (RTD), in one file.

Design (SPEC sections 1-3):
- ELECTRA's embedding scheme: word, position and token-type embeddings plus the embedding LayerNorm live in one
  `ElectraEmbeddings` module that the generator and the discriminator share (pass the same instance to both);
  each model owns its `embeddings_project` (E -> H) when E differs from its hidden size. Optional GDES
  (DeBERTa-v3): the discriminator reads `stopgrad(E_gen) + E_delta` for the word embeddings.
- Attention is `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU) over one fused QKV
  projection (a single Linear of width 3H); `electra_fast.hf` splits it into transformers' query/key/value.
- The generator's LM head runs only at gathered slots (`Generator.forward(..., positions=)` or
  `encode` + `electra_fast.ops.masked_gather` + `lm_logits`), never at all L positions.
- bf16 under autocast: nothing here forces a dtype; the additive attention mask takes the query's dtype and
  uses a finite fill so a row with no real token gives a uniform softmax, not NaN.
GELU is the erf form, LayerNorm eps 1e-12, weights drawn from N(0, 0.02), as the reference and transformers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from electra_fast.ops import masked_gather


@dataclass
class ElectraModelConfig:
    """Shape and regularisation of one ELECTRA encoder (generator or discriminator).

    Field names follow `transformers.ElectraConfig` so configs convert one to one (`electra_fast.hf`).
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

    def __post_init__(self):
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size must be a multiple of num_attention_heads ({self.num_attention_heads}), "
                             f"got {self.hidden_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

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
        mask_prob=0.15, lr=1e-3, batch_size=16, seq_len=64),
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
        self.word = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                word_delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        if word_delta is None:
            x = self.word(input_ids)
        else:  # GDES: the RTD loss reaches only the delta, the MLM loss only the shared table
            pad = self.word.padding_idx
            x = F.embedding(input_ids, self.word.weight.detach(), pad) + F.embedding(input_ids, word_delta, pad)
        # A slice and a broadcast row instead of index lookups: the common case has no token types at all.
        x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        x = x + self.position.weight[: input_ids.shape[1]]
        return self.norm(x)


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

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        b, l, h = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        x = self.attn_norm(x + self.dropout(self.attn_out(a.transpose(1, 2).reshape(b, l, h))))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


def attention_bias(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`[B, L]` 1/0 mask -> additive `[B, 1, 1, L]` bias (None stays None, so SDPA may pick flash attention).

    -1e4 rather than -inf or finfo.min: exp(-1e4) is exactly 0 in fp32, it fits fp16/bf16, and it cannot
    overflow to -inf when added to a score, so a row without any real key gives a uniform softmax, not NaN.
    """
    if attention_mask is None:
        return None
    return ((attention_mask == 0).float() * -1e4)[:, None, None, :]


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
        """Final hidden states `[B, L, H]`. `attention_mask` None means every token is real (fastest path)."""
        # Dropout on the E-dim embeddings, before the projection, as the reference and transformers do.
        x = self.dropout(self.embed(input_ids, token_type_ids))
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        bias = attention_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def init_weights(self) -> None:
        """N(0, initializer_range) for Linear/Embedding weights, zero biases, LayerNorm 1/0, zero pad row.

        Embeddings passed in by the caller (shared with the other model) are left as they are.
        """
        std = self.config.initializer_range
        for name, m in self.named_modules():
            if not self._owns_embeddings and name.split(".")[0] == "embeddings":
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def save_pretrained(self, directory) -> None:
        """Write `config.json` + `model.safetensors` in transformers' format (see `electra_fast.hf`)."""
        from electra_fast import hf

        hf.save(self, directory)

    @classmethod
    def from_pretrained(cls, path, embeddings: Optional[ElectraEmbeddings] = None, **kwargs):
        """Load a transformers-format checkpoint (ours or one written by transformers' `save_pretrained`)."""
        from electra_fast import hf

        return hf.load(cls, path, embeddings=embeddings, **kwargs)


def _check_embeddings(embeddings: ElectraEmbeddings, config: ElectraModelConfig) -> None:
    got = (embeddings.word.num_embeddings, embeddings.word.embedding_dim, embeddings.position.num_embeddings,
           embeddings.token_type.num_embeddings)
    want = (config.vocab_size, config.embedding_size, config.max_position_embeddings, config.type_vocab_size)
    if got != want:
        raise ValueError("embeddings must match the config's (vocab_size, embedding_size, max_position_embeddings, "
                         f"type_vocab_size) = {want}, got {got}")


class GeneratorHead(nn.Module):
    """dense(H_g -> E) -> gelu -> LayerNorm(E); the logits reuse the word embeddings plus this bias."""

    def __init__(self, config: ElectraModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class Generator(_Encoder):
    """The ELECTRA generator: a small masked-LM whose output layer is tied to the shared word embeddings."""

    def __init__(self, config: ElectraModelConfig, embeddings: Optional[ElectraEmbeddings] = None):
        super().__init__(config, embeddings)
        self.head = GeneratorHead(config)
        self.init_weights()

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on any `[..., H_g]` hidden states -> `[..., V]` logits."""
        h = self.head.norm(F.gelu(self.head.dense(hidden)))
        return F.linear(h, self.embeddings.word.weight, self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits `[B, N, V]` at `positions [B, N]` (the masked slots), or `[B, L, V]` when positions is None."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if positions is not None:
            hidden = masked_gather(hidden, positions)
        return self.lm_logits(hidden)


class DiscriminatorHead(nn.Module):
    """dense(H -> H) -> gelu -> dense(H -> 1)."""

    def __init__(self, config: ElectraModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, 1)


class Discriminator(_Encoder):
    """The ELECTRA discriminator: an encoder and a per-token "was this token replaced?" logit.

    `gdes=True` adds a zero-initialised `word_delta` so the word embeddings it reads are
    `stopgrad(shared) + word_delta` (gradient-disentangled embedding sharing, DeBERTa-v3).
    """

    def __init__(self, config: ElectraModelConfig, embeddings: Optional[ElectraEmbeddings] = None,
                 gdes: bool = False):
        super().__init__(config, embeddings)
        self.head = DiscriminatorHead(config)
        self.init_weights()
        delta = nn.Parameter(torch.zeros(config.vocab_size, config.embedding_size)) if gdes else None
        self.register_parameter("word_delta", delta)

    def embed(self, input_ids, token_type_ids):
        return self.embeddings(input_ids, token_type_ids, self.word_delta)

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
