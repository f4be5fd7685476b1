"""The three ways benchmarks/bench_e2e.py builds one ELECTRA training step (its docstring compares them):
`transformers` as users write it today, `hf-dropin` (the same transformers models through `ElectraPretrainer`) and
`ours` (`ElectraPretrainer.from_preset`), each in its modes (eager, compiled, CUDA graph). benchmarks/step_model.py
counts the same steps on a CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# BERT's token ids, which the benchmarks' batches use
MASK_ID, CLS, SEP, PAD = 103, 101, 102, 0
SPECIAL = (0, 100, 101, 102, 103)


def hf_models(gen_cfg, disc_cfg, device="cuda"):
    from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

    from electra_fast.model.hf_format import to_hf_config

    gen = ElectraForMaskedLM(ElectraConfig(**to_hf_config(gen_cfg, "ElectraForMaskedLM")))
    disc = ElectraForPreTraining(ElectraConfig(**to_hf_config(disc_cfg, "ElectraForPreTraining")))
    disc.electra.embeddings = gen.electra.embeddings  # ELECTRA shares them; so does a careful user
    return gen.to(device).train(), disc.to(device).train()


def ours(preset: str, vocab: int):
    """`ElectraPretrainer.from_preset` on the CPU with BERT's token ids (the batches' ids), id-range check off."""
    from electra_fast.pretraining.pretrainer import ElectraPretrainer

    return ElectraPretrainer.from_preset(preset, vocab_size=vocab, mask_token_id=MASK_ID, special_token_ids=SPECIAL,
                                         pad_token_id=PAD, validate=False)


def transformers_step_fn(gen, disc, mask_prob: float):
    """The step as users write it today with transformers (all-position LM head, boolean indexing)."""
    def step(ids, attention_mask):
        real = attention_mask.bool()
        candidates = real & (ids != CLS) & (ids != SEP) & (ids != MASK_ID) & (ids != PAD)
        masked = candidates & (torch.rand(ids.shape, device=ids.device) < mask_prob)
        to_mask = masked & (torch.rand(ids.shape, device=ids.device) < 0.85)
        gen_ids = torch.where(to_mask, torch.full_like(ids, MASK_ID), ids)
        logits = gen(input_ids=gen_ids, attention_mask=attention_mask).logits  # [B, L, V]: every position
        masked_logits = logits[masked]  # boolean indexing: a host sync and a dynamic shape
        targets = ids[masked]
        mlm_loss = F.cross_entropy(masked_logits.float(), targets)
        with torch.no_grad():
            u = torch.rand(masked_logits.shape, device=ids.device)
            sampled = (masked_logits.float() - torch.log(-torch.log(u + 1e-9) + 1e-9)).argmax(-1)
        disc_ids = ids.clone()
        disc_ids[masked] = sampled
        labels = (disc_ids != ids).float()
        disc_logits = disc(input_ids=disc_ids, attention_mask=attention_mask).logits
        disc_loss = F.binary_cross_entropy_with_logits(disc_logits[real].float(), labels[real])
        return mlm_loss + 50.0 * disc_loss

    return step


def make_optimizer(params, capturable: bool):
    # A captured step reads the LR from a device tensor (a float would be frozen into the graph).
    kw = dict(lr=torch.tensor(1e-4, device="cuda") if capturable else 1e-4, betas=(0.9, 0.999), eps=1e-6,
              weight_decay=0.01)
    try:
        return torch.optim.AdamW(params, fused=True, capturable=capturable, **kw), "fused"
    except (RuntimeError, ValueError, TypeError):  # fused + capturable unsupported in this torch
        return torch.optim.AdamW(params, foreach=True, capturable=capturable, **kw), "foreach"


def build(impl: str, mode: str, preset: str, vocab: int, device: str = "cuda", attention: str = "auto"):
    """Returns (step function taking (ids, mask) and returning a loss tensor, notes dict, the `ElectraPretrainer`
    the step trains, None for transformers). `attention`: the slim encoders' attention path (ours only)."""
    from electra_fast.train.cuda_graph import CUDAGraphStep
    from electra_fast.train.step import TrainStep
    from electra_fast.model.config import preset_configs
    from electra_fast.pretraining.pretrainer import ElectraPretrainer, param_groups

    gen_cfg, disc_cfg = preset_configs(preset, vocab_size=vocab)
    notes = {}
    if impl == "ours":
        model = ours(preset, vocab).to(device)
        model.options = model.options.replace(attention=attention)  # both slim encoders' configs
    else:
        gen, disc = hf_models(gen_cfg, disc_cfg, device)
        if impl == "transformers":
            if mode == "compiled":
                gen, disc = torch.compile(gen), torch.compile(disc)
            params = {id(p): p for p in list(gen.parameters()) + list(disc.parameters())}.values()
            opt, notes["adamw"] = make_optimizer(list(params), capturable=False)
            loss_fn = transformers_step_fn(gen, disc, 0.15)

            def hf_step(ids, mask):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = loss_fn(ids, mask)
                loss.backward()
                opt.step()
                return loss

            notes["attention_taken"] = f"transformers:{gen.config._attn_implementation}"
            return hf_step, notes, None
        model = ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL, validate=False)
        model = model.to(device)

    graph = mode.endswith("graph")
    opt, notes["adamw"] = make_optimizer(param_groups(model), capturable=graph)
    net = model
    if mode.startswith("compiled"):
        # fullgraph for ours proves the one-graph claim; transformers' internals may differ between versions
        net = torch.compile(model, fullgraph=impl == "ours")
    if graph:
        holder = {}

        def graph_step(ids, mask):
            batch = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
            if "step" not in holder:  # capture on the first call, so compile time is measured like the others
                train_step = TrainStep(model, opt, max_grad_norm=None, amp_dtype=torch.bfloat16, forward=net)
                holder["step"] = CUDAGraphStep(train_step, batch)
            return holder["step"]([batch]).loss

        return graph_step, notes, model

    def step(ids, mask):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = net(ids, mask)
        out.loss.backward()
        opt.step()
        return out.loss

    return step, notes, model
