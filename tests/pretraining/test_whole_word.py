"""Whole-word masking above the op (docs/algorithm.md#whole-word-masking): the setting and its spellings; the word
starts that reach `ops.mask_tokens` (from the vocabulary lookup, checked against the tokenizer's own `word_ids()` on
real text, or given per batch); whole words chosen; a clear error without word starts; the compiled step; transformers
models, the DeBERTa-v3 recipe, saving and loading a pair."""
import pytest
import torch

pytest.importorskip("tokenizers")

import electra_fast.pretraining.rtd_step as rtd  # noqa: E402
from electra_fast import word_starts_from_vocab  # noqa: E402
from electra_fast.data import builtin_lines, save_tokenizer, train_tokenizer  # noqa: E402
from electra_fast.data.tokenizer import train_unigram_tokenizer  # noqa: E402
from electra_fast.data.word_starts import word_starts_from_word_ids  # noqa: E402
from electra_fast.pretraining.pretrainer import ElectraPretrainer  # noqa: E402
from electra_fast.pretraining.rtd_step import check_masking  # noqa: E402

L = 48
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lines():
    return [line for line in list(builtin_lines())[:400] if len(line.split()) > 4]


@pytest.fixture(scope="module")
def wordpiece(lines):
    return train_tokenizer(iter(lines), vocab_size=500)


def encode_batch(tok, texts, length=L):
    """`(input_ids, attention_mask, word starts from each encoding's word_ids())`, padded: the oracle batch."""
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask, starts = torch.zeros_like(ids), torch.ones(len(texts), length, dtype=torch.bool)
    for i, text in enumerate(texts):
        enc = tok.encode(text)
        n = min(len(enc.ids), length)
        ids[i, :n], mask[i, :n] = torch.tensor(enc.ids[:n]), 1
        starts[i, :n] = torch.tensor(word_starts_from_word_ids(enc.word_ids[:n]))
    return ids, mask, starts


def tiny(tok, **kw):
    torch.manual_seed(0)
    return ElectraPretrainer.from_preset("tiny", tokenizer=tok, num_hidden_layers=1, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, **kw)


@pytest.fixture
def spy(monkeypatch):
    """Every `mask_tokens` call of the step: its keyword arguments and outputs."""
    calls, real = [], rtd.mask_tokens

    def recording(*args, **kw):
        out = real(*args, **kw)
        calls.append({**kw, "out": out})
        return out

    monkeypatch.setattr(rtd, "mask_tokens", recording)
    return calls


def test_the_setting_and_its_spellings():
    from electra_fast.train.config import TrainConfig

    assert check_masking("whole-word") == check_masking("whole_word") == "whole_word"
    assert TrainConfig(masking="whole-word").resolved().masking == "whole_word"
    with pytest.raises(ValueError, match="masking must be one of .*'whole_word'.* got 'words'"):
        check_masking("words")


def test_lookup_reaches_the_op_as_the_tokenizers_word_ids_say(wordpiece, lines, spy):
    model = tiny(wordpiece, masking="whole-word", mask_prob=0.3)
    assert model.masking == "whole_word" and model.settings()["masking"] == "whole_word"
    ids, mask, starts = encode_batch(wordpiece, lines[:6])
    assert (~starts & mask.bool()).sum() > 10  # words of several tokens in the batch
    model(ids, mask)
    (call,) = spy
    torch.testing.assert_close(call["word_starts"], starts, rtol=0, atol=0)


