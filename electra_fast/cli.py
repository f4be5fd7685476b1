"""The `electra-fast` command: pretrain, prepare, train-tokenizer, export.

    electra-fast pretrain                              # tiny model, built-in corpus, about a minute on a CPU
    electra-fast prepare corpus/*.txt -o data/ --preset small   # its --seq-len, 128
    electra-fast pretrain --preset small --data data/ --bf16 --compile
    torchrun --nproc-per-node 8 -m electra_fast pretrain --preset base --data data/
    electra-fast export runs/small -o electra-small/   # discriminator/ + generator/ for transformers
    electra-fast pretrain --arch deberta-v3 --preset xsmall --data corpus/   # RTD + GDES on DeBERTa-v2

Bad input ends with one line, `electra-fast: error: ...` saying what to do, and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import List, Optional

from electra_fast.checks import check_int
from electra_fast.errors import InputError, ensure_writable
from electra_fast.options import ATTENTION, BACKENDS, SAMPLERS

EXIT_INPUT = 2


def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain an ELECTRA model (no arguments: a short demo run)",
                       description="Pretrain generator + discriminator. Without arguments: the tiny preset on the "
                                   "built-in corpus (Python's documentation), a minute or two on a CPU.")
    # Every default is None: what is not given comes from --config, then the checkpoint (--resume), then the preset.
    a = p.add_argument
    a("--arch", choices=["electra", "deberta-v3"], help="electra (default): the slim ELECTRA models, WordPiece; "
      "deberta-v3: DebertaV2ForMaskedLM generator of half the depth + DebertaV2Model discriminator with an RTD "
      "head, GDES, RTD weight 50, a Unigram tokenizer trained on the text")
    a("--preset", help="model size and its defaults (default: tiny): tiny, small, base or large; for --arch "
      "deberta-v3: tiny, xsmall, small or base")
    a("--config", metavar="FILE", help="JSON file with any of these options (underscores), e.g. "
      '{"preset": "small", "model": {"num_hidden_layers": 6}}; command-line options win')
    a("--model", metavar="KEY=VALUE", type=_key_value, action="append",
      help="model config override, e.g. num_hidden_layers=6 or generator_hidden_size=128 (repeatable)")
    a("--gdes", action=argparse.BooleanOptionalAction,
      help="gradient-disentangled embedding sharing (default: on for --arch deberta-v3, off for electra)")
    a("--mask-prob", type=float, help="fraction of tokens masked (default: the preset's, 0.15 or 0.25)")
    # The older spelling "reference" is still accepted (TrainConfig maps it), but no longer shown.
    a("--masking", choices=["distinct", "with_replacement", "whole-word", "whole_word", "reference"],
      metavar="{distinct,with_replacement,whole-word}",
      help="distinct (default): K_b distinct positions per row; with_replacement: drawn with replacement as the "
      "reference does (a position drawn twice counts twice and takes the floor of the mean of its samples); "
      "whole-word: whole words (word starts from the tokenizer's vocabulary, or the data's own when prepared "
      "with them)")
    a("--data", nargs="+", metavar="PATH", help="a prepared dataset directory, or text files/directories "
      "(one sentence per line, blank line between documents); default: the built-in corpus")
    a("--tokenizer", metavar="PATH", help="tokenizer.json, vocab.txt or a directory with one; default: the "
      "prepared dataset's, or one trained on the text")
    a("--vocab-size", type=int, help="vocabulary size of a tokenizer trained on the text (default 30522)")
    a("--init-from", metavar="DIR", help="continue pretraining from transformers checkpoints: DIR/generator + "
      "DIR/discriminator (a run's output or `export -o`), or a discriminator alone (fresh generator sized by the "
      "preset's ratio); their tokenizer, if saved beside them, is used. Weights only: the schedule starts afresh")
    a("-o", "--output-dir", help="checkpoints, metrics and the exported model go here (default runs/<preset>)")
    a("--steps", type=int, help="optimizer steps (default: the preset's; 1M for small as the reference)")
    a("--batch-size", type=int, help="global batch per optimizer step (default: the preset's)")
    a("--seq-len", type=int, help="tokens per example (default: the preset's)")
    a("--lr", type=float, help="peak learning rate (default: the preset's)")
    a("--warmup-steps", type=int, help="linear warm-up steps (default: 10000 or 10%% of --steps if fewer)")
    a("--weight-decay", type=float, help="AdamW weight decay, not on LayerNorm/bias (default 0.01)")
    a("--max-grad-norm", type=float, help="gradient-norm clip (default 1.0)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--optimizer", choices=["adamw", "electra_adam", "reference"], metavar="{adamw,electra_adam}",
      help="adamw (default): torch's AdamW, with bias correction, as transformers users expect; electra_adam: the "
      "reference's AdamWeightDecay, no bias correction (after the 10k-step warm-up the two barely differ)")
    a("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on for CUDA GPUs)")
    a("--fp16", action="store_true", default=None,
      help="fp16 autocast with dynamic loss scaling, for GPUs without bf16 (non-finite steps are skipped)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the step (default: on for CUDA)")
    a("--cuda-graph", action=argparse.BooleanOptionalAction,
      help="replay the whole step (forward, backward, optimizer) from CUDA graphs (default: on for CUDA in one "
      "process)")
    a("--fsdp", action="store_true", default=None, help="FSDP2 (fully_shard) instead of DDP under torchrun")
    # How the kernels run: not saved with the run, so a --resume may pass other values.
    a("--backend", choices=BACKENDS, help="kernels of every op: torch (the PyTorch reference), triton or cuda "
      "(default: the environment variable ELECTRA_FAST_BACKEND; unset, each op's fastest available on a GPU and "
      "the reference on a CPU). Not saved with the run: a --resume may pass another")
    a("--sampler", choices=SAMPLERS, help="how the kernels draw the generator's samples, both exactly from its "
      "softmax: cdf (inverse CDF, one uniform per row) or gumbel (Gumbel-max) (default: the environment variable "
      "ELECTRA_FAST_SAMPLER, else cdf)")
    a("--attention", choices=ATTENTION, help="the slim encoder's attention: auto (default: varlen where flash runs, "
      "else flex on CUDA without attention dropout, else sdpa), sdpa (dense additive mask), varlen (flash "
      "variable-length) or flex (FlexAttention)")
    a("--fused-lm-head", action=argparse.BooleanOptionalAction,
      help="the generator's LM head, loss and sample as one chunked op, so its [tokens, vocabulary] logits never "
      "exist whole (default: on, except for transformers' ElectraForMaskedLM)")
    a("--seed", type=int, help="random seed (default 1234)")
    a("--log-interval", type=int, help="steps between metric logs (default 10)")
    a("--eval-interval", type=int, help="steps between evaluations on held-out data, and one at the end (default "
      "500; 0: none). Held out: the last 1%% of the data's rows (1 to 10 batches), never trained on")
    a("--eval-data", nargs="+", metavar="PATH", help="evaluate on this prepared dataset or text instead (tokenized "
      "with the training data's tokenizer; at most 10 batches)")
    a("--save-interval", type=int, help="steps between checkpoints (default 1000; one is always written at the end)")
    a("--keep-checkpoints", type=int, help="how many recent checkpoints to keep (default 3; 0 keeps all)")
    a("--save-every-minutes", type=float, metavar="M", help="also save when M minutes passed since the last "
      "checkpoint (rank 0's clock, checked every --signal-check-interval steps)")
    a("--on-save-error", choices=["warn", "stop"], help="when a checkpoint cannot be written (a full disk): warn "
      "(default: one line, the run goes on, the previous checkpoint stays the newest) or stop (an error naming the "
      "file); the last save and one on a signal always stop")
    a("--requeue-exit-code", type=int, metavar="N", help="on SIGTERM or SIGUSR1: finish the step, save a checkpoint, "
      "flush the metrics and exit with N (default 0); a second signal exits at once")
    a("--signal-check-interval", type=int, metavar="K", help="under torchrun, steps between the processes' "
      "agreement on a stop or a timed save (default 10; one process checks after every step)")
    a("--tensorboard", action="store_true", default=None, help="also log to TensorBoard (<output>/tensorboard)")
    a("--wandb", nargs="?", const="electra-fast", metavar="PROJECT",
      help="also log to Weights & Biases, in PROJECT (default electra-fast; needs pip install wandb)")
    a("--device", help="torch device (default: cuda if available, else cpu)")
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 for the tiny preset on a CPU)")
    a("--collective-timeout", type=float, metavar="SECONDS",
      help="under torchrun, a rank whose step has not finished after this long (a collective waiting on a dead or "
      "hung rank) prints which rank and step and exits with code 124, so that torchrun --max-restarts restarts the "
      "group (with --resume auto: from the last checkpoint); the first step after a start may take 30 minutes "
      "(default 600)")
    a("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
      help="continue from the newest checkpoint in the output dir (or the file given); --resume auto: from the "
      "newest that verifies, skipping damaged ones, or start afresh where there is none (for job scripts)")
    a("--overwrite", action="store_true", default=None,
      help="start afresh in an output dir holding another run's checkpoints (they are deleted)")
    a("--no-export", dest="export", action="store_false", default=None,
      help="do not write discriminator/ and generator/ at the end")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=_pretrain)


def _read_config_file(path: str) -> dict:
    from electra_fast.train.config import TrainConfig

    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--config {path!r} does not exist: pass a JSON file") from None
    except (OSError, ValueError) as e:
        raise InputError(f"--config {path!r} is not valid JSON ({e}): fix the file") from None
    if not isinstance(values, dict):
        raise InputError(f"--config {path!r} must hold a JSON object, got {type(values).__name__}")
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"--config {path!r} has unknown option(s) {unknown}: use some of {sorted(known)}")
    return values


def _pretrain(args) -> int:
    from electra_fast.train.config import TrainConfig, default_output_dir
    from electra_fast.train.loop import resume_state, train

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "config", "resume")}
    if "model" in given:
        given["model"] = dict(given["model"])
    values = _read_config_file(args.config) if args.config else {}
    values.update(given)
    if "model" in values and not isinstance(values["model"], dict):
        raise InputError("model settings must be a JSON object of ElectraModelConfig fields")
    resume = None
    if args.resume:
        output_dir = values.get("output_dir") or default_output_dir(values.get("arch", "electra"),
                                                                    values.get("preset", "tiny"))
        resume = resume_state(args.resume, output_dir)
        values = {**resume["config"], **values} if resume is not None else values
    cfg = TrainConfig(**values)
    # Told on Ctrl-C (see main): the command that continues this run; the checkpoint holds every other setting.
    output_dir = cfg.output_dir or default_output_dir(cfg.arch, cfg.preset)
    args.resume_hint = f"electra-fast pretrain --resume -o {shlex.quote(output_dir)}"
    summary = train(cfg, resume=resume)
    if summary.get("stopped"):
        if os.environ.get("RANK", "0") == "0":
            print(f"electra-fast: {summary['stopped']}: stopped after step {summary['step']}, checkpoint "
                  f"{summary['checkpoint']}; `electra-fast pretrain --resume auto -o {shlex.quote(output_dir)}` "
                  "continues", file=sys.stderr, flush=True)
        return cfg.requeue_exit_code
    if summary["eval"] is not None:
        from electra_fast.train.evaluate import summary_line

        print(summary_line(summary["eval"]))
    if summary["checkpoint"]:
        m = summary["metrics"]
        loss = f", final loss {m['loss']:.4f}, discriminator accuracy {m['disc_accuracy']:.3f}" if m else ""
        skipped = summary["skipped_lines"]
        print(f"done: {summary['step']} steps{loss}; checkpoint {summary['checkpoint']}"
              + (f"; transformers model in {summary['output_dir']}/discriminator" if cfg.export is not False else "")
              + (f"; skipped {skipped} lines that were not UTF-8" if skipped else ""))
    return 0


INPUTS_HELP = ("text files (.gz, .bz2, .zst too: one sentence per line, blank line between documents), JSON Lines "
               "(.jsonl, .jsonl.gz: one document per record), parquet files or Hugging Face `datasets` folders "
               "(save_to_disk; these two need: pip install \"electra-fast[datasets]\"), directories of them, or "
               "quoted patterns such as 'corpus/*.txt.zst' (default: the built-in corpus)")
TEXT_FIELD_HELP = "the JSON Lines field / parquet or datasets column holding the text (default: text)"
PRESET_NAMES = ("tiny", "small", "base", "large")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="text -> packed, tokenized, memory-mapped training shards",
                       description="Tokenize text and pack it into [CLS] A [SEP] B [SEP] examples, as the reference "
                                   "build_pretraining_dataset.py. Records and rows are split into sentences.")
    p.add_argument("inputs", nargs="*", metavar="PATH", help=INPUTS_HELP)
    p.add_argument("-o", "--output", required=True, help="dataset directory to write")
    p.add_argument("--text-field", default="text", metavar="NAME", help=TEXT_FIELD_HELP)
    p.add_argument("--tokenizer", help="tokenizer.json / vocab.txt / directory (default: train one on the inputs)")
    p.add_argument("--vocab-size", type=int, default=30522, help="size of a trained tokenizer (default 30522)")
    p.add_argument("--cased", action="store_true", help="keep case (tokenizer training and vocab.txt loading)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny",
                   help="the model preset the data is for: its sequence length is the default --seq-len "
                        "(default: tiny, as `electra-fast pretrain`)")
    p.add_argument("--seq-len", type=int, help="tokens per example (default: the preset's: tiny 64, small 128, "
                   "base and large 512)")
    p.add_argument("--seed", type=int, default=12345, help="packing randomness (default 12345)")
    p.add_argument("--shard-size", type=int, help="examples per shard (default: ~64 MB shards)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    p.add_argument("--workers", type=int, metavar="N", help="processes that tokenize and pack (default: the "
                   "machine's cores); the output is the same for every N")
    p.add_argument("--resume", action="store_true", help="continue a stopped preparation of the same inputs and "
                   "settings in --output from its last complete shard (the same dataset as an uninterrupted run)")
    p.add_argument("--hf-dataset", metavar="NAME", help="read a Hugging Face dataset (hub name, or a local dataset "
                   "folder or script) streaming, instead of PATHs; needs the `datasets` package")
    p.add_argument("--hf-config", metavar="C", help="its configuration (default: the dataset's default)")
    p.add_argument("--hf-split", metavar="S", default="train", help="its split (default: train)")
    p.add_argument("--word-segmenter", metavar="NAME", help="store which tokens start a word, found by NAME: "
                   "jieba (Chinese; needs the jieba package), whitespace, or chars (each character a word); for "
                   "text whose tokens carry no word marker (WordPiece ## and SentencePiece \u2581 need none)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_prepare)


def _check_output(path: str) -> None:
    """Fail at once (before torch is imported or a tokenizer trained), creating nothing, if `path` cannot become a
    directory to write in: its nearest existing ancestor must be a writable directory."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        ensure_writable(path, "--output")  # fails, with the operating system's reason


