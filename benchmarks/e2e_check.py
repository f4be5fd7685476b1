"""bench_e2e.py's first-step check (its docstring says what is compared): the row's own step on its first batch
with dropout off, recording the masks, samples and path it took, against an fp64 torch-backend reference step from
those masks and samples."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from common import record_backends, sampler_of


# bf16 tolerance of the first-step check: the step computes in bf16 (unit roundoff 2^-9) and its losses are means
# over many slots and tokens, so rounding moves them little. Measured on the CPU, bf16 step against the fp64
# reference: at most 3.5e-4 relative (tiny preset: torch backend, and the Triton kernels in the interpreter; small
# preset, 12 layers, B=16 L=128: torch backend). 5e-3 leaves over ten times that for base's width and the GPU's
# kernels, while a wrong step moves a loss by more: 2.5% of slots mis-weighted, a loss term or a head weight off.
CHECK_RTOL, CHECK_ATOL = 5e-3, 1e-3
# At initialisation the discriminator's logits are near 0, where the BCE hardly depends on the labels (ln 2 either
# way): the labels are checked through the step's `replaced_frac`, a ratio of the head's integer counts (fp32).
COUNT_TOL = 1e-6
CHECKED = ("mlm_loss", "disc_loss", "loss", "replaced_frac")


@contextlib.contextmanager
def dropout_off(model):
    """Dropout probabilities 0 within the block, the modules staying in training mode, so that the encoders choose
    the attention path of the training step (the padding mask depends on `training`). Dropout draws differ between
    kernels and the reference and cannot be replayed; without them the losses are functions of weights, batch,
    masks and samples only."""
    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            saved.append((m, "p", m.p))
            m.p = 0.0
        if isinstance(getattr(m, "attn_dropout", None), float):  # the slim encoder layer's attention dropout
            saved.append((m, "attn_dropout", m.attn_dropout))
            m.attn_dropout = 0.0
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


@contextlib.contextmanager
def forced_backend(name):
    from electra_fast.ops import _backend, set_backend

    before = _backend._forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


@contextlib.contextmanager
def _spied(module, name: str, record):
    """`module.name` (a function) hands its arguments and result to `record(args, kwargs, out)` within the block."""
    original = getattr(module, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        record(args, kwargs, out)
        return out

    setattr(module, name, spy)
    try:
        yield
    finally:
        setattr(module, name, original)


def _attention_label(mask) -> str:
    from torch.nn.attention.flex_attention import BlockMask

    from electra_fast.model.attention import VarlenMask

    if mask is None:
        return "sdpa:no-mask"
    if isinstance(mask, VarlenMask):
        return "varlen:flash" if mask.bias is None else "varlen:sdpa-bias"
    return "flex" if isinstance(mask, BlockMask) else "sdpa:bias"


def kernel_path(model, ids, mask, device: str) -> dict:
    """One forward of the step's own path (the ops' backends as the step resolves them, bf16 autocast, dropout
    off), recording what it took: its losses, the masks (`mask_tokens`' output) and the samples (`replace_tokens`'
    input), each op's backend, the attention path of each encoder and the sampler."""
    import electra_fast.model.encoder as model_module
    import electra_fast.pretraining.rtd_step as pretrainer

    calls: dict = {}
    attention: list = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(dropout_off(model))
        for name in ("mask_tokens", "replace_tokens"):
            stack.enter_context(_spied(pretrainer, name, lambda a, k, out, name=name: calls.setdefault(name, (a, out))))
        # the slim encoders build their padding mask here once per forward: its type is the attention path taken
        stack.enter_context(_spied(model_module, "padding_mask",
                                   lambda a, k, out: attention.append(_attention_label(out))))
        backends = stack.enter_context(record_backends())
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(ids, mask)
    if len(calls) < 2:
        raise RuntimeError("the step did not call mask_tokens and replace_tokens: nothing to check it against")
    masked_ids, positions, weights = calls["mask_tokens"][1]
    sampled = calls["replace_tokens"][0][3].reshape(positions.shape)  # the step hands them over flat, [B x N]
    disc_ids, is_replaced = calls["replace_tokens"][1]
    mlm_backend = backends.get("lm_head_loss_and_sample", backends.get("mlm_loss_and_sample", "?"))
    if attention:
        taken = "|".join(dict.fromkeys(attention))
    else:  # transformers encoders (hf-dropin): their own attention
        taken = "transformers:" + getattr(getattr(model.discriminator, "config", None), "_attn_implementation", "?")
    return {"losses": {k: float(getattr(out, k).detach()) for k in CHECKED},
            "masked_ids": masked_ids, "positions": positions, "weights": weights, "sampled": sampled,
            "disc_ids": disc_ids, "is_replaced": is_replaced, "backends": backends,
            "attention_taken": taken, "sampler": sampler_of(mlm_backend.split("|")[0])}


