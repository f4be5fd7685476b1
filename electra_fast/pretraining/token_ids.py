"""The token ids masking needs ([MASK], the ids never masked, [PAD]): from a tokenizer or the caller, never from a
default, since BERT's ids are ordinary tokens of any other vocabulary. Reading them from a tokenizer is
`electra_fast.data.tokenizer.tokenizer_ids`; this module resolves them against the ones given and the model."""
from __future__ import annotations

import os
from typing import Optional

from electra_fast.data.tokenizer import tokenizer_ids
from electra_fast.data.word_starts import word_starts_from_vocab
from electra_fast.pretraining.rtd_step import check_masking

ID_KWARGS = ("mask_token_id", "special_token_ids", "pad_token_id")


def require_ids(ids: dict, names=ID_KWARGS) -> None:
    """An error naming every id of `names` that `ids` lacks (or holds as None), and how to give them."""
    missing = [n for n in names if ids.get(n) is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} must be given: no default fits every vocabulary (BERT's ids are ordinary tokens "
            "of others). Pass tokenizer= (a tokenizers.Tokenizer, a transformers tokenizer, or the path of a "
            "tokenizer.json / vocab.txt / directory holding one), or the ids: mask_token_id=<id of [MASK]>, "
            "special_token_ids=<ids never masked: [PAD], [CLS], [SEP], [MASK]>, pad_token_id=<id of [PAD]> "
            "(for BERT's uncased vocabulary: mask_token_id=103, special_token_ids=[0, 101, 102, 103], pad_token_id=0)")


def resolve_ids(tokenizer, mask_token_id, special_token_ids, pad_token_id) -> tuple:
    """`(ids, tokenizer_vocab)`: the token ids from `tokenizer` (if any), overridden by those given; all required."""
    ids = tokenizer_ids(tokenizer) if tokenizer is not None else {}
    tokenizer_vocab = ids.pop("vocab_size", None)
    given = {"mask_token_id": mask_token_id, "special_token_ids": special_token_ids, "pad_token_id": pad_token_id}
    ids.update({k: v for k, v in given.items() if v is not None})
    require_ids(ids)
    return ids, tokenizer_vocab


def check_tokenizer_fits(tokenizer_vocab: Optional[int], vocab_size: int) -> None:
    """A tokenizer with more tokens than the model's vocabulary is an error (None: no tokenizer, nothing to check)."""
    if tokenizer_vocab is not None and tokenizer_vocab > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens, more than the model's vocab_size={vocab_size}: "
                         "pass the model's own tokenizer (or a larger vocab_size)")


def word_start_table(masking: str, tokenizer, given=None):
    """The `[V]` word-start lookup whole-word masking reads (`ElectraPretrainer(vocab_word_starts=)`): `given` if
    any, else built from `tokenizer` when `masking` is "whole_word" (else None: the other maskings need none)."""
    if given is not None or check_masking(masking) != "whole_word" or tokenizer is None:
        return given
    return word_starts_from_vocab(tokenizer)


def tokenizer_beside(directory: str) -> Optional[str]:
    """A tokenizer saved with a checkpoint pair: in `directory`, or in its generator/ or discriminator/."""
    for sub in ("", "generator", "discriminator"):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(directory, sub, name)):
                return os.path.join(directory, sub)
    return None


__all__ = ["tokenizer_ids", "resolve_ids", "require_ids", "check_tokenizer_fits", "tokenizer_beside", "ID_KWARGS",
           "word_start_table"]
