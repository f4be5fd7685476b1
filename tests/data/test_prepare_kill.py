"""`electra-fast prepare --workers 2` killed (SIGKILL, its whole process group) once its first shard is recorded,
then `--resume`: every file byte-identical (SHA-256) to an uninterrupted run's, and a reader meanwhile sees only the
older dataset the directory held, complete, never the unfinished one; what a kill leaves half-written never
reaches the dataset."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from electra_fast.cli import main  # noqa: E402
from electra_fast.data import PretrainingData, builtin_lines, save_tokenizer, train_tokenizer  # noqa: E402
from helpers import dataset_files, document_text, documents  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SENTENCES = [line for line in builtin_lines() if line]


def hashes(directory):
    """relative path -> SHA-256 of every file of a dataset, the lock file aside."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in dataset_files(directory).items()}


def corpus(path, copies, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.write(document_text(documents(SENTENCES, rng, 30)))


def recorded_shards(out):
    for name in os.listdir(out):
        if name.startswith(".prepare-"):
            try:
                with open(os.path.join(out, name, "progress.json"), encoding="utf-8") as f:
                    return len(json.load(f)["shards"])
            except (OSError, ValueError):
                pass
    return 0


def test_sigkill_then_resume_gives_the_uninterrupted_bytes(tmp_path, capsys):
    tok = train_tokenizer(iter(SENTENCES[:3000]), vocab_size=800)
    save_tokenizer(tok, str(tmp_path / "tok"))
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    corpus(big, 6, 1)  # ~2.8 MB: 3 chunks of input, 50 shards, seconds of work after the first shard
    corpus(small, 1, 2)
    common = ["--tokenizer", str(tmp_path / "tok"), "--seq-len", "32", "--shard-size", "512", "--no-progress"]
    assert main(["prepare", str(big), "-o", str(tmp_path / "want"), "--workers", "1", *common]) == 0
    out = tmp_path / "data"
    assert main(["prepare", str(small), "-o", str(out), "--workers", "1", *common]) == 0  # the dataset in use
    old_hashes, old = hashes(out), PretrainingData(str(out))
    old_rows = old.gather(np.arange(len(old)))["input_ids"]
    capsys.readouterr()

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "electra_fast", "prepare", str(big), "-o", str(out), "--workers", "2", "--overwrite",
           *common]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, readers = time.monotonic() + 240, 0
        while recorded_shards(out) == 0:  # wait for the first complete shard, reading the directory meanwhile
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard recorded in 240 s"
            data = PretrainingData(str(out))  # what a reader sees: the older dataset, whole
            assert len(data) == len(old)
            readers += 1
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, at once
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL and readers > 0
    total = len(json.loads((tmp_path / "want" / "index.json").read_text())["shards"])
    assert 0 < recorded_shards(out) < total // 2, total  # killed after its first shard, far from the end
    assert hashes(out).items() >= old_hashes.items()  # the older dataset untouched, its index still in place
    data = PretrainingData(str(out))
    assert np.array_equal(data.gather(np.arange(len(data)))["input_ids"], old_rows)

    # What a kill at another instant leaves too (this one may or may not have): a progress file not yet renamed
    # into place, and the next shard half-written.
    (hidden,) = [out / n for n in os.listdir(out) if n.startswith(".prepare-")]
    (hidden / "progress.json.tmp-99999").write_text('{"shards": [')
    (hidden / f"shard-{recorded_shards(out):05d}-ids.npy").write_bytes(b"\x93NUMPY half")

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    got, want = hashes(out), hashes(tmp_path / "want")
    assert sorted(got) == sorted(want) and "index.json" in got
    assert got == want
