"""The slim encoder's configuration: `ElectraModelConfig` (shapes and regularisation), the size presets and
`preset_configs`. Field names follow `transformers.ElectraConfig` so configs convert one to one
(`electra_fast.model.hf_format`).

A config also carries `options` (`electra_fast.options.KernelOptions`: backend, sampler, attention path): how the
model runs, never what it is. They are left out of `to_dict()`, of the transformers `config.json`, of the model
specs saved in checkpoints and of config equality, so a model saved under one backend loads and compares equal
under any other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from electra_fast.checks import check_choice, check_int, check_number
from electra_fast.options import KernelOptions

# Weight init (`_Encoder.init_weights`). "truncated_normal": google-research/electra's, the default because this
# library trains from scratch and its job is the reference's pretraining: every weight from
# tf.truncated_normal_initializer(initializer_range) (N(0, 0.02) redrawn beyond 2 std, so std 0.02 * 0.8796),
# except the layers built with tf.layers.dense's default Glorot-uniform kernel: the discriminator's final
# dense(H -> 1) and each model's embeddings_project. "normal": transformers' `_init_weights`, N(0, 0.02)
# everywhere; what matters there is loading a checkpoint, not the init. Both: zero biases, LayerNorm 1/0,
# zero pad row (padding_idx; no real token reads it) and zero padded vocabulary rows.
INITIALIZERS = ("truncated_normal", "normal")
INITIALIZER_ALIASES = {"reference": "truncated_normal"}  # the older name, still read from saved configs

_POSITIVE = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings", "type_vocab_size", "pad_vocab_multiple")


@dataclass
class ElectraModelConfig:
    """Shape and regularisation of one ELECTRA encoder (generator or discriminator), plus the kernel `options`
    it runs with (not part of the saved config; see the module docstring)."""
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
    initializer: str = "truncated_normal"  # or "normal": see INITIALIZERS
    options: KernelOptions = field(default=KernelOptions(), compare=False)

    def __post_init__(self):
        for name in _POSITIVE:
            check_int(getattr(self, name), name, low=1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size must be a multiple of num_attention_heads ({self.num_attention_heads}), "
                             f"got {self.hidden_size}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) \
                or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be an int in [0, vocab_size={self.vocab_size}), got "
                             f"{self.pad_token_id!r}")
        self.initializer = check_choice(self.initializer, "initializer", INITIALIZERS, aliases=INITIALIZER_ALIASES)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check_number(getattr(self, name), name, low=0, high=1, high_open=True)
        if not isinstance(self.options, KernelOptions):
            raise TypeError(f"options must be an electra_fast.options.KernelOptions, got "
                            f"{type(self.options).__name__}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the word embedding, the GDES delta and the generator's output bias (and width of its logits):
        `vocab_size` rounded up to a multiple of `pad_vocab_multiple`."""
        return -(-self.vocab_size // self.pad_vocab_multiple) * self.pad_vocab_multiple

    def replace(self, **changes) -> "ElectraModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The saved fields (everything but `options`): what `ElectraModelConfig(**d)` rebuilds."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}


# Reference `util/training_utils.py` / `configure_pretraining.py` (docs/algorithm.md#model-sizes). "discriminator": its
# config fields (vocab_size and pad_token_id come from the tokenizer); "generator": what differs from the discriminator
# (the generator keeps the discriminator's layer count, embeddings and everything else).
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

    `overrides` are `ElectraModelConfig` fields for the discriminator (shared fields such as `embedding_size`,
    `num_hidden_layers` or `options` reach the generator too); `generator` overrides the generator's own
    `hidden_size` / `num_attention_heads` / `intermediate_size`.
    """
    check_choice(name, "preset", sorted(PRESETS))
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


__all__ = ["ElectraModelConfig", "INITIALIZERS", "INITIALIZER_ALIASES", "PRESETS", "GENERATOR_FIELDS",
           "preset_configs"]
