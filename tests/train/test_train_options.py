"""Trainer options around the step: the reference optimizer and masking (and their resume), skipped non-finite
steps in the metrics, fp16 with a loss scale, --cuda-graph on a CPU, and the Ctrl-C hint."""
import dataclasses
import os
import random

import pytest
import torch

pytest.importorskip("tokenizers")

import electra_fast.pretraining.rtd_step as pretrainer_mod  # noqa: E402
import electra_fast.train.loop as train_mod  # noqa: E402
from electra_fast.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from electra_fast.cli import main  # noqa: E402
from electra_fast.pretraining.pretrainer import ElectraPretrainer  # noqa: E402
from electra_fast.train.loop import TrainConfig, train  # noqa: E402
import helpers  # noqa: E402
from helpers import train_killed_at  # noqa: E402

VOLATILE = ("tokens_per_s",)  # differs between two runs of the same steps


def config(dataset, out, **kw):
    base = dict(preset="tiny", data=[dataset], output_dir=str(out), steps=4, batch_size=8, seq_len=32,
                log_interval=1, save_interval=2, seed=random.randrange(1 << 20), threads=1, progress=False,
                export=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def read_metrics(out):
    return helpers.read_metrics(out, drop=VOLATILE)


def checkpoint(out, step):
    return load_checkpoint(os.path.join(out, "checkpoints", f"checkpoint-{step:08d}.pt"))


def test_reference_optimizer_and_masking_train_and_resume_exactly(dataset, tmp_path, monkeypatch):
    drawn = []
    real_mask, real_replace = pretrainer_mod.mask_tokens, pretrainer_mod.replace_tokens
    monkeypatch.setattr(pretrainer_mod, "mask_tokens", lambda *a, **k: drawn.append(k["replacement"]) or
                        real_mask(*a, **k))
    monkeypatch.setattr(pretrainer_mod, "replace_tokens", lambda *a, **k: drawn.append(k["duplicates"]) or
                        real_replace(*a, **k))
    cfg = config(dataset, tmp_path / "straight", optimizer="reference", masking="reference", warmup_steps=1)
    train(cfg)
    assert set(drawn) == {True, "mean"}  # the step masked with replacement and averaged duplicates' samples
    want = read_metrics(cfg.output_dir)
    assert len({r["loss"] for r in want}) == 4
    state = checkpoint(cfg.output_dir, 4)["optimizer"]["state"]
    # AdamWeightDecay keeps no step counter (no bias correction); torch's AdamW would add "step".
    assert {k for s in state.values() for k in s} == {"exp_avg", "exp_avg_sq"}

    cfg2 = dataclasses.replace(cfg, output_dir=str(tmp_path / "resumed"))
    train_killed_at(cfg2, step=2)
    train(cfg2, resume=checkpoint(cfg2.output_dir, 2))
    assert read_metrics(cfg2.output_dir) == want
    a, b = checkpoint(cfg.output_dir, 4), checkpoint(cfg2.output_dir, 4)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    with pytest.raises(train_mod.InputError, match="--optimizer adamw differs from the checkpoint's electra_adam"):
        train(dataclasses.replace(cfg2, optimizer="adamw", steps=6), resume=b)
    with pytest.raises(train_mod.InputError, match="--masking distinct differs from the checkpoint's with_replacement"):
        train(dataclasses.replace(cfg2, masking="distinct", steps=6), resume=b)


def test_non_finite_step_is_skipped_and_counted(dataset, tmp_path, monkeypatch):
    calls, forward = [], ElectraPretrainer.forward

    def nan_on_second_call(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if len(calls) == 2 else out

    monkeypatch.setattr(ElectraPretrainer, "forward", nan_on_second_call)
    cfg = config(dataset, tmp_path / "run", save_interval=1, keep_checkpoints=0)
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert records[1]["loss"] != records[1]["loss"]  # NaN: no applied step in that log window
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in records[2:])
    before, after = checkpoint(cfg.output_dir, 1), checkpoint(cfg.output_dir, 2)
    assert after["step_state"] == {"step": 2, "skipped": 1}  # the schedule moves on, the weights do not
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k
    for p, s in before["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, after["optimizer"]["state"][p][k]), (p, k)
    later = checkpoint(cfg.output_dir, 3)["model"]
    assert sum(not torch.equal(v, later[k]) for k, v in after["model"].items()) > len(later) // 2  # step 3 applied


def test_fp16_keeps_a_loss_scale(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "run", fp16=True, steps=8, save_interval=8)
    train(cfg)
    state = checkpoint(cfg.output_dir, 8)["step_state"]
    # Overflowing scaled gradients skip a step and halve the scale (GradScaler's rule); then steps apply.
    assert 0 < state["good_steps"] <= 8 - state["skipped"] and state["loss_scale"] == 2.0 ** (16 - state["skipped"])
    records = read_metrics(cfg.output_dir)
    assert [r["loss_scale"] for r in records] == [2.0 ** (16 - r["skipped_steps"]) for r in records]
    assert records[-1]["loss"] == records[-1]["loss"]
    with pytest.raises(train_mod.InputError, match="--fp16 and --bf16"):
        train(dataclasses.replace(cfg, bf16=True))


def test_cuda_graph_flags_on_cpu(dataset, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["pretrain", "--data", dataset, "-o", out, "--steps", "1", "--batch-size", "8", "--seq-len", "32",
            "--threads", "1", "--no-progress", "--no-export", "--device", "cpu"]
    assert main(args + ["--cuda-graph"]) == 2
    assert capsys.readouterr().err == ("electra-fast: error: --cuda-graph needs one process on a CUDA device, got 1 "
                                       "process(es) on cpu: leave --cuda-graph out\n")
    assert main(args + ["--no-cuda-graph"]) == 0
    assert load_checkpoint(latest_checkpoint(os.path.join(out, "checkpoints")))["config"]["cuda_graph"] is False


def test_ctrl_c_names_the_command_that_resumes(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, resume=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    out = str(tmp_path / "my run")
    assert main(["pretrain", "-o", out, "--steps", "5"]) == 130
    assert capsys.readouterr().err == (f"electra-fast: interrupted; `electra-fast pretrain --resume -o '{out}'` "
                                       "continues from the last checkpoint\n")


def test_kernel_options_reach_the_model_and_stay_out_of_the_saved_settings(dataset, tmp_path):
    from electra_fast.options import KernelOptions

    opts = dict(backend="torch", sampler="gumbel", attention="sdpa", fused_lm_head=False)
    cfg = config(dataset, tmp_path / "run", steps=2, **opts)
    assert cfg.kernel_options() == KernelOptions(**opts)
    assert train(cfg)["model"].options == KernelOptions(**opts)
    saved = checkpoint(cfg.output_dir, 2)
    assert not set(opts) & set(saved["config"])  # a resume may run the kernels another way
    resumed = train(dataclasses.replace(cfg, steps=3, backend=None, fused_lm_head=True), resume=saved)
    assert resumed["model"].options == KernelOptions(sampler="gumbel", attention="sdpa", fused_lm_head=True)
    with pytest.raises(train_mod.InputError, match=r"--backend must be one of \('torch', 'triton', 'cuda'\), "
                                                   r"got 'tpu'"):
        train(dataclasses.replace(cfg, backend="tpu"))
    with pytest.raises(train_mod.InputError, match="--backend cuda cannot run on cpu here"):  # before any step
        train(dataclasses.replace(cfg, backend="cuda", output_dir=str(tmp_path / "cuda")))


def test_older_spellings_are_mapped_and_their_checkpoints_resume(dataset, tmp_path, capsys, monkeypatch):
    orders = []
    plan = train_mod.BatchPlan
    monkeypatch.setattr(train_mod, "BatchPlan", lambda *a, **k: orders.append(k["order"]) or plan(*a, **k))
    out = str(tmp_path / "run")
    args = ["pretrain", "--data", dataset, "-o", out, "--steps", "2", "--batch-size", "8", "--seq-len", "32",
            "--threads", "1", "--no-progress", "--no-export", "--device", "cpu", "--save-interval", "2"]
    assert main(args + ["--optimizer", "reference", "--masking", "reference", "--backend", "torch"]) == 0
    saved = checkpoint(out, 2)
    assert (saved["config"]["optimizer"], saved["config"]["masking"]) == ("electra_adam", "with_replacement")
    # A checkpoint written before the new names: its settings name the same choices.
    saved["config"].update(optimizer="reference", masking="reference")
    saved["model_spec"]["settings"]["masking"] = "reference"
    # ... and no data order: such a run resumes on the whole-permutation order it started with.
    assert saved["data"].pop("order") == "feistel-1"
    cfg = config(dataset, out, steps=3, optimizer="electra_adam", masking="with_replacement")
    assert train(cfg, resume=saved)["step"] == 3
    assert orders == ["feistel-1", "permutation-0"]
    assert checkpoint(out, 3)["data"]["order"] == "permutation-0"
    with pytest.raises(train_mod.InputError, match=r"--optimizer must be one of \('adamw', 'electra_adam'\) "
                                                   r"\(also accepted: 'reference'\), got 'adam'"):
        train(dataclasses.replace(cfg, optimizer="adam"))


def test_first_step_token_ids_are_checked(dataset, tmp_path, monkeypatch):
    from electra_fast.data.loader import PretrainingData

    gather = PretrainingData.gather

    def out_of_vocabulary(self, indices, **kwargs):
        batch = gather(self, indices, **kwargs)
        batch["input_ids"][0, 1] = 1 << 20
        return batch

    monkeypatch.setattr(PretrainingData, "gather", out_of_vocabulary)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=\d+\), got values in "
                                         r"\[\d+, 1048576\]"):
        train(config(dataset, tmp_path / "run", steps=1))


def test_whole_word_masking_trains_from_the_vocabulary_and_keeps_its_setting(dataset, tmp_path, monkeypatch):
    from electra_fast.data import load_tokenizer

    starts = []
    real_mask = pretrainer_mod.mask_tokens
    monkeypatch.setattr(pretrainer_mod, "mask_tokens", lambda ids, *a, **k: starts.append((ids, k.get(
        "word_starts"))) or real_mask(ids, *a, **k))
    out = str(tmp_path / "run")
    args = ["pretrain", "--data", dataset, "-o", out, "--steps", "2", "--batch-size", "8", "--seq-len", "32",
            "--threads", "1", "--no-progress", "--no-export", "--device", "cpu", "--save-interval", "2",
            "--eval-interval", "0"]
    assert main(args + ["--masking", "whole-word"]) == 0
    saved = checkpoint(out, 2)
    assert saved["config"]["masking"] == saved["model_spec"]["settings"]["masking"] == "whole_word"
    # The oracle, from the WordPiece rule: a token begins a word unless it is a "##" piece; special tokens begin
    # words (that the token after one does too is mask_tokens' own rule, tested with the op).
    tok = load_tokenizer(dataset)
    vocab = {i: t for t, i in tok.get_vocab().items()}
    specials = {tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}
    assert len(starts) == 2
    for ids, got in starts:
        want = torch.tensor([[not vocab[i].startswith("##") or i in specials for i in row] for row in ids.tolist()])
        assert got is not None and torch.equal(got, want)
    assert (~want).any()
    cfg = config(dataset, out, steps=3, masking="whole_word", eval_interval=0)
    with pytest.raises(train_mod.InputError, match="--masking distinct differs from the checkpoint's whole_word: "
                                                   "resume with --masking whole_word"):
        train(dataclasses.replace(cfg, masking="distinct"), resume=saved)
    starts.clear()
    assert train(cfg, resume=saved)["step"] == 3  # the lookup rebuilt from the run's tokenizer
    assert len(starts) == 1 and starts[0][1] is not None


def test_segmented_data_gives_its_word_starts_to_whole_word_masking_only(tmp_path, monkeypatch):
    """A dataset prepared with a word segmenter: whole-word masking masks by its stored word starts (not the
    vocabulary's); the other maskings get no word starts gathered or copied at all."""
    from electra_fast.data import builtin_lines, prepare, train_tokenizer
    from electra_fast.data.loader import PretrainingData

    lines = list(builtin_lines())[:600]
    data = str(tmp_path / "data")
    prepare(iter(lines), data, train_tokenizer(iter(lines), vocab_size=600), seq_len=32, word_segmenter="chars")
    gathered, given = [], []
    gather = PretrainingData.gather
    monkeypatch.setattr(PretrainingData, "gather",
                        lambda self, *a, **k: gathered.append(gather(self, *a, **k)) or gathered[-1])
    real_mask = pretrainer_mod.mask_tokens
    monkeypatch.setattr(pretrainer_mod, "mask_tokens",
                        lambda *a, **k: given.append(k.get("word_starts")) or real_mask(*a, **k))
    for masking in ("distinct", "whole_word"):
        gathered.clear(), given.clear()
        train(config(data, tmp_path / masking, steps=1, masking=masking, eval_interval=0))
        batch = gathered[0]
        if masking == "distinct":
            assert "word_starts" not in batch and given == [None]
        else:
            # "chars": every character a word, so every token starts one (a vocabulary lookup would say False at
            # the "##" pieces the WordPiece tokenizer makes of longer words).
            assert batch["word_starts"].all() and torch.equal(given[0], batch["word_starts"])
            from electra_fast import word_starts_from_vocab
            table = word_starts_from_vocab(PretrainingData(data).tokenizer())
            assert not table[batch["input_ids"]].all()  # the vocabulary's word starts would differ
