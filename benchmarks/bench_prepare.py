"""`electra-fast prepare` against the tokenizer alone: MB/s, tokens/s, the ratio to `tokenizers`' `encode_batch` over
the same lines on the same cores (measured in the same run, before and after, their mean the reference), and peak
RSS (the process and its workers together), for 1..N workers. The goal: a ratio of at least 0.9 (the packing
hidden behind the tokenizer).

The corpus is generated (English sentences of Python's documentation, shuffled into documents, a fifth of the words
misspelt so that WordPiece splits them as it splits rare words; streamed to disk, `--size-mb` of it: several GB
outside CI to see that memory stays flat) or given (`--corpus`, one sentence per line). The tokenizer is loaded
(`--tokenizer`) or a `--vocab-size` WordPiece is trained on the corpus's first `--train-mb`.

    python benchmarks/bench_prepare.py --size-mb 30                       # workers 1..cores
    python benchmarks/bench_prepare.py --size-mb 4000 --workers 16 --seq-len 512 --out prep.json
Each measurement is a fresh process (`python -m electra_fast prepare ...` or a baseline script), so none inherits
another's page cache warmth unfairly: the corpus is read once before the first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASELINE = """
import os, sys, time
from tokenizers import Tokenizer
from electra_fast.data.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
encode = getattr(tok, sys.argv[3])
tokens, batch, t0 = 0, [], time.perf_counter()
def run(batch):
    return sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
with open(sys.argv[2], encoding="utf-8", errors="replace") as f:
    for line in f:
        line = line.strip()
        if line:
            batch.append(line)
            if len(batch) == 2048:
                tokens += run(batch)
                batch = []
tokens += run(batch) if batch else 0
print(tokens, time.perf_counter() - t0)
"""


def generate(path: str, size_mb: float, seed: int = 0) -> None:
    from electra_fast.data.corpus import builtin_lines

    sentences = [line for line in builtin_lines() if line]
    rng, target, written = random.Random(seed), int(size_mb * 1e6), 0

    def misspelt(sentence: str) -> str:
        words = sentence.split()
        for i in range(len(words)):
            if rng.random() < 0.2 and len(words[i]) > 3:
                w = list(words[i])
                j = rng.randrange(len(w) - 1)
                w[j], w[j + 1] = w[j + 1], w[j]
                words[i] = "".join(w)
        return " ".join(words)

    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            doc = "".join(misspelt(rng.choice(sentences)) + "\n" for _ in range(rng.randint(3, 40))) + "\n"
            f.write(doc)
            written += len(doc.encode())


def train(corpus: str, mb: float, vocab_size: int, out: str) -> None:
    from electra_fast.data.tokenizer import save_tokenizer, train_tokenizer

    def head():
        seen = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                seen += len(line)
                if seen > mb * 1e6:
                    return
                yield line

    save_tokenizer(train_tokenizer(head(), vocab_size), out)


def measure(cmd, env=None):
    """(wall seconds, peak RSS in MB of the process tree summed, stdout) of `cmd`, RSS sampled every 50 ms."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {err[-2000:]}")
    return wall, peak / 2**20, out


def versions() -> dict:
    import numpy
    import tokenizers

    return {"python": platform.python_version(), "tokenizers": tokenizers.__version__, "numpy": numpy.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))}


def main(argv=None) -> int:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="a text file, one sentence per line (default: generate one)")
    p.add_argument("--size-mb", type=float, default=30, help="size of the generated corpus (default 30)")
    p.add_argument("--tokenizer", help="tokenizer.json / vocab.txt (default: train one)")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--train-mb", type=float, default=5, help="text the tokenizer is trained on (default 5 MB)")
    p.add_argument("--workers", default=",".join(str(n) for n in range(1, cores + 1)),
                   help="comma-separated worker counts (default 1..cores)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--workdir", help="where the corpus, tokenizer and datasets go (default: a temporary folder)")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="prepare only (no encode_batch runs): for the peak RSS of a multi-GB input")
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_prepare-")
    os.makedirs(work, exist_ok=True)
    corpus = args.corpus or os.path.join(work, "corpus.txt")
    if not args.corpus and not (os.path.isfile(corpus) and os.path.getsize(corpus) >= args.size_mb * 1e6 * 0.99):
        generate(corpus, args.size_mb)
    tok = args.tokenizer or os.path.join(work, "tok")
    if not args.tokenizer and not os.path.isdir(tok):
        train(corpus, args.train_mb, args.vocab_size, tok)
    size = os.path.getsize(corpus)
    with open(corpus, "rb") as f:  # into the page cache, for every run alike
        while f.read(1 << 24):
            pass
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    baseline = [sys.executable, "-c", BASELINE, tok, corpus]

    def base(kind: str) -> dict:
        wall, rss, out = measure(baseline + [kind], env)
        tokens, seconds = out.split()
        return {"tokens": int(tokens), "seconds": float(seconds), "wall": wall, "rss_mb": rss}

    rows = []
    if args.baseline:
        before, fast = base("encode_batch"), base("encode_batch_fast")
    for n in [int(w) for w in args.workers.split(",")]:
        out_dir = os.path.join(work, f"data-{n}")
        wall, rss, _ = measure([sys.executable, "-m", "electra_fast", "prepare", corpus, "-o", out_dir, "--tokenizer",
                                tok, "--seq-len", str(args.seq_len), "--workers", str(n), "--no-progress",
                                "--overwrite"], env)
        rows.append({"workers": n, "seconds": wall, "rss_mb": rss})
    if not args.baseline:
        print(f"corpus {size / 1e6:.1f} MB; {cores} cores; seq_len {args.seq_len}; {json.dumps(versions())}")
        for r in rows:
            print(f"prepare --workers {r['workers']:<2}: {size / 1e6 / r['seconds']:6.2f} MB/s ({r['seconds']:.1f} s, "
                  f"whole command) peak RSS {r['rss_mb']:.0f} MB")
        return 0
    after = base("encode_batch")
    reference = (before["seconds"] + after["seconds"]) / 2
    tokens = before["tokens"]
    print(f"corpus {size / 1e6:.1f} MB, {tokens} tokens; {cores} cores; seq_len {args.seq_len}; "
          f"{json.dumps(versions())}")
    base_rss = max(before["rss_mb"], after["rss_mb"])
    print(f"encode_batch        : {size / 1e6 / reference:6.2f} MB/s {tokens / reference / 1e6:6.2f} M tokens/s "
          f"(runs {before['seconds']:.1f} s, {after['seconds']:.1f} s) peak RSS {base_rss:.0f} MB")
    print(f"encode_batch_fast   : {size / 1e6 / fast['seconds']:6.2f} MB/s {tokens / fast['seconds'] / 1e6:6.2f} M "
          f"tokens/s ({fast['seconds']:.1f} s, ratio {reference / fast['seconds']:.2f}) "
          f"peak RSS {fast['rss_mb']:.0f} MB")
    for r in rows:
        r["ratio"] = reference / r["seconds"]
        print(f"prepare --workers {r['workers']:<2}: {size / 1e6 / r['seconds']:6.2f} MB/s "
              f"{tokens / r['seconds'] / 1e6:6.2f} M tokens/s ({r['seconds']:.1f} s, whole command) "
              f"ratio {r['ratio']:.2f} peak RSS {r['rss_mb']:.0f} MB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": date.today().isoformat(), "corpus_bytes": size, "tokens": tokens,
                       "seq_len": args.seq_len, "versions": versions(), "encode_batch": [before, after],
                       "encode_batch_fast": fast, "prepare": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
