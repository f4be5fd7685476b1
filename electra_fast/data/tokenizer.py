"""BERT WordPiece tokenizers through Hugging Face `tokenizers`: load one, train one, save one beside a model.

Special tokens are BERT's: [PAD] [UNK] [CLS] [SEP] [MASK]. Their ids come from the vocabulary (0-4 for a
tokenizer trained here, 0/100/101/102/103 for BERT's `vocab.txt`), never from constants.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterable

from electra_fast.checks import check_int
from electra_fast.errors import InputError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise InputError("the Hugging Face `tokenizers` package is needed: pip install tokenizers") from None
    return tokenizers


def _bert_tokenizer(model, lowercase: bool):
    """BERT's pipeline around a WordPiece `model`: normaliser, pre-tokenizer, decoder and [CLS]/[SEP] template."""
    tk = _tokenizers()
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok = tk.Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_bert_post_processor(tok):
    # [CLS] A [SEP] (B [SEP]) with segment ids 0/1, so the saved tokenizer.json encodes pairs as BERT does.
    from tokenizers.processors import TemplateProcessing

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def load_tokenizer(path: str, lowercase: bool = True):
    """A `tokenizers.Tokenizer` from `tokenizer.json`, a BERT `vocab.txt`, or a directory holding either."""
    tk = _tokenizers()
    if os.path.isdir(path):
        for name in (TOKENIZER_FILE, "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), lowercase)
        raise InputError(f"tokenizer directory {path!r} holds neither tokenizer.json nor vocab.txt: "
                         "pass one of them, or leave --tokenizer out to train one on the data")
    if not os.path.isfile(path):
        raise InputError(f"tokenizer {path!r} does not exist: pass a tokenizer.json or vocab.txt, "
                         "or leave --tokenizer out to train one on the data")
    try:
        if path.endswith(".json"):
            tok = tk.Tokenizer.from_file(path)
        else:
            tok = _bert_tokenizer(tk.models.WordPiece.from_file(path, unk_token="[UNK]"), lowercase)
            tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
            if tok.token_to_id("[CLS]") is not None and tok.token_to_id("[SEP]") is not None:
                _add_bert_post_processor(tok)
    except Exception as e:  # the Rust side raises plain Exception on malformed files
        raise InputError(f"cannot read tokenizer {path!r} ({str(e).splitlines()[0]}): "
                         "pass a valid tokenizer.json or vocab.txt") from None
    special_ids(tok, path)  # fail now, not halfway through a run
    return tok


def tokenizer_from_str(text: str):
    """A tokenizer from its `tokenizer.json` text (as stored in training checkpoints)."""
    return _tokenizers().Tokenizer.from_str(text)


def train_tokenizer(lines: Iterable[str], vocab_size: int = 30522, lowercase: bool = True, min_frequency: int = 2):
    """Train a BERT WordPiece tokenizer on `lines` (streamed). Special tokens get ids 0-4, [PAD] = 0."""
    tk = _tokenizers()
    _check_vocab_size(vocab_size)
    tok = _bert_tokenizer(tk.models.WordPiece(unk_token="[UNK]"), lowercase)
    trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                           special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    return _train(tok, trainer, lines)


def _check_vocab_size(vocab_size: int) -> None:
    check_int(vocab_size, "--vocab-size", low=len(SPECIAL_TOKENS) + 1, error=InputError)


def _train(tok, trainer, lines: Iterable[str]):
    """Train `tok` on the non-blank `lines`, then add BERT's [CLS] A [SEP] template."""
    tok.train_from_iterator((l for l in lines if l.strip()), trainer=trainer)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise InputError("the data holds no text to train a tokenizer on: pass non-empty text files")
    return _add_bert_post_processor(tok)


def special_ids(tok, where: str = "tokenizer") -> Dict[str, int]:
    """`{"pad": id, "unk": ..., "cls": ..., "sep": ..., "mask": ...}`; an error if one is missing."""
    ids = {t.strip("[]").lower(): tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t in SPECIAL_TOKENS if ids[t.strip("[]").lower()] is None]
    if missing:
        raise InputError(f"{where} lacks the special token(s) {missing}: use a BERT-style WordPiece vocabulary "
                         f"with {list(SPECIAL_TOKENS)}")
    return ids


def open_tokenizer(tokenizer):
    """A path (tokenizer.json, vocab.txt, a directory) read as a `tokenizers.Tokenizer` with BERT's special tokens,
    else, where a transformers `tokenizer_config.json` names them by role, as transformers' `AutoTokenizer`; a
    tokenizer object as it is."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = os.fspath(tokenizer)
    try:
        return load_tokenizer(path)
    except ValueError:  # not BERT's special tokens
        if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            raise
        from electra_fast.model.hf_format import require_transformers

        return require_transformers().AutoTokenizer.from_pretrained(path)


def tokenizer_ids(tokenizer) -> dict:
    """`{"vocab_size", "mask_token_id", "special_token_ids", "pad_token_id"}` from a tokenizer.

    `tokenizer`: a `tokenizers.Tokenizer` or a path (tokenizer.json, vocab.txt, or a directory holding one, as
    `save_tokenizer` writes) with BERT's special tokens, whose ids never masked are [PAD], [CLS], [SEP] and [MASK]
    ([UNK] stays maskable, as in the reference); or a transformers tokenizer, whose special tokens other than its
    unknown token are never masked.
    """
    tokenizer = open_tokenizer(tokenizer)
    if hasattr(tokenizer, "all_special_ids"):  # transformers
        missing = [name for name in ("mask_token_id", "pad_token_id") if getattr(tokenizer, name, None) is None]
        if missing:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no {' or '.join(missing)}: ELECTRA needs a "
                             "mask and a padding token; pass mask_token_id=, special_token_ids=, pad_token_id=")
        return {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id,
                "special_token_ids": sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}),
                "pad_token_id": tokenizer.pad_token_id}
    if not hasattr(tokenizer, "token_to_id"):
        raise TypeError("tokenizer must be a tokenizers.Tokenizer, a transformers tokenizer or a path, got "
                        f"{type(tokenizer).__name__}")
    ids = special_ids(tokenizer)
    return {"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "mask_token_id": ids["mask"],
            "special_token_ids": [ids[k] for k in ("pad", "cls", "sep", "mask")], "pad_token_id": ids["pad"]}


def vocab_fingerprint(tok) -> str:
    """A short hash of the vocabulary: data, tokenizer and model must agree on it, not just on its size."""
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_tokenizer(tok, directory: str) -> None:
    """Write `tokenizer.json` and a `tokenizer_config.json` that transformers' AutoTokenizer reads: a WordPiece
    tokenizer as an `ElectraTokenizer` with its `vocab.txt`, any other (e.g. Unigram) as a
    `PreTrainedTokenizerFast` over `tokenizer.json` alone."""
    os.makedirs(directory, exist_ok=True)
    text = tok.to_str()
    _atomic_write(os.path.join(directory, TOKENIZER_FILE), text)
    spec = json.loads(text)
    config = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
              "mask_token": "[MASK]", "model_max_length": 512}
    if (spec.get("model") or {}).get("type") == "WordPiece":
        vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        _atomic_write(os.path.join(directory, "vocab.txt"), "".join(t + "\n" for t, _ in vocab))
        normalizer = spec.get("normalizer") or {}
        config = {"tokenizer_class": "ElectraTokenizer", "do_lower_case": bool(normalizer.get("lowercase", True)),
                  **config}
    else:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    _atomic_write(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")


def train_unigram_tokenizer(lines: Iterable[str], vocab_size: int = 128000, lowercase: bool = False):
    """Train a SentencePiece-style Unigram tokenizer on `lines` (DeBERTa-v3's kind: NFKC, word starts marked with
    "▁", cased by default) with BERT's special tokens at ids 0-4 ([PAD] = 0) and its [CLS] A [SEP] template."""
    tk = _tokenizers()
    from tokenizers import decoders, normalizers, pre_tokenizers

    _check_vocab_size(vocab_size)
    tok = tk.Tokenizer(tk.models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = tk.trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                         unk_token="[UNK]", show_progress=False)
    return _train(tok, trainer, lines)