def reference_step(model, ids, mask, masked_ids, positions, weights, sampled) -> dict:
    """The step's losses in fp64 through the torch backend on a copy of `model` (same weights, dropout off, the
    dense-bias attention), from the given masks and samples: masked ids -> generator -> gathered slots -> LM head ->
    weighted cross-entropy; samples written into the original ids -> discriminator -> BCE over real tokens."""
    from electra_fast.ops.masked_gather import masked_gather_reference
    from electra_fast.ops.mlm_loss_and_sample import weighted_mean
    from electra_fast.ops.replace_tokens import replace_tokens_mean_reference, replace_tokens_reference
    from electra_fast.pretraining.families import check_pair, pair_dims

    ref = copy.deepcopy(model).double().eval()
    ref.options = ref.options.replace(attention="sdpa")  # the slim encoders' dense-bias path
    gen, disc = check_pair(ref.generator, ref.discriminator)
    vocab = pair_dims(gen, disc)["vocab_size"]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with forced_backend("torch"), torch.no_grad():
            slots = masked_gather_reference(gen.encode(masked_ids, mask, None), positions)
            logits = gen.lm_logits(slots.flatten(0, 1))[:, :vocab].double()
            targets = ids.gather(1, positions).reshape(-1)
            w = weights.reshape(-1).double()
            ce = torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None])[:, 0]
            mlm = weighted_mean(ce, w)
            replace = replace_tokens_mean_reference if ref.masking == "with_replacement" else replace_tokens_reference
            disc_ids, is_replaced = replace(ids, positions, weights, sampled)
            features, projection = disc.disc_head(disc.encode(disc_ids, mask, None))
            z = F.linear(features, projection.weight, projection.bias).squeeze(-1).double()
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask != 0
            bce = F.binary_cross_entropy_with_logits(z, is_replaced.double(), reduction="none")
            disc_loss = bce[real].mean()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"losses": {"mlm_loss": float(mlm), "disc_loss": float(disc_loss),
                       "loss": float(ref.mlm_weight * mlm + ref.disc_weight * disc_loss),
                       "replaced_frac": float(is_replaced[real].double().mean())},
            "disc_ids": disc_ids, "is_replaced": is_replaced}


def _mask_problems(model, ids, mask, masked_ids, positions, weights, sampled, vocab: int) -> list:
    """What the masks and samples break of the step's contract (module docstring of electra_fast.ops.mask_tokens):
    real slots at distinct real, non-special positions, changed only to [MASK]; samples inside the vocabulary."""
    problems = []
    real_slot = weights > 0
    if not bool(real_slot.any()):
        problems.append("no real slot")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask != 0
    special = torch.isin(ids, model.special_token_ids.to(ids.device))
    slots_at = torch.zeros_like(ids).scatter_add_(1, positions, real_slot.to(ids.dtype))  # real slots per position
    chosen = slots_at > 0
    if not bool(torch.where(real_slot, (real & ~special).gather(1, positions), True).all()):
        problems.append("a real slot at padding or a special token")
    if bool((slots_at > 1).any()) and model.masking != "with_replacement":  # only that draw repeats positions
        problems.append("two real slots at one position")
    changed = masked_ids != ids
    if not bool((masked_ids[changed] == model.mask_token_id).all()) or bool((changed & ~chosen).any()):
        problems.append("masked ids changed beyond [MASK] at the slots")
    if not bool(((sampled >= 0) & (sampled < vocab))[real_slot].all()):
        problems.append("a sample outside the vocabulary")
    return problems


def first_step_check(model, ids, mask, device: str, compare: bool = True) -> dict:
    """The losses of the row's step on its first batch and initial weights against `reference_step` from the
    masks and samples the step drew itself. Returns the row's fields: `check` ("ok" or "failed: ..."), both sets
    of losses, and the path that ran (`backends`, `attention_taken`, `sampler`). `compare=False`: the path only
    (`check` "off")."""
    from electra_fast.pretraining.families import check_pair, pair_dims

    got = kernel_path(model, ids, mask, device)
    ran = {"backends": got["backends"], "attention_taken": got["attention_taken"], "sampler": got["sampler"]}
    if not compare:
        return {"check": "off", **ran}
    ref = reference_step(model, ids, mask, got["masked_ids"], got["positions"], got["weights"], got["sampled"])
    vocab = pair_dims(*check_pair(model.generator, model.discriminator))["vocab_size"]
    problems = _mask_problems(model, ids, mask, got["masked_ids"], got["positions"], got["weights"], got["sampled"],
                              vocab)
    for name, want in ref["losses"].items():
        have = got["losses"][name]
        atol, rtol = (COUNT_TOL, 0.0) if name == "replaced_frac" else (CHECK_ATOL, CHECK_RTOL)
        if not abs(have - want) <= atol + rtol * abs(want):  # NaN fails too
            problems.append(f"{name} {have:.6g} vs reference {want:.6g}")
    if not torch.equal(got["disc_ids"], ref["disc_ids"]) or not torch.equal(got["is_replaced"].bool(),
                                                                           ref["is_replaced"].bool()):
        problems.append("replaced ids differ from the reference's")
    return {"check": "ok" if not problems else "failed: " + "; ".join(problems),
            "check_losses": got["losses"], "reference_losses": ref["losses"],
            "check_tolerance": f"losses |d| <= {CHECK_ATOL} + {CHECK_RTOL} x |reference| (bf16 step, fp64 "
                               f"reference), replaced_frac |d| <= {COUNT_TOL}", **ran}
