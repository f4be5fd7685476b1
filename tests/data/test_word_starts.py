"""Word starts for whole-word masking: the vocabulary lookup (`word_starts_from_vocab`) against each token's
`word_ids()` on real text, for WordPiece (tokenizers and transformers' BertTokenizerFast), SentencePiece-style
Unigram and byte-level BPE; special tokens words of their own; a vocabulary without markers; the collator's
`word_starts` from word ids."""
import pytest
import torch

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from electra_fast.data import ElectraDataCollator, builtin_lines, save_tokenizer, train_tokenizer  # noqa: E402
from electra_fast.data.tokenizer import train_unigram_tokenizer  # noqa: E402
from electra_fast.data.word_starts import word_starts_from_vocab, word_starts_from_word_ids  # noqa: E402

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@pytest.fixture(scope="module")
def lines():
    """Real text: the first non-blank lines of the built-in corpus (Python's documentation)."""
    return [line for line in list(builtin_lines())[:400] if line.strip()]


def by_word_ids(encoding) -> list:
    """The oracle, written from the definition: a token begins a word where its word index differs from the previous
    token's, and a token of no word (None: [CLS], [SEP]) is a word of its own."""
    out, prev = [], object()
    for w in encoding.word_ids:
        out.append(w is None or w != prev)
        prev = w
    return out


def assert_lookup_matches_word_ids(tok, table, texts, encode=None):
    table = table.tolist()
    encode = encode or tok.encode
    compared = continued = 0
    for text in texts:
        enc = encode(text)
        want = by_word_ids(enc)
        assert [table[i] for i in enc.ids] == want, text
        compared, continued = compared + len(want), continued + want.count(False)
    assert compared > 1000 and continued > 100  # real text, with many words of several tokens


def test_word_ids_helper_on_a_hand_made_row():
    # [CLS] w0 w0 w1 [SEP] w0 w1 w1 [SEP]: a pair; the second text's words restart at 0 after the [SEP]
    assert word_starts_from_word_ids([None, 0, 0, 1, None, 0, 1, 1, None]) == \
        [True, True, False, True, True, True, True, False, True]
    assert word_starts_from_word_ids([3, 3, 4]) == [True, False, True]  # a window cut inside word 3
    assert word_starts_from_word_ids([]) == []


def test_wordpiece_lookup_matches_word_ids_on_real_text(lines):
    tok = train_tokenizer(iter(lines), vocab_size=600)
    table = word_starts_from_vocab(tok)
    assert table.dtype == torch.bool and table.shape == (tok.get_vocab_size(with_added_tokens=True),)
    assert_lookup_matches_word_ids(tok, table, lines)
    vocab = tok.get_vocab()
    assert any(t.startswith("##") for t in vocab) and not any(table[i] for t, i in vocab.items() if t.startswith("##"))
    assert all(table[vocab[s]] for s in SPECIAL)