def test_the_step_masks_whole_words_only(wordpiece, lines, spy):
    model = tiny(wordpiece, masking="whole_word", mask_prob=0.3)
    ids, mask, starts = encode_batch(wordpiece, lines[:8])
    words = starts.long().cumsum(1)  # a word id per token (rows start with [CLS], a start)
    several = 0
    for seed in range(6):
        torch.manual_seed(seed)
        model(ids, mask)
        _, positions, weights = spy[-1]["out"]
        k = torch.round(mask.sum(1).float() * torch.tensor(0.3, dtype=torch.float32)).long()
        for b in range(ids.shape[0]):
            chosen = positions[b][weights[b] > 0].tolist()
            assert 0 < len(chosen) <= k[b] and len(set(chosen)) == len(chosen)
            for w in set(words[b, chosen].tolist()):
                members = (words[b] == w).nonzero().flatten().tolist()
                assert set(members) <= set(chosen), (seed, b, w)  # every token of a chosen word is chosen
                several += len(members) > 1
    assert several > 5  # words of several tokens were chosen whole, not only one-token words


def test_given_word_starts_win_and_other_maskings_ignore_them(wordpiece, lines, spy):
    model = tiny(wordpiece, masking="whole_word")
    ids, mask, _ = encode_batch(wordpiece, lines[:4])
    mine = torch.ones_like(ids, dtype=torch.bool)  # every token its own word
    model(ids, mask, word_starts=mine)
    assert spy[-1]["word_starts"] is mine
    distinct = tiny(wordpiece)
    torch.manual_seed(3)
    with_starts = distinct(ids, mask, word_starts=mine).loss
    assert spy[-1].get("word_starts") is None  # the op gets no word starts: it runs as before
    torch.manual_seed(3)
    torch.testing.assert_close(distinct(ids, mask).loss, with_starts, rtol=0, atol=0)


