"""ElectraPretrainer in the loops people already have: `transformers.Trainer` and `accelerate` run a few CPU steps
on tokenized text, padded by `ElectraDataCollator`; the step's output reads like transformers' `ModelOutput`."""
import copy
from itertools import islice

import pytest
import torch

from electra_fast.data import ElectraDataCollator, builtin_lines, train_tokenizer
from electra_fast.pretraining.pretrainer import ElectraPretrainer, PretrainerOutput, param_groups

SEQ_LEN, BATCH = 32, 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    """A WordPiece tokenizer trained on the built-in corpus and its lines tokenized as a transformers user's dataset
    would hold them: ids, segment ids, mask (lengths vary), and a text column the model does not take."""
    lines = [line for line in builtin_lines() if line.strip()][:800]
    tok = train_tokenizer(iter(lines), vocab_size=400)
    rows = []
    for line in lines:
        enc = tok.encode(line)
        n = min(len(enc.ids), SEQ_LEN)
        rows.append({"input_ids": enc.ids[:n], "token_type_ids": enc.type_ids[:n],
                     "attention_mask": enc.attention_mask[:n], "text": line})
    return tok, rows


class _Rows(torch.utils.data.Dataset):  # a plain map-style dataset: `datasets` is not needed
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _tiny(tok):
    return ElectraPretrainer.from_preset("tiny", tokenizer=tok)


def _losses_drop(losses):
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.85 * first, f"loss did not drop over {len(losses)} steps: {losses}"


# --------------------------------------------------------------------------------------------------- collator
def _naive_pad(examples, pad_id, length):
    ids, mask, types = [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        ids.append(list(ex["input_ids"]) + [pad_id] * (length - n))
        mask.append(list(ex.get("attention_mask", [1] * n)) + [0] * (length - n))
        types.append(list(ex.get("token_type_ids", [0] * n)) + [0] * (length - n))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "token_type_ids": torch.tensor(types)}


def test_collator_pads_as_transformers_does(corpus):
    tok, rows = corpus
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")
    picked = [rows[int(i)] for i in torch.randint(len(rows), (BATCH,))]
    features = [{k: r[k] for k in ("input_ids", "token_type_ids", "attention_mask")} for r in picked]
    want = transformers.DataCollatorWithPadding(hf_tok, pad_to_multiple_of=8, return_tensors="pt")(features)
    got = ElectraDataCollator(tok)(picked)
    assert set(got) == {"input_ids", "attention_mask", "token_type_ids"}
    for k in got:
        assert got[k].dtype == torch.long
        assert torch.equal(got[k], want[k]), k


