"""The `electra-fast` command end to end on a CPU: pretrain -> checkpoint -> transformers export that detects
replaced tokens; prepare / train-tokenizer / export; every bad input is one line on stderr and exit code 2."""
import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from electra_fast.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from electra_fast.cli import main  # noqa: E402
from electra_fast.data import builtin_lines  # noqa: E402
from electra_fast.data.tokenizer import tokenizer_from_str  # noqa: E402
from electra_fast.train.export import model_from_spec  # noqa: E402
from electra_fast.model.config import PRESETS  # noqa: E402
from helpers import read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = list(builtin_lines())
FAST = ["--threads", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n".join(LINES[:2500]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """`(output dir, what the command printed)` of a short run with two held-out evaluations."""
    out, printed = str(tmp_path_factory.mktemp("run")), io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["pretrain", "--data", corpus, "-o", out, "--steps", "80", "--batch-size", "16", "--seq-len", "32",
                   "--lr", "2e-3", "--vocab-size", "1000", "--log-interval", "5", "--eval-interval", "40",
                   "--seed", str(random.randrange(1000)), *FAST])
    assert rc == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run[0]


def run_cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, pattern):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("electra-fast: error: ") and "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def test_pretrain_losses_fall_and_checkpoint_written(trained):
    records = read_metrics(trained)
    assert [r["step"] for r in records] == list(range(5, 85, 5))
    first, last = records[:2], records[-2:]
    assert np.mean([r["loss"] for r in last]) < 0.8 * np.mean([r["loss"] for r in first])
    assert np.mean([r["mlm_loss"] for r in last]) < np.mean([r["mlm_loss"] for r in first]) - 0.2
    assert all(r["tokens_per_s"] > 0 and 0 <= r["disc_accuracy"] <= 1 for r in records)
    # Warm-up over 8 steps (10%), then linear decay: the last step (index 79) runs at 2e-3 * 1/80.
    assert records[0]["lr"] == pytest.approx(2e-3 * 4 / 8 * (1 - 4 / 80))
    assert records[-1]["lr"] == pytest.approx(2e-3 / 80)
    ckpt = load_checkpoint(latest_checkpoint(os.path.join(trained, "checkpoints")))
    assert ckpt["step"] == 80


def test_pretrain_evaluates_held_out_rows_and_states_the_lift(trained_run):
    run, printed = trained_run
    evals = read_metrics(run, "eval")
    assert [r["step"] for r in evals] == [40, 80]
    last = evals[-1]
    # 2500 lines -> about 1900 rows of 32 tokens: 1% is one batch of 16 rows... unless 5% allows 4 batches.
    assert 16 * 20 <= last["eval_tokens"] <= 4 * 16 * 32
    assert last["baseline_accuracy"] == pytest.approx(1 - last["replaced_frac"])
    assert last["accuracy_lift"] == pytest.approx(last["disc_accuracy"] - last["baseline_accuracy"])
    assert last["disc_auc"] > 0.6, last  # chance is 0.5
    summary = [line for line in printed.splitlines() if line.startswith("held-out evaluation")]
    assert len(summary) == 1, printed
    assert (f"({last['eval_tokens']} tokens): discriminator ROC-AUC {last['disc_auc']:.3f}, average precision "
            f"{last['disc_ap']:.3f}" in summary[0])
    assert (f"accuracy {last['disc_accuracy']:.4f} vs {last['baseline_accuracy']:.4f} labelling every token original "
            f"({last['accuracy_lift']:+.4f})" in summary[0])
    assert f"generator MLM loss {last['mlm_loss']:.3f}, accuracy {last['gen_accuracy']:.3f}" in summary[0]


def test_init_from_continues_from_exported_checkpoints(trained, tmp_path, capsys):
    from electra_fast.pretraining.pretrainer import ElectraPretrainer

    exported = ElectraPretrainer.from_pretrained(trained).state_dict()
    # Warm-up over 1 step: the first step runs at LR 0, so its checkpoint holds the initial weights exactly.
    run = ["--data", os.path.join(trained, "data"), "--seq-len", "32", "--steps", "1", "--warmup-steps", "1",
           "--log-interval", "1", "--eval-interval", "0", "--no-export", *FAST]
    rc, _, err = run_cli(capsys, "pretrain", "--init-from", trained, "-o", str(tmp_path / "warm"), *run)
    assert rc == 0, err
    warm = load_checkpoint(latest_checkpoint(str(tmp_path / "warm" / "checkpoints")))
    assert warm["model"].keys() == exported.keys()
    for k, v in exported.items():
        assert torch.equal(warm["model"][k], v), k
    assert warm["tokenizer"] == load_checkpoint(latest_checkpoint(os.path.join(trained, "checkpoints")))["tokenizer"]
    assert run_cli(capsys, "pretrain", "-o", str(tmp_path / "fresh"), *run)[0] == 0
    first = {d: read_metrics(str(tmp_path / d))[0] for d in ("warm", "fresh")}
    # The first step already scores as the trained model: fresh ~0.69 (ln 2) and ~6.9 (ln 1000), warm ~0.3, ~6.2.
    assert first["warm"]["disc_loss"] < 0.75 * first["fresh"]["disc_loss"], first
    assert first["warm"]["mlm_loss"] < first["fresh"]["mlm_loss"] - 0.3, first

    # A discriminator alone (with its tokenizer): the generator is fresh, half the width for the tiny preset.
    shutil.copytree(os.path.join(trained, "discriminator"), str(tmp_path / "disc"))
    rc, _, err = run_cli(capsys, "pretrain", "--init-from", str(tmp_path / "disc"), "-o", str(tmp_path / "d"), *run)
    assert rc == 0, err
    state = load_checkpoint(latest_checkpoint(str(tmp_path / "d" / "checkpoints")))
    for k, v in exported.items():
        if k.startswith("discriminator."):
            assert torch.equal(state["model"][k], v), k
    disc_cfg, gen_cfg = state["model_spec"]["discriminator"], state["model_spec"]["generator"]
    assert (gen_cfg["hidden_size"], gen_cfg["intermediate_size"]) == (disc_cfg["hidden_size"] // 2,
                                                                       disc_cfg["intermediate_size"] // 2)
    rc, _, err = run_cli(capsys, "pretrain", "--init-from", str(tmp_path / "nothing"), "-o", str(tmp_path / "n"), *run)
    assert_one_line_error(rc, err, r"--init-from .* is not a directory")


def test_exported_discriminator_loads_in_transformers_and_scores_replaced_tokens(trained):
    disc_dir = os.path.join(trained, "discriminator")
    hf = transformers.ElectraForPreTraining.from_pretrained(disc_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(disc_dir)
    transformers.ElectraForMaskedLM.from_pretrained(os.path.join(trained, "generator"))

    # Same logits as the trained model in the checkpoint.
    ckpt = load_checkpoint(latest_checkpoint(os.path.join(trained, "checkpoints")))
    ours = model_from_spec(ckpt["model_spec"])
    ours.load_state_dict(ckpt["model"])
    ours.eval()
    enc = tok("The assert statement is a convenient way to insert debugging assertions.", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits, ours.discriminator(enc["input_ids"], enc["attention_mask"],
                                                                        enc["token_type_ids"]), rtol=1e-4, atol=1e-4)

    # Held-out sentences with 15% of tokens replaced at random: replaced ones must score higher (AUC).
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    replaced, original = [], []
    for sentence in [l for l in LINES[2500:2800] if l]:
        enc = tok(sentence, return_tensors="pt", truncation=True, max_length=32)
        ids = enc["input_ids"].clone()
        n = ids.shape[1] - 2
        if n < 4:
            continue
        pos = torch.randperm(n, generator=g)[: max(1, int(0.15 * n))] + 1
        ids[0, pos] = torch.randint(5, tok.vocab_size, (len(pos),), generator=g)
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=enc["attention_mask"]).logits[0, 1:-1]
        is_rep = torch.zeros(n, dtype=torch.bool)
        is_rep[pos - 1] = ids[0, pos] != enc["input_ids"][0, pos]
        replaced += logits[is_rep].tolist()
        original += logits[~is_rep].tolist()
    replaced, original = np.array(replaced), np.array(original)
    assert len(replaced) > 300
    auc = (replaced[:, None] > original[None, :]).mean()
    assert auc > 0.65, auc  # ~0.83 measured; chance is 0.5 (standard error ~0.015 here)


def test_default_pretrain_uses_builtin_corpus(tmp_path, monkeypatch, capsys):
    # `electra-fast pretrain` without arguments, shortened: built-in corpus, trained tokenizer, runs/tiny.
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli(capsys, "pretrain", "--steps", "3", "--no-progress")
    assert rc == 0 and "done: 3 steps" in out
    run = tmp_path / "runs" / "tiny"
    index = json.loads((run / "data" / "index.json").read_text())
    tiny = PRESETS["tiny"]
    assert index["sources"][0].startswith("builtin:") and index["seq_len"] == tiny["seq_len"]
    assert latest_checkpoint(str(run / "checkpoints")).endswith("checkpoint-00000003.pt")
    cfg = load_checkpoint(latest_checkpoint(str(run / "checkpoints")))["config"]
    assert (cfg["preset"], cfg["batch_size"], cfg["lr"]) == ("tiny", tiny["batch_size"], tiny["lr"])
    assert cfg["warmup_steps"] == 0  # 10% of 3 steps
    assert (run / "discriminator" / "model.safetensors").exists()
    # A second run does not mix its checkpoints with the first's unless told to; it reuses the prepared data.
    rc, _, err = run_cli(capsys, "pretrain", "--steps", "2", "--no-progress")
    assert_one_line_error(rc, err, r"already holds a run \(checkpoint at step 3\): pass --resume .* --overwrite")
    before = sorted(os.listdir(run / "data"))
    assert run_cli(capsys, "pretrain", "--steps", "2", "--no-progress", "--no-export", "--overwrite")[0] == 0
    assert sorted(os.listdir(run / "data")) == before
    assert latest_checkpoint(str(run / "checkpoints")).endswith("checkpoint-00000002.pt")


def test_prepare_train_tokenizer_and_export_commands(trained, corpus, tmp_path, capsys):
    bad = tmp_path / "mixed.txt"
    bad.write_bytes(open(corpus, "rb").read()[:20000] + b"\n\xff\xfe broken \xc3\n" + b"More text here.\n")
    rc, out, _ = run_cli(capsys, "train-tokenizer", str(bad), "-o", str(tmp_path / "tok"), "--vocab-size", "500")
    assert rc == 0 and "skipped 1 lines" in out
    rc, out, _ = run_cli(capsys, "prepare", str(bad), "-o", str(tmp_path / "data"), "--tokenizer",
                         str(tmp_path / "tok"), "--seq-len", "16", "--no-progress")
    assert rc == 0 and "skipped 1 lines that were not UTF-8" in out
    assert json.loads((tmp_path / "data" / "index.json").read_text())["seq_len"] == 16
    rc, out, _ = run_cli(capsys, "export", trained, "-o", str(tmp_path / "export"))
    assert rc == 0
    a = transformers.ElectraForPreTraining.from_pretrained(str(tmp_path / "export" / "discriminator"))
    b = transformers.ElectraForPreTraining.from_pretrained(os.path.join(trained, "discriminator"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_bad_inputs_are_one_line_errors(trained, corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    e = lambda *argv: run_cli(capsys, "pretrain", "-o", out, "--steps", "2", *FAST, *argv)  # noqa: E731
    rc, _, err = e("--data", str(tmp_path / "missing.txt"))
    assert_one_line_error(rc, err, r"does not exist")
    (tmp_path / "empty.txt").write_text("\n\n")
    rc, _, err = e("--data", str(tmp_path / "empty.txt"))
    assert_one_line_error(rc, err, r"no text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    rc, _, err = e("--data", str(tmp_path / "latin1.txt"))
    assert_one_line_error(rc, err, r"no text.*not UTF-8")
    rc, _, err = e("--seq-len", "600")
    assert_one_line_error(rc, err, r"--seq-len 600 exceeds the model's max_position_embeddings 512")
    rc, _, err = e("--data", os.path.join(trained, "data"), "--seq-len", "32", "--tokenizer",
                   os.path.join(ROOT, "nonexistent-tokenizer.json"))
    assert_one_line_error(rc, err, r"tokenizer .* does not exist")
    main(["train-tokenizer", corpus, "-o", str(tmp_path / "other_tok"), "--vocab-size", "300"])
    rc, _, err = e("--data", os.path.join(trained, "data"), "--seq-len", "32", "--tokenizer",
                   str(tmp_path / "other_tok"))
    assert_one_line_error(rc, err, r"differs from the one .* was prepared with")
    main(["prepare", corpus, "-o", str(tmp_path / "other_data"), "--tokenizer", str(tmp_path / "other_tok"),
          "--seq-len", "32", "--no-progress"])
    shutil.copytree(trained, str(tmp_path / "run"))
    rc, _, err = run_cli(capsys, "pretrain", "-o", str(tmp_path / "run"), "--resume", "--data",
                         str(tmp_path / "other_data"), *FAST)
    assert_one_line_error(rc, err, r"the data's tokenizer \(300 tokens\) is not the one the checkpoint was trained "
                                   r"with \(1000 tokens\): resume with the run's own --data")
    rc, _, err = e("--data", os.path.join(trained, "data"), "--seq-len", "32", "--model", "vocab_size=30522")
    assert_one_line_error(rc, err, r"vocab_size does not match the tokenizer")
    rc, _, err = e("--data", os.path.join(trained, "data"), "--seq-len", "64")
    assert_one_line_error(rc, err, r"prepared with --seq-len 32")
    (tmp_path / "a_file").write_text("x")
    rc, _, err = run_cli(capsys, "pretrain", "-o", str(tmp_path / "a_file" / "sub"), *FAST)
    assert_one_line_error(rc, err, r"cannot write to --output-dir")
    rc, _, err = e("--resume")
    assert_one_line_error(rc, err, r"no checkpoint in")
    rc, _, err = e("--config", str(tmp_path / "empty.txt"))
    assert_one_line_error(rc, err, r"not valid JSON")
    rc, _, err = e("--eval-interval", "-1")
    assert_one_line_error(rc, err, r"--eval-interval must be an int >= 0, got -1")
    (tmp_path / "short.txt").write_text("Only one short line.\n")
    rc, _, err = e("--data", os.path.join(trained, "data"), "--seq-len", "32", "--eval-data",
                   str(tmp_path / "short.txt"))
    assert_one_line_error(rc, err, r"--eval-data has 1 examples, fewer than one batch of 16")


def test_corrupt_checkpoint_on_resume(trained, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    path = latest_checkpoint(os.path.join(run, "checkpoints"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    rc, _, err = run_cli(capsys, "pretrain", "-o", run, "--resume", *FAST)
    assert_one_line_error(rc, err, r"checkpoint .* is damaged: it cannot be read as a checkpoint: delete it and "
                                   r"start again without --resume \(no earlier checkpoint is intact\)$")
    assert os.path.getsize(path) == size // 3  # nothing was touched
    assert os.path.exists(os.path.join(run, "discriminator", "model.safetensors"))


def test_pretrain_on_text_reports_lines_that_are_not_utf8(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    skipped = 0
    with open(corpus, "wb") as f:
        for i, line in enumerate(LINES[:1600]):
            if i % 2 and line:  # every other sentence written by a Latin-1 editor: not UTF-8
                f.write(line.encode() + " caf\xe9 cr\xe8me".encode("latin-1") + b"\n")
                skipped += 1
            else:
                f.write(line.encode() + b"\n")
    rc, out, err = run_cli(capsys, "pretrain", "--data", str(corpus), "-o", str(tmp_path / "run"), "--steps", "2",
                           "--batch-size", "8", "--seq-len", "32", "--vocab-size", "300", "--no-export", *FAST)
    assert rc == 0, err
    assert f"electra-fast: warning: skipped {skipped} lines of the text that were not UTF-8: convert the files to " \
           "UTF-8 (e.g. iconv -f latin1 -t utf-8) to train on them" in err.splitlines()
    assert out.strip().endswith(f"; skipped {skipped} lines that were not UTF-8")
    # What `prepare` says about the same file.
    rc, out, _ = run_cli(capsys, "prepare", str(corpus), "-o", str(tmp_path / "data"), "--vocab-size", "300",
                         "--no-progress")
    assert rc == 0 and out.strip().endswith(f"; skipped {skipped} lines that were not UTF-8")


def test_console_exit_code_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "electra_fast", "prepare", str(tmp_path / "nothing.txt"),
                           "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"electra-fast: error: data path {str(tmp_path / 'nothing.txt')!r} does not exist: pass existing text files "
        "or directories"]
    assert not os.path.exists(tmp_path / "out")


def test_pretrain_deberta_v3_exports_for_transformers(tmp_path, capsys):
    """`--arch deberta-v3`: a Unigram tokenizer trained on the built-in corpus, GDES on, and an export that
    transformers' AutoModel / AutoModelForSequenceClassification load with the checkpoint's hidden states; the
    checkpoint rebuilds the model (resume, export)."""
    out = tmp_path / "run"
    rc, printed, _ = run_cli(capsys, "pretrain", "--arch", "deberta-v3", "--preset", "tiny", "--steps", "3",
                             "--batch-size", "4", "--seq-len", "32", "--vocab-size", "500", "-o", str(out), *FAST)
    assert rc == 0 and "done: 3 steps" in printed
    state = load_checkpoint(latest_checkpoint(str(out / "checkpoints")))
    assert state["config"]["arch"] == "deberta-v3" and state["config"]["gdes"] is True
    model = model_from_spec(state["model_spec"])
    model.load_state_dict(state["model"])
    assert model.gdes and isinstance(model.generator, transformers.DebertaV2ForMaskedLM)
    disc_dir = str(out / "discriminator")
    tok = transformers.AutoTokenizer.from_pretrained(disc_dir)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert not os.path.exists(os.path.join(disc_dir, "vocab.txt"))
    assert tok(LINES[3])["input_ids"] == tokenizer_from_str(state["tokenizer"]).encode(LINES[3]).ids
    enc = tok([LINES[3], LINES[4]], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        want = model.eval().discriminator.encoder(ids, attention_mask=mask).last_hidden_state
        got = transformers.AutoModel.from_pretrained(disc_dir).eval()(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, want)
        clf = transformers.AutoModelForSequenceClassification.from_pretrained(disc_dir, num_labels=2).eval()
        assert isinstance(clf, transformers.DebertaV2ForSequenceClassification)
        torch.testing.assert_close(clf.base_model(ids, attention_mask=mask)[0], want)
    # Its own presets only; the choice is checked before any work.
    capsys.readouterr()  # transformers' loading messages above
    rc, _, err = run_cli(capsys, "pretrain", "--arch", "deberta-v3", "--preset", "large", "-o",
                         str(tmp_path / "x"), *FAST)
    assert_one_line_error(rc, err, r"--preset for --arch deberta-v3 must be one of \('base', 'small', 'tiny', "
                                   r"'xsmall'\), got 'large'")