def _prepare(args) -> int:
    check_int(args.seq_len, "--seq-len", low=5, allow_none=True, error=InputError)
    check_int(args.shard_size, "--shard-size", low=1, allow_none=True, error=InputError)
    check_int(args.workers, "--workers", low=1, allow_none=True, error=InputError)
    if args.hf_dataset and args.inputs:
        raise InputError(f"pass either input paths ({args.inputs}) or --hf-dataset {args.hf_dataset!r}, not both")
    if not args.hf_dataset and (args.hf_config or args.hf_split != "train"):
        raise InputError("--hf-config and --hf-split need --hf-dataset NAME")
    _check_output(args.output)
    from electra_fast.data import prepare_text
    from electra_fast.data.corpus import HubDataset

    if args.seq_len is None:
        from electra_fast.model.config import PRESETS

        args.seq_len = PRESETS[args.preset]["seq_len"]
    index = prepare_text(args.inputs or None, args.output, tokenizer=args.tokenizer, seq_len=args.seq_len,
                         vocab_size=args.vocab_size, lowercase=not args.cased, seed=args.seed,
                         overwrite=args.overwrite, shard_size=args.shard_size, progress=args.progress,
                         text_field=args.text_field, workers=args.workers, resume=args.resume,
                         word_segmenter=args.word_segmenter,
                         hub=HubDataset(args.hf_dataset, args.hf_config, args.hf_split, args.text_field)
                         if args.hf_dataset else None)
    skipped = index.get("skipped_lines", 0)
    print(f"wrote {index['num_examples']} examples of {args.seq_len} tokens ({index['num_tokens']} tokens, "
          f"{len(index['shards'])} shards, vocabulary {index['vocab_size']}) to {args.output}"
          + (f"; skipped {skipped} lines that were not UTF-8" if skipped else ""))
    return 0