def test_collator_defaults_lengths_and_inputs():
    pad = int(torch.randint(1, 50, ()))
    lengths = torch.randint(1, 20, (5,)).tolist()
    examples = [{"input_ids": torch.randint(50, 99, (n,))} for n in lengths]
    examples[1]["token_type_ids"] = torch.randint(0, 2, (lengths[1],)).tolist()  # a list beside tensors
    examples[2]["attention_mask"] = [1] * (lengths[2] - 1) + [0]
    examples[3]["input_ids"] = examples[3]["input_ids"].numpy()
    longest = max(lengths)
    for collator, length in ((ElectraDataCollator(pad_token_id=pad), -(-longest // 8) * 8),
                             (ElectraDataCollator(pad_token_id=pad, pad_to_multiple_of=None), longest),
                             (ElectraDataCollator(pad_token_id=pad, pad_to_multiple_of=3), -(-longest // 3) * 3),
                             (ElectraDataCollator(pad_token_id=pad, max_length=24), 24)):
        got, want = collator(examples), _naive_pad(examples, pad, length)
        for k in want:
            assert torch.equal(got[k], want[k]), (k, collator.__dict__)


def test_collator_errors_name_the_argument():
    with pytest.raises(ValueError, match="tokenizer= or pad_token_id="):
        ElectraDataCollator()
    with pytest.raises(ValueError, match="pad_token_id must be an int >= 0, got -1"):
        ElectraDataCollator(pad_token_id=-1)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int or None, got 0"):
        ElectraDataCollator(pad_token_id=0, pad_to_multiple_of=0)
    c = ElectraDataCollator(pad_token_id=0, max_length=4)
    with pytest.raises(ValueError, match="empty list"):
        c([])
    with pytest.raises(ValueError, match=r"example 1 must be a mapping with 'input_ids'.*got keys \['input_id'\]"):
        c([{"input_ids": [5]}, {"input_id": [5]}])
    with pytest.raises(ValueError, match=r"example 0: token_type_ids must be 1-D with as many entries as input_ids "
                                         r"\(2\), got shape \(3,\)"):
        c([{"input_ids": [5, 6], "token_type_ids": [0, 0, 1]}])
    with pytest.raises(ValueError, match="example 0 has 5 tokens, more than max_length=4"):
        c([{"input_ids": [5] * 5}])


# ----------------------------------------------------------------------------------- output read as a mapping
def test_output_reads_like_a_model_output(corpus):
    tok, rows = corpus
    model = _tiny(tok)
    out = model(**ElectraDataCollator(tok)(rows[:4]))
    names = ("loss", "mlm_loss", "disc_loss", "gen_accuracy", "disc_accuracy", "replaced_frac", "precision",
             "recall")
    assert out.keys() == names and list(out) == list(names) and len(out) == len(names)
    values = tuple(getattr(out, n) for n in names)
    assert out.to_tuple() == values and out.values() == values and out.items() == tuple(zip(names, values))
    assert out["loss"] is out.loss and out[0] is out.loss and out[1:] == values[1:] and out[-1] is out.recall
    assert "loss" in out and "logits" not in out
    assert dict(out) == dict(zip(names, values))
    with pytest.raises(KeyError, match="no field 'logits'; its fields are"):
        out["logits"]
    floats = out.to_dict()
    assert list(floats) == list(names)
    assert all(floats[n] == pytest.approx(v.item(), rel=1e-6) for n, v in zip(names, values))
    out.loss.backward()  # still the graph's own tensor


def test_forward_takes_what_trainer_sends_and_nothing_else(corpus):
    tok, rows = corpus
    model = _tiny(tok)
    batch = ElectraDataCollator(tok)(rows[:2])
    assert isinstance(model(**batch, return_loss=True), PretrainerOutput)
    with pytest.raises(ValueError, match="return_loss must be True"):
        model(**batch, return_loss=False)
    for typo in ("labels", "num_items_in_batch", "attention_masks"):
        with pytest.raises(TypeError, match=typo):
            model(**batch, **{typo: batch["input_ids"]})


# ------------------------------------------------------------------------------------------ transformers.Trainer
def test_transformers_trainer_trains_evaluates_and_saves(corpus, tmp_path):
    tok, rows = corpus
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    model = _tiny(tok)
    collator = ElectraDataCollator(tok)
    train, held_out = _Rows(rows[:-16]), _Rows(rows[-16:])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=10, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, learning_rate=2e-3, warmup_steps=0, use_cpu=True, report_to=[],
        save_strategy="steps", save_steps=5, logging_steps=1, disable_tqdm=True)  # Trainer's own checkpoints
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                                   data_collator=collator)
    trainer.train()
    _losses_drop([h["loss"] for h in trainer.state.log_history if "loss" in h])

    # Trainer's eval loss is the mean step loss over the held-out batches: the same masks and samples by hand (a
    # DataLoader draws its base seed from the global RNG, as Trainer's does, so the masks line up).
    torch.manual_seed(1234)
    eval_loss = trainer.evaluate()["eval_loss"]
    torch.manual_seed(1234)
    model.eval()
    with torch.no_grad():
        loader = torch.utils.data.DataLoader(held_out, batch_size=BATCH, collate_fn=collator)
        by_hand = [model(**batch).loss for batch in loader]
    assert eval_loss == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)

    # Trainer's checkpoint (one safetensors file: the shared embeddings are saved once) loads back into a fresh model.
    from safetensors.torch import load_file
    trainer.save_model(str(tmp_path / "saved"))
    fresh = _tiny(tok)
    fresh.load_state_dict(load_file(str(tmp_path / "saved" / "model.safetensors")))
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    assert fresh.generator.embeddings is fresh.discriminator.embeddings  # still one shared module
    assert (tmp_path / "trainer" / "checkpoint-10" / "model.safetensors").exists()

    trainer.model.save_pretrained(str(tmp_path / "pair"))
    back = ElectraPretrainer.from_pretrained(str(tmp_path / "pair"))
    assert back.settings() == model.settings()
    want = model.state_dict()
    assert list(back.state_dict()) == list(want)
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name]), name


# -------------------------------------------------------------------------------------------------- accelerate
def _steps(model, rows, collator, *, accelerator=None, steps=6, seed=4321):
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=2e-3)
    loader = torch.utils.data.DataLoader(_Rows(rows), batch_size=BATCH, collate_fn=collator)
    backward = torch.Tensor.backward
    if accelerator is not None:
        model, opt, loader = accelerator.prepare(model, opt, loader)
        backward = accelerator.backward
    torch.manual_seed(seed)
    losses = []
    for batch in islice(loader, steps):
        out = model(**batch)
        backward(out.loss)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.detach())
    return torch.stack(losses)


def test_accelerate_steps_equal_a_plain_loop(corpus):
    tok, rows = corpus
    accelerate = pytest.importorskip("accelerate")
    model = _tiny(tok)
    plain, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    collator = ElectraDataCollator(tok)
    accelerator = accelerate.Accelerator(cpu=True)
    with_accelerate = _steps(model, rows, collator, accelerator=accelerator)
    by_hand = _steps(plain, rows, collator)
    assert torch.equal(with_accelerate, by_hand), (with_accelerate, by_hand)
    _losses_drop(by_hand.tolist())
    trained = accelerator.unwrap_model(model).state_dict()
    for name, t in plain.state_dict().items():
        assert torch.equal(trained[name], t), name
        assert not torch.equal(t, start[name]), f"{name} did not change"
