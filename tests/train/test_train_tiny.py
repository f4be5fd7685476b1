"""A tiny ELECTRA learns on real text: Python's own bundled documentation (`pydoc_data.topics`).

A word-level vocabulary is built here (the library's data pipeline is tested elsewhere). After 150 steps the
generator's MLM loss and the discriminator's loss fall, and the discriminator beats the all-original baseline:
at this size it learns slowly (the generator's samples turn plausible within ~20 steps), so dropout is off and the
margins asserted are the ones it reaches for any seed, a few seconds of CPU.
"""
import collections
import re

import torch

from electra_fast.pretraining.pretrainer import ElectraPretrainer, param_groups

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)
VOCAB, B, L, STEPS = 1000, 32, 64, 150


def corpus_ids():
    from pydoc_data.topics import topics

    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", " ".join(topics[k] for k in sorted(topics)).lower())
    common = [w for w, _ in collections.Counter(words).most_common(VOCAB - len(SPECIALS))]
    index = {w: i + len(SPECIALS) for i, w in enumerate(common)}
    return torch.tensor([index.get(w, UNK) for w in words])


def batches(stream, rng):
    body = L - 2
    n_rows = stream.numel() // body
    rows = stream[: n_rows * body].view(n_rows, body)
    while True:
        pick = rows[torch.randint(0, n_rows, (B,), generator=rng)]
        ids = torch.cat([torch.full((B, 1), CLS), pick, torch.full((B, 1), SEP)], dim=1)
        # Some rows end early with padding, so the attention mask is exercised too.
        lengths = torch.randint(L // 2, L + 1, (B,), generator=rng)
        mask = (torch.arange(L) < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, PAD)
        ids[torch.arange(B), lengths - 1] = SEP
        yield ids, mask


def test_tiny_model_learns_on_python_docs():
    stream = corpus_ids()
    assert stream.numel() > 50_000 and (stream == UNK).float().mean() < 0.2
    model = ElectraPretrainer.from_preset("tiny", vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=PAD,
                                          special_token_ids=range(5), hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, betas=(0.9, 0.999), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / STEPS))
    history = []
    data = batches(stream, torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    for _ in range(STEPS):
        ids, mask = next(data)
        out = model(ids, mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(out.to_dict())

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    first, last = history[:10], history[-20:]
    summary = {k: (round(mean(k, first), 3), round(mean(k, last), 3)) for k in history[0]}
    assert mean("mlm_loss", last) < 0.9 * mean("mlm_loss", first), summary  # ~6.9 (ln 1000) -> ~5.5
    assert mean("disc_loss", last) < 0.7 * mean("disc_loss", first), summary  # ~0.67 -> ~0.34
    assert mean("gen_accuracy", last) > 0.03, summary  # ~0.08
    # Labelling every token "original" scores 1 - replaced_frac (~0.85); the discriminator must do better,
    # with "replaced" calls mostly right (chance precision is the replaced fraction, ~0.15).
    assert mean("disc_accuracy", last) > 1 - mean("replaced_frac", last) + 0.005, summary  # ~+0.012
    assert mean("precision", last) > 0.4 and mean("recall", last) > 0.05, summary  # ~0.65, ~0.18
