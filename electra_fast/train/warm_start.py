"""Warm starts (`electra-fast pretrain --init-from DIR`): continue pretraining from transformers checkpoints.

`DIR` holds a pair, `generator/` + `discriminator/` (as `ElectraPretrainer.save_pretrained` and `electra-fast
export` write them, or two transformers `save_pretrained` outputs), or a discriminator alone (`DIR` or
`DIR/discriminator` with its config.json): the generator is then fresh, sized from the discriminator by the
preset's generator-to-discriminator width ratio (1/2 for tiny, 1/4 for small, 1/3 for base and large). A tokenizer
saved with the checkpoints (tokenizer.json or vocab.txt in `DIR`, `DIR/generator` or `DIR/discriminator`) is the
run's tokenizer, so the embeddings keep their meaning. Only the weights come from `DIR`: the optimizer, the
schedule and the step count start afresh (`--resume` continues a run of this library with all of them).
"""
from __future__ import annotations

import os
from typing import Optional

from electra_fast.errors import InputError
from electra_fast.model.config import PRESETS
from electra_fast.model.encoder import Discriminator, Generator
from electra_fast.pretraining.pretrainer import ElectraPretrainer
from electra_fast.pretraining.token_ids import tokenizer_beside, tokenizer_ids


def _discriminator_dir(directory: str) -> Optional[str]:
    for path in (os.path.join(directory, "discriminator"), directory):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    return None


def init_tokenizer(directory: str) -> Optional[str]:
    """The tokenizer saved with the checkpoints in `directory` (a directory holding it), or None."""
    if not os.path.isdir(directory):
        raise InputError(f"--init-from {directory!r} is not a directory: pass one holding generator/ and "
                         "discriminator/ (e.g. a run's output or `electra-fast export` -o), or a discriminator")
    return tokenizer_beside(directory)


def init_model(directory: str, preset: str, tok, *, mask_prob: float, gdes: bool = False,
               masking: str = "distinct", **settings) -> ElectraPretrainer:
    """The pretrainer to continue from `directory` (see the module docstring), masking with `tok`'s ids;
    `settings`: `ElectraPretrainer`'s other keyword arguments (`options`, `validate`, ...)."""
    disc_dir = _discriminator_dir(directory)
    if disc_dir is None:
        raise InputError(f"--init-from {directory!r} holds no discriminator (config.json in it or in its "
                         "discriminator/): pass a run's output, an `electra-fast export` -o, or a transformers "
                         "ElectraForPreTraining directory")
    ids = tokenizer_ids(tok)
    vocab_size = ids.pop("vocab_size")
    settings = dict(settings, mask_prob=mask_prob, masking=masking, **({"gdes": True} if gdes else {}))
    try:
        if os.path.isfile(os.path.join(directory, "generator", "config.json")):
            model = ElectraPretrainer.from_pretrained(directory, tokenizer=tok, **settings)
        else:
            discriminator = Discriminator.from_pretrained(disc_dir, pad_token_id=ids["pad_token_id"])
            c = discriminator.config
            shape = PRESETS[preset]
            ratio = shape["generator"]["hidden_size"] / shape["discriminator"]["hidden_size"]
            heads = max(1, round(c.num_attention_heads * ratio))
            hidden = max(heads, round(c.hidden_size * ratio) // heads * heads)
            generator = Generator(c.replace(hidden_size=hidden, num_attention_heads=heads,
                                            intermediate_size=max(1, round(c.intermediate_size * ratio))))
            model = ElectraPretrainer(generator, discriminator, mask_token_id=ids["mask_token_id"],
                                      special_token_ids=ids["special_token_ids"], **settings)
    except (ValueError, TypeError, OSError) as e:
        raise InputError(f"--init-from {directory!r} cannot be loaded: {e}") from None
    if model.vocab_size < vocab_size:
        raise InputError(f"--init-from {directory!r} has a vocabulary of {model.vocab_size} tokens, the run's "
                         f"tokenizer {vocab_size}: save the checkpoints' tokenizer beside them, or pass it as "
                         "--tokenizer")
    return model


__all__ = ["init_model", "init_tokenizer"]