def test_whole_word_without_word_starts_is_a_clear_error(wordpiece, lines):
    ids, mask, _ = encode_batch(wordpiece, lines[:2])
    model = ElectraPretrainer.from_preset("tiny", vocab_size=500, mask_token_id=4, special_token_ids=[0, 2, 3, 4],
                                          pad_token_id=0, masking="whole_word")
    assert model.vocab_word_starts is None
    with pytest.raises(ValueError, match="masking='whole_word' needs word_starts.*got None"):
        model(ids, mask)
    with pytest.raises(ValueError, match=r"word_starts must have shape \(2, 48\)"):
        model(ids, mask, word_starts=torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocab_word_starts must be a 1-D bool tensor of at most vocab_size=500"):
        model.set_vocab_word_starts(torch.ones(501, dtype=torch.bool))
    model.set_vocab_word_starts(wordpiece)
    torch.testing.assert_close(model.vocab_word_starts, word_starts_from_vocab(wordpiece), rtol=0, atol=0)
    model(ids, mask)


def test_a_shorter_tokenizer_leaves_the_other_ids_words_of_their_own(wordpiece):
    model = ElectraPretrainer.from_preset("tiny", tokenizer=wordpiece, vocab_size=640, masking="whole_word")
    table = word_starts_from_vocab(wordpiece)
    assert model.vocab_word_starts.shape == (640,)
    assert torch.equal(model.vocab_word_starts[:500], table) and model.vocab_word_starts[500:].all()
    assert "vocab_word_starts" not in model.state_dict()  # no checkpoint holds it


def test_compiled_whole_word_step_has_no_graph_break_and_matches_eager(wordpiece, lines):
    model = tiny(wordpiece, masking="whole_word", mask_prob=0.3)
    model.validate = False
    ids, mask, starts = encode_batch(wordpiece, lines[:4], length=32)
    # A fresh trace: after another test compiled the same forward with another mask_prob, dynamo would trace the
    # float as a symbol on recompiling, and the op's Python check of it (math.isfinite) cannot be traced.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # aot_eager: eager's RNG
    for given in (None, starts):
        torch.manual_seed(5)
        want = model(ids, mask, word_starts=given)
        torch.manual_seed(5)
        got = compiled(ids, mask, word_starts=given)
        for name in ("loss", "mlm_loss", "disc_loss", "replaced_frac"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)


def test_save_and_load_rebuild_the_lookup(wordpiece, lines, tmp_path):
    model = tiny(wordpiece, masking="whole_word")
    ids, mask, _ = encode_batch(wordpiece, lines[:2])
    model.save_pretrained(str(tmp_path))
    bare = ElectraPretrainer.from_pretrained(str(tmp_path))  # no tokenizer anywhere: no lookup
    assert bare.masking == "whole_word" and bare.vocab_word_starts is None
    with pytest.raises(ValueError, match="needs word_starts"):
        bare(ids, mask)
    save_tokenizer(wordpiece, str(tmp_path))  # beside the pair, as `electra-fast export` writes it
    for again in (ElectraPretrainer.from_pretrained(str(tmp_path)),
                  ElectraPretrainer.from_pretrained(str(tmp_path), tokenizer=wordpiece)):
        assert torch.equal(again.vocab_word_starts, model.vocab_word_starts)
    assert ElectraPretrainer.from_pretrained(str(tmp_path), masking="distinct").vocab_word_starts is None


@pytest.mark.transformers
def test_transformers_models_take_word_starts_from_the_collator(wordpiece, lines, tmp_path, spy):
    tf = pytest.importorskip("transformers")
    from electra_fast.data import ElectraDataCollator

    save_tokenizer(wordpiece, str(tmp_path))
    fast = tf.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    cfg = dict(vocab_size=len(fast), embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=64)
    gen = tf.ElectraForMaskedLM(tf.ElectraConfig(hidden_size=16, **cfg))
    disc = tf.ElectraForPreTraining(tf.ElectraConfig(hidden_size=32, **cfg))
    model = ElectraPretrainer(gen, disc, mask_token_id=fast.mask_token_id,
                              special_token_ids=[fast.pad_token_id, fast.cls_token_id, fast.sep_token_id,
                                                 fast.mask_token_id], masking="whole-word")
    enc = fast(lines[:4], truncation=True, max_length=40)
    rows = [{"input_ids": enc["input_ids"][i], "word_ids": enc.word_ids(i)} for i in range(4)]
    batch = ElectraDataCollator(fast, word_starts=True)(rows)
    out = model(**batch)  # as transformers.Trainer and accelerate call it
    assert torch.isfinite(out.loss)
    assert spy[-1]["word_starts"] is batch["word_starts"]
    out.loss.backward()
    assert gen.electra.encoder.layer[0].attention.self.query.weight.grad is not None


@pytest.mark.transformers
def test_deberta_v3_recipe_looks_up_sentencepiece_word_starts(lines, spy):
    pytest.importorskip("transformers")
    tok = train_unigram_tokenizer(iter(lines), vocab_size=400)
    model = ElectraPretrainer.from_deberta_v3("tiny", tokenizer=tok, masking="whole_word", mask_prob=0.3)
    assert torch.equal(model.vocab_word_starts, word_starts_from_vocab(tok))
    assert ElectraPretrainer.from_deberta_v3("tiny", tokenizer=tok).vocab_word_starts is None
    ids, mask, starts = encode_batch(tok, lines[:4])
    assert (~starts & mask.bool()).sum() > 10
    out = model(ids, mask)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(spy[-1]["word_starts"], starts, rtol=0, atol=0)


def test_evaluation_uses_the_loaders_word_starts(wordpiece, lines, spy):
    from electra_fast.train.evaluate import evaluate

    model = tiny(wordpiece, masking="whole_word")
    ids, mask, starts = encode_batch(wordpiece, lines[:4])
    mine = starts.clone()
    mine[:, 1::2] = True  # not what the vocabulary says: it must be these that reach the op

    class Rows:  # what `PretrainingData.gather` returns for a dataset prepared with word starts
        def gather(self, indices):
            return {"input_ids": ids[indices], "attention_mask": mask[indices],
                    "token_type_ids": torch.zeros_like(ids[indices]), "word_starts": mine[indices]}

    evaluate(model, Rows(), torch.arange(4).numpy(), 2, seed=0, device=torch.device("cpu"))
    assert len(spy) == 2
    torch.testing.assert_close(torch.cat([c["word_starts"] for c in spy]), mine, rtol=0, atol=0)
