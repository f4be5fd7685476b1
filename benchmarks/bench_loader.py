"""The loader at scale: the batch plan's memory at `--plan-examples` examples on 8 ranks (the full permutation of
earlier versions, the legacy order as it is now, and the Feistel order), and rank `--rank` of `--world` reading its
micro-batches (`--batch` x the dataset's `--seq-len`) through `PretrainingData.gather` from a cold page cache, then
warm; tokens/s against `--target` (2M tokens/s: what one small-preset H100 step consumes).

The dataset is generated (random token ids, `--size-gb` of uint16 shards of ~64 MB, written by hand in the format
`prepare` writes, its index last) unless `--data` names one. Cold: every shard file is dropped from the page cache
with `posix_fadvise(POSIX_FADV_DONTNEED)` (after `fsync`: dirty pages cannot be dropped); whether that took effect is
checked with `fincore` (util-linux) where installed, and shows in the first pass's time. Not for CI.

    python benchmarks/bench_loader.py --size-gb 1.5 --workdir /tmp/bench_loader
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PLAN = """
import sys, time, tracemalloc, resource
import numpy as np
from electra_fast.data.loader import BatchPlan
kind, n, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t0 = time.perf_counter()
if kind == "numpy-int64":  # what earlier versions built per rank per epoch
    perm = np.random.default_rng([0, 0]).permutation(n)
    idx = perm[:128]
else:
    plan = BatchPlan(n, 128 * world, world_size=world, rank=3, seed=0, order=kind)
    idx = plan.micro_batches(5)[0].indices
seconds = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak, (after - before) * 1024, seconds)
"""


def plan_memory(n: int, world: int, env) -> list:
    rows = []
    for kind in ("numpy-int64", "permutation-0", "feistel-1"):
        out = subprocess.run([sys.executable, "-c", PLAN, kind, str(n), str(world)], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        rows.append({"order": kind, "tracemalloc_peak_mb": int(out[0]) / 2**20, "rss_growth_mb": int(out[1]) / 2**20,
                     "seconds_first_batch": float(out[2])})
    return rows


def generate(directory: str, size_gb: float, seq_len: int, vocab: int = 30522) -> None:
    import numpy as np

    from electra_fast.data.shards import FORMAT, save_npy, write_json

    per_shard = (64 << 20) // (2 * seq_len)
    total = int(size_gb * 1e9) // (2 * seq_len)
    folder = os.path.join(directory, "shards-bench")
    os.makedirs(folder, exist_ok=True)
    rng, shards, k, done = np.random.default_rng(0), [], 0, 0
    while done < total:
        n = min(per_shard, total - done)
        ids = rng.integers(5, vocab, (n, seq_len), dtype=np.uint16)
        lens = np.full((n, 2), seq_len, dtype=np.int32)
        lens[:, 1] = rng.integers(3, seq_len - 1, n)
        for part, array in (("ids", ids), ("len", lens)):
            save_npy(os.path.join(folder, f"shard-{k:05d}-{part}.npy"), array)
        shards.append({"name": f"shards-bench/shard-{k:05d}", "num_examples": n})
        k, done = k + 1, done + n
    write_json(os.path.join(directory, "index.json"),
               {"format": FORMAT, "seq_len": seq_len, "dtype": "uint16", "vocab_size": vocab, "vocab_hash": "bench",
                "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, "tokenizer": "none",
                "num_examples": done, "num_tokens": done * seq_len, "shards": shards, "complete": True})


def shard_files(directory: str) -> list:
    with open(os.path.join(directory, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    names = [f"{s['name']}-{part}.npy" for s in index["shards"] for part in ("ids", "len")]
    return [os.path.join(directory, n) for n in names]


def resident_mb(files: list):
    """MB of `files` in the page cache (fincore), or None where fincore is missing."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True,
                         text=True).stdout.split()
    return sum(int(x) for x in out) / 1e6


def evict(files: list) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_pass(directory: str, world: int, rank: int, batch: int, steps: int) -> dict:
    from electra_fast.data.loader import BatchPlan, PretrainingData

    data = PretrainingData(directory)  # opened afresh: its memory maps start unmapped
    plan = BatchPlan(len(data), batch * world, world_size=world, rank=rank, seed=0)
    t0 = time.perf_counter()
    for step in range(steps):
        for mb in plan.micro_batches(step):
            data.gather(mb.indices)
    seconds = time.perf_counter() - t0
    tokens = steps * batch * data.seq_len
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "batches_per_s": steps / seconds}


def versions() -> dict:
    import numpy
    import torch

    return {"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "kernel": platform.release()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a prepared dataset (default: generate one)")
    p.add_argument("--size-gb", type=float, default=1.5, help="size of the generated dataset (default 1.5)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=128, help="micro-batch per rank (default 128: the small preset)")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="batches read per pass (default 300)")
    p.add_argument("--plan-examples", type=int, default=70_000_000)
    p.add_argument("--target", type=float, default=2e6, help="tokens/s a training step consumes (default 2M)")
    p.add_argument("--workdir", help="where the generated dataset goes (default: a temporary folder)")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    plan = plan_memory(args.plan_examples, args.world, env)
    for r in plan:
        print(f"plan {r['order']:<14} at {args.plan_examples} examples, {args.world} ranks: tracemalloc peak "
              f"{r['tracemalloc_peak_mb']:8.2f} MB, RSS growth {r['rss_growth_mb']:8.1f} MB, first batch "
              f"{r['seconds_first_batch']:.3f} s")
    directory = args.data
    if directory is None:
        directory = os.path.join(args.workdir or tempfile.mkdtemp(prefix="bench_loader-"), "data")
        if not os.path.isfile(os.path.join(directory, "index.json")):
            t0 = time.perf_counter()
            generate(directory, args.size_gb, args.seq_len)
            print(f"generated {directory} in {time.perf_counter() - t0:.0f} s")
    files = shard_files(directory)
    size = sum(os.path.getsize(f) for f in files) / 1e6
    before = resident_mb(files)
    evict(files)
    after = resident_mb(files)
    print(f"dataset {size:.0f} MB in {len(files)} files; page cache before eviction "
          f"{before if before is None else round(before)} MB, after {after if after is None else round(after)} MB")
    cold = read_pass(directory, args.world, args.rank, args.batch, args.steps)
    cold["cache_after_mb"] = resident_mb(files)  # what the cold pass read from disk, readahead included
    cold["rows_mb"] = args.steps * args.batch * args.seq_len * 2 / 1e6  # what it needed
    warm = read_pass(directory, args.world, args.rank, args.batch, args.steps)
    print(f"the cold pass needed {cold['rows_mb']:.1f} MB of rows; the page cache then held "
          f"{cold['cache_after_mb'] if cold['cache_after_mb'] is None else round(cold['cache_after_mb'])} MB of the "
          "dataset (readahead)")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"rank {args.rank} of {args.world}, B={args.batch}, {args.steps} batches, {name}: "
              f"{r['tokens_per_s'] / 1e6:7.2f} M tokens/s ({r['batches_per_s']:.0f} batches/s, {r['seconds']:.2f} s)"
              f" = {r['tokens_per_s'] / args.target:.2f}x the {args.target / 1e6:.0f}M tokens/s target")
    print(json.dumps(versions()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": date.today().isoformat(), "plan": plan, "dataset_mb": size, "cache_mb":
                       [before, after], "cold": cold, "warm": warm, "args": vars(args), "versions": versions()},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