def test_bert_tokenizer_fast_from_a_vocab_file(lines, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(train_tokenizer(iter(lines), vocab_size=600), str(tmp_path))
    fast = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    table = word_starts_from_vocab(fast)
    assert table.shape == (len(fast),)
    encode = lambda text: fast._tokenizer.encode(text)  # noqa: E731  (its Encoding: ids and word_ids)
    assert_lookup_matches_word_ids(fast, table, lines, encode)
    for s in fast.all_special_ids:
        assert table[s]
    # A path reads the same vocabulary (as tokenizer_ids reads paths).
    assert torch.equal(word_starts_from_vocab(str(tmp_path / "vocab.txt")), table)


def test_unigram_sentencepiece_lookup_matches_word_ids(lines):
    tok = train_unigram_tokenizer(iter(lines), vocab_size=400)
    table = word_starts_from_vocab(tok)
    unk = tok.token_to_id("[UNK]")
    assert all(unk not in tok.encode(t).ids for t in lines[:200])  # [UNK] would be a word of its own: none here
    assert_lookup_matches_word_ids(tok, table, lines[:200])
    vocab = tok.get_vocab()
    assert sum(t.startswith("\u2581") for t in vocab) > 20 and sum(not table[i] for i in vocab.values()) > 20


def test_unigram_through_transformers_fast_tokenizer(lines):
    transformers = pytest.importorskip("transformers")
    tok = train_unigram_tokenizer(iter(lines), vocab_size=400)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    assert torch.equal(word_starts_from_vocab(fast), word_starts_from_vocab(tok))
    enc = fast(lines[:50])
    table = word_starts_from_vocab(fast).tolist()
    for i in range(50):
        assert [table[t] for t in enc["input_ids"][i]] == word_starts_from_word_ids(enc.word_ids(i))


def test_byte_level_bpe_lookup_matches_word_ids_on_words(lines):
    # Byte-level BPE: "Ġ" marks the space before a word. The GPT-2 split makes punctuation a word of its own where
    # the vocabulary glues it to the word before (documented): compare on the text's words and spaces only.
    texts = [" ".join(w for w in "".join(c if c.isalpha() else " " for c in line).split()) for line in lines]
    texts = [t for t in texts if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    table = word_starts_from_vocab(tok)
    assert_lookup_matches_word_ids(tok, table, texts)
    for s in ("<s>", "</s>", "<pad>"):
        assert table[tok.token_to_id(s)]


def test_added_tokens_are_words_of_their_own(lines):
    tok = train_tokenizer(iter(lines), vocab_size=300)
    tok.add_tokens(["##glued"])  # looks like a continuation, but an added token is cut out of the text first
    tok.add_special_tokens(["[EXTRA]"])
    table = word_starts_from_vocab(tok)
    assert table[tok.token_to_id("##glued")] and table[tok.token_to_id("[EXTRA]")]
    enc = tok.encode("the ##glued value")
    assert [bool(table[i]) for i in enc.ids] == by_word_ids(enc)


def test_a_vocabulary_without_markers_makes_every_token_a_word_and_warns():
    vocab = {"[PAD]": 0, "[UNK]": 1, "我": 2, "们": 3, "喜": 4, "欢": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    with pytest.warns(UserWarning, match="marks no word boundary.*every token is its own word"):
        table = word_starts_from_vocab(tok)
    assert table.tolist() == [True] * 6


def test_bad_tokenizer_is_named():
    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer.*got int"):
        word_starts_from_vocab(3)


# ------------------------------------------------------------------------------------------------ the collator
def test_collator_emits_word_starts_from_word_ids(lines, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(train_tokenizer(iter(lines), vocab_size=600), str(tmp_path))
    fast = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    texts = lines[10:15]
    enc = fast(texts, truncation=True, max_length=40)
    rows = [{"input_ids": enc["input_ids"][i], "word_ids": enc.word_ids(i)} for i in range(len(texts))]
    batch = ElectraDataCollator(fast, word_starts=True)(rows)
    assert batch["word_starts"].dtype == torch.bool and batch["word_starts"].shape == batch["input_ids"].shape
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["word_starts"][i, :n].tolist() == by_word_ids(enc[i])
        assert batch["word_starts"][i, n:].all()  # padding: its own word (a word swallowing it is never chosen)
    assert "word_starts" not in ElectraDataCollator(fast)(rows)  # only when asked


def test_collator_carries_a_segmenters_words(tmp_path):
    # Chinese: BERT splits every character off as a word; a segmenter's words, given as pre-split text, reach the
    # batch through word_ids, so whole-word masking takes whole words of several characters.
    transformers = pytest.importorskip("transformers")
    chars = "我们喜欢机器学习"
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL + tuple(chars)) + "\n", encoding="utf-8")
    fast = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    words = ["我们", "喜欢", "机器", "学习"]
    enc = fast(words, is_split_into_words=True)
    assert fast.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", *chars, "[SEP]"]
    batch = ElectraDataCollator(fast, word_starts=True)([{"input_ids": enc["input_ids"], "word_ids": enc.word_ids()}])
    assert batch["word_starts"][0, :10].tolist() == [True, True, False, True, False, True, False, True, False, True]
    table = word_starts_from_vocab(fast)  # the vocabulary alone: every character a word
    assert table[enc["input_ids"]].all()


def test_collator_word_starts_errors(lines):
    collator = ElectraDataCollator(pad_token_id=0, word_starts=True)
    with pytest.raises(ValueError, match="example 1 has neither 'word_ids' nor 'word_starts'"):
        collator([{"input_ids": [5, 6], "word_ids": [None, 0]}, {"input_ids": [5, 6]}])
    with pytest.raises(ValueError, match=r"example 0: word_ids / word_starts must be 1-D with as many entries as "
                                         r"input_ids \(2\), got shape \(3,\)"):
        collator([{"input_ids": [5, 6], "word_starts": [True, False, True]}])
    with pytest.raises(TypeError, match="word_starts must be a bool, got 'yes'"):
        ElectraDataCollator(pad_token_id=0, word_starts="yes")
    given = collator([{"input_ids": [5, 6, 7], "word_starts": [True, False, True]}])["word_starts"]
    assert given[0].tolist() == [True, False, True] + [True] * 5