def _add_train_tokenizer(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train a BERT WordPiece tokenizer on text")
    p.add_argument("inputs", nargs="*", metavar="PATH", help=INPUTS_HELP)
    p.add_argument("-o", "--output", required=True, help="directory for tokenizer.json and vocab.txt")
    p.add_argument("--text-field", default="text", metavar="NAME", help=TEXT_FIELD_HELP)
    p.add_argument("--vocab-size", type=int, default=30522, help="vocabulary size (default 30522)")
    p.add_argument("--cased", action="store_true", help="keep case")
    p.set_defaults(func=_train_tokenizer)


def _train_tokenizer(args) -> int:
    _check_output(args.output)
    from electra_fast.data.sources import TextSource, train_on
    from electra_fast.data.tokenizer import save_tokenizer

    reader = TextSource(args.inputs, args.text_field).lines()
    tok = train_on(reader, args.vocab_size, lowercase=not args.cased)
    save_tokenizer(tok, args.output)
    skipped = getattr(reader, "skipped", 0)
    print(f"wrote a {tok.get_vocab_size()}-token tokenizer to {args.output}"
          + (f"; skipped {skipped} lines that were not UTF-8" if skipped else ""))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's discriminator and generator in transformers format")
    p.add_argument("checkpoint", help="a run's output directory (its newest checkpoint) or a checkpoint file")
    p.add_argument("-o", "--output", help="where discriminator/ and generator/ go (default: the run directory)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from electra_fast.train.export import export

    output = args.output
    if output is None:  # runs/x/checkpoints/checkpoint-N.pt -> runs/x
        output = args.checkpoint if os.path.isdir(args.checkpoint) else \
            os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint)))
    export(args.checkpoint, output)
    print(f"wrote {os.path.join(output, 'discriminator')} and {os.path.join(output, 'generator')} "
          "(transformers format)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="electra-fast", description="Fast ELECTRA pretraining.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_pretrain(sub)
    _add_prepare(sub)
    _add_train_tokenizer(sub)
    _add_export(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `electra-fast` console script. Returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"electra-fast: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        print("electra-fast: interrupted" + (f"; `{hint}` continues from the last checkpoint" if hint else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
