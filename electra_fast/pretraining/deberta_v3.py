"""The DeBERTa-v3 recipe (He et al. 2021, arXiv 2111.09543): a `DebertaV2ForMaskedLM` generator of half the
depth, a `DebertaV2Model` discriminator with ELECTRA's RTD head, GDES, RTD weight 50, mask_prob 0.15.

`ElectraPretrainer.from_deberta_v3` builds the pretrainer from `deberta_v3_recipe`; this module knows the models
and the settings, not the pretrainer (which imports it).
"""
from __future__ import annotations

from typing import Optional

from electra_fast.checks import check_choice
from electra_fast.model.hf_format import require_transformers
from electra_fast.pretraining.families.rtd_head import RTDDiscriminator
from electra_fast.pretraining.rtd_step import STEP_KWARGS
from electra_fast.pretraining.token_ids import check_tokenizer_fits, resolve_ids, word_start_table

# The paper's sizes; the generator has half the discriminator's depth and its width. "tiny" is ours, for tests.
# Vocabulary: the tokenizer's (the paper's is a 128k SentencePiece model).
DEBERTA_V3_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "xsmall": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "small": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
# What every released DeBERTa-v3 config.json sets: relative attention (c2p + p2c, log buckets), no absolute
# positions, no token types.
DEBERTA_V3_CONFIG = dict(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                         max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                         type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu", max_position_embeddings=512,
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)
# The recipe's pretrainer settings; the caller's win.
DEBERTA_V3_SETTINGS = {"mask_prob": 0.15, "disc_weight": 50.0}


def deberta_v3_models(preset: str, *, vocab_size: int, pad_token_id: int, generator_layers: Optional[int] = None,
                      **overrides) -> tuple:
    """`(DebertaV2ForMaskedLM generator, RTDDiscriminator(DebertaV2Model))`, fresh, sized by
    `DEBERTA_V3_PRESETS[preset]`; `overrides`: `DebertaV2Config` fields for both; `generator_layers` defaults to
    half the discriminator's depth."""
    check_choice(preset, "preset", sorted(DEBERTA_V3_PRESETS))
    tf = require_transformers()
    fields = {**DEBERTA_V3_CONFIG, **DEBERTA_V3_PRESETS[preset], **overrides}
    disc_cfg = tf.DebertaV2Config(vocab_size=vocab_size, pad_token_id=pad_token_id, **fields)
    layers = max(1, fields["num_hidden_layers"] // 2) if generator_layers is None else generator_layers
    gen_cfg = tf.DebertaV2Config(vocab_size=vocab_size, pad_token_id=pad_token_id,
                                 **{**fields, "num_hidden_layers": layers})
    return tf.DebertaV2ForMaskedLM(gen_cfg), RTDDiscriminator(tf.DebertaV2Model(disc_cfg))


def deberta_v3_recipe(preset: str, *, tokenizer=None, vocab_size: Optional[int] = None,
                      mask_token_id: Optional[int] = None, special_token_ids=None, pad_token_id: Optional[int] = None,
                      gdes: bool = True, generator_layers: Optional[int] = None, **kwargs) -> tuple:
    """`(generator, discriminator, pretrainer keyword arguments)` of the recipe: `deberta_v3_models(preset)`, GDES
    on, RTD weight 50, mask_prob 0.15. Token ids from `tokenizer` or given (as `ElectraPretrainer.from_preset`);
    `kwargs`: the pretrainer's settings (`mask_prob`, `disc_weight`, `options`, `masking`, `vocab_word_starts`,
    ...) and `DebertaV2Config` fields; `masking="whole_word"` looks word starts up in the tokenizer's vocabulary
    (its "▁" marks, `word_starts_from_vocab`) unless `vocab_word_starts` is given."""
    ids, tokenizer_vocab = resolve_ids(tokenizer, mask_token_id, special_token_ids, pad_token_id)
    if vocab_size is None:
        if tokenizer_vocab is None:
            raise ValueError("vocab_size must be given when no tokenizer is")
        vocab_size = tokenizer_vocab
    check_tokenizer_fits(tokenizer_vocab, vocab_size)
    settings = {k: kwargs.pop(k) for k in STEP_KWARGS + ("options", "vocab_word_starts") if k in kwargs}
    settings["vocab_word_starts"] = word_start_table(settings.get("masking", "distinct"), tokenizer,
                                                     settings.get("vocab_word_starts"))
    generator, discriminator = deberta_v3_models(preset, vocab_size=vocab_size, pad_token_id=ids["pad_token_id"],
                                                 generator_layers=generator_layers, **kwargs)
    return generator, discriminator, dict(mask_token_id=ids["mask_token_id"],
                                          special_token_ids=ids["special_token_ids"], gdes=gdes,
                                          **{**DEBERTA_V3_SETTINGS, **settings})


__all__ = ["DEBERTA_V3_PRESETS", "DEBERTA_V3_CONFIG", "DEBERTA_V3_SETTINGS", "deberta_v3_models", "deberta_v3_recipe"]
