"""The RTD step: equals an independent recomputation with transformers models, checks inputs before any kernel,
compiles to one graph, and keeps the discriminator's loss away from the generator."""
import pytest
import torch
import torch.nn.functional as F

import electra_fast.pretraining.rtd_step as pt
from electra_fast.model.config import ElectraModelConfig
from electra_fast.ops import mask_tokens
from electra_fast.pretraining.pretrainer import ElectraPretrainer, embeddings_shared, param_groups, rtd_step

V, L, MASK_ID, SPECIAL = 150, 32, 4, (0, 1, 2, 3, 4)
IDS = dict(mask_token_id=MASK_ID, special_token_ids=SPECIAL, pad_token_id=0)
COMMON = dict(vocab_size=V, embedding_size=16, num_hidden_layers=2, max_position_embeddings=48,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GEN = dict(hidden_size=24, num_attention_heads=2, intermediate_size=40)
DISC = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48)


def make(**kwargs):
    return ElectraPretrainer.from_configs(ElectraModelConfig(**COMMON, **GEN), ElectraModelConfig(**COMMON, **DISC),
                                          mask_token_id=MASK_ID, special_token_ids=SPECIAL, **kwargs)


def batch():
    # Few distinct tokens, favoured by the generator fixture's output bias: non-zero generator accuracy.
    ids = torch.randint(5, 12, (4, L))
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[3, 9:] = 0
    ids[mask == 0] = 0
    ids[1, 19] = ids[3, 8] = 3  # [SEP]
    return ids, mask


def recompute_with_transformers(hf_gen, hf_disc, ids, mask, seed, *, mask_prob=0.15):
    """The step written independently from transformers' models: full-sequence generator logits, explicit Gumbel
    noise from the same uniforms, a Python loop for the replacement, boolean-masked BCE. The random draws are
    replayed from the same seed in the order the step makes them (masking, then one uniform per logit)."""
    torch.manual_seed(seed)
    masked_ids, positions, weights = mask_tokens(ids, mask, mask_prob=mask_prob, mask_token_id=MASK_ID,
                                                 special_token_ids=SPECIAL)
    logits = hf_gen(masked_ids, attention_mask=mask).logits.double()
    b, n = positions.shape
    slot_logits = torch.stack([logits[i, positions[i]] for i in range(b)]).reshape(b * n, -1)
    targets = torch.stack([ids[i, positions[i]] for i in range(b)]).reshape(-1)
    w = weights.reshape(-1).double()
    ce = F.cross_entropy(slot_logits, targets, reduction="none")
    mlm = (w * ce).sum() / (w.sum() + 1e-6)
    uniform = torch.rand(slot_logits.shape)
    sampled = (slot_logits - torch.log(-torch.log(uniform.double()))).argmax(1).reshape(b, n)
    disc_ids = ids.clone()
    for i in range(b):
        for j in range(n):
            if weights[i, j] > 0:
                disc_ids[i, positions[i, j]] = sampled[i, j]
    labels = (disc_ids != ids).double()
    d_logits = hf_disc(disc_ids, attention_mask=mask).logits.double()
    real = mask.bool()
    disc = F.binary_cross_entropy_with_logits(d_logits[real], labels[real])
    pred = d_logits[real] > 0
    lab = labels[real].bool()
    return dict(loss=mlm + 50.0 * disc, mlm_loss=mlm, disc_loss=disc,
                gen_accuracy=((slot_logits.argmax(1) == targets).double() * w).sum() / w.sum(),
                disc_accuracy=(pred == lab).double().mean(), replaced_frac=lab.double().mean(),
                precision=(pred & lab).sum() / pred.sum().clamp(min=1), recall=(pred & lab).sum() / lab.sum())


@pytest.fixture(scope="module")
def hf_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    gen = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**COMMON, **GEN)).eval()
    disc = transformers.ElectraForPreTraining(transformers.ElectraConfig(**COMMON, **DISC)).eval()
    with torch.no_grad():
        for p in list(gen.parameters()) + list(disc.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
        disc.electra.embeddings.load_state_dict(gen.electra.embeddings.state_dict())  # shared, as ELECTRA
        gen.generator_lm_head.bias[5:12] += 4.0  # the batch's tokens: some argmax predictions are right
    return gen, disc


@pytest.mark.parametrize("path", ["slim", "transformers"])
def test_step_equals_independent_recomputation(hf_models, path):
    from electra_fast.io import hf

    hf_gen, hf_disc = hf_models
    if path == "slim":
        gen, disc = hf.from_transformers(hf_gen).eval(), hf.from_transformers(hf_disc).eval()
    else:  # drop-in: the transformers models themselves
        gen, disc = hf_gen, hf_disc
    model = ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    ids, mask = batch()
    totals = {}
    for seed in range(4):
        torch.manual_seed(seed)
        out = model(ids, mask)
        with torch.no_grad():
            want = recompute_with_transformers(hf_gen, hf_disc, ids, mask, seed=seed)
        for name, value in want.items():
            got = getattr(out, name)
            assert got.dtype == torch.float32 and got.shape == ()
            torch.testing.assert_close(got.double(), value.double(), rtol=2e-5, atol=2e-6, msg=name)
            totals[name] = totals.get(name, 0.0) + value.item()
    # Every metric was exercised with non-trivial values at least once.
    assert all(v > 0 for v in totals.values()), totals
    assert totals["replaced_frac"] < 4 * 0.2 and totals["disc_accuracy"] < 4


def test_rtd_step_function_and_gradients():
    model = make()
    ids, mask = batch()
    torch.manual_seed(5)
    out = rtd_step(model.generator, model.discriminator, ids, mask, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    torch.manual_seed(5)
    torch.testing.assert_close(model(ids, mask).loss, out.loss)
    torch.testing.assert_close(out.loss, out.mlm_loss + 50 * out.disc_loss)
    # The discriminator's loss reaches the shared embeddings but no generator-only weight (sampling is discrete).
    out.disc_loss.backward(retain_graph=True)
    gen_only = [p for n, p in model.generator.named_parameters() if not n.startswith("embeddings.")]
    assert all(p.grad is None for p in gen_only)
    assert model.generator.embeddings.word.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out.mlm_loss.backward()
    shared = {id(p) for p in model.generator.embeddings.parameters()}
    assert all(p.grad is None for p in model.discriminator.parameters() if id(p) not in shared)
    assert all(p.grad is not None for p in gen_only)


def test_without_attention_mask_every_token_counts():
    model = make().eval()
    ids, _ = batch()
    torch.manual_seed(3)
    a = model(ids)
    torch.manual_seed(3)
    b = model(ids, torch.ones_like(ids))
    for name in ("loss", "disc_accuracy", "replaced_frac", "precision", "recall", "gen_accuracy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), msg=name)


def test_disallow_correct_replaces_every_real_slot():
    model = make(disallow_correct=True)
    ids, mask = batch()
    out = model(ids, mask)
    # K_b = max(1, min(N, round(0.15 * n_b))) real slots per row (all rows have enough candidates here).
    n = int((0.15 + 0.005) * L)
    k = torch.round(mask.sum(1).double() * 0.15).clamp(1, n)
    torch.testing.assert_close(out.replaced_frac.double(), k.sum() / mask.sum())


def test_bad_inputs_fail_before_any_kernel(monkeypatch):
    model = make()
    ids, mask = batch()

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input check")

    monkeypatch.setattr(pt, "mask_tokens", no_kernel)
    cases = [
        ((ids.clone().fill_(V),), "input_ids must lie in \\[0, vocab_size=150\\), got values in \\[150, 150\\]"),
        ((ids - 10,), "input_ids must lie in \\[0, vocab_size=150\\), got values in \\[-10"),
        ((torch.randint(5, V, (2, 49)),), "at most max_position_embeddings=48 tokens"),
        ((ids, mask[:, :-1]), "attention_mask must have shape \\(4, 32\\)"),
        ((ids, mask, torch.zeros(4, 31, dtype=torch.long)), "token_type_ids must have shape"),
        ((ids, mask, torch.full_like(ids, 2)), "token_type_ids must lie in \\[0, type_vocab_size=2\\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            model(*args)
    with pytest.raises(TypeError, match="input_ids must have dtype"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        model(ids[0])
    model.validate = False  # the host-side id check can be turned off; shape checks stay
    with pytest.raises(AssertionError, match="a kernel ran"):
        model(ids.clone().fill_(V))


def test_mismatched_models_and_settings_are_refused():
    gen_cfg, disc_cfg = ElectraModelConfig(**COMMON, **GEN), ElectraModelConfig(**COMMON, **DISC)
    from electra_fast.model.encoder import Discriminator, Generator

    disc = Discriminator(disc_cfg)
    with pytest.raises(ValueError, match="same vocab_size: the discriminator has 150, the generator 151"):
        ElectraPretrainer(Generator(gen_cfg.replace(vocab_size=151)), disc, mask_token_id=4, special_token_ids=[0])
    with pytest.raises(ValueError, match="same embedding_size: the discriminator has 16, the generator 8"):
        ElectraPretrainer(Generator(gen_cfg.replace(embedding_size=8)), disc, mask_token_id=4, special_token_ids=[0])
    with pytest.raises(TypeError, match="generator must be"):
        ElectraPretrainer(disc, disc, mask_token_id=4, special_token_ids=[0])
    with pytest.raises(ValueError, match="mask_token_id must be an int in \\[0, vocab_size=150\\)"):
        ElectraPretrainer(Generator(gen_cfg), disc, mask_token_id=150, special_token_ids=[0])
    with pytest.raises(ValueError, match="special_token_ids must lie in"):
        ElectraPretrainer(Generator(gen_cfg), disc, mask_token_id=4, special_token_ids=[0, 999])
    with pytest.raises(ValueError, match="mask_prob"):
        ElectraPretrainer(Generator(gen_cfg), disc, mask_token_id=4, special_token_ids=[0], mask_prob=1.5)
    with pytest.raises(TypeError, match="unknown ElectraModelConfig field"):
        ElectraPretrainer.from_preset("tiny", vocab_size=V, **IDS, tempreature=2)


def test_from_preset_options():
    model = ElectraPretrainer.from_preset("large", vocab_size=V, **IDS,
                                          num_hidden_layers=1, generator_hidden_size=64, temperature=0.5,
                                          max_position_embeddings=64)
    assert model.mask_prob == 0.25 and model.temperature == 0.5 and model.max_position_embeddings == 64
    assert model.vocab_size == V and model.generator.config.hidden_size == 64
    assert model.discriminator.config.num_hidden_layers == model.generator.config.num_hidden_layers == 1
    assert ElectraPretrainer.from_preset("tiny", vocab_size=V, **IDS, gdes=True).gdes
    with pytest.raises(ValueError, match="masking must be one of .*'distinct', 'with_replacement'.* got 'exact'"):
        ElectraPretrainer.from_preset("tiny", vocab_size=V, **IDS, masking="exact")


def test_reference_masking_step_and_its_setting_saved(tmp_path):
    """masking="reference": the slots are drawn with replacement (tiny rows: duplicates all but certain), and the
    discriminator's ids are the reference's scatter_update of the samples (tests/fuzz/test_fuzz_gather_replace.py
    checks that op)."""
    model = ElectraPretrainer.from_preset("tiny", vocab_size=V, **IDS, masking="reference", mask_prob=0.5,
                                          num_hidden_layers=1)
    ids = torch.randint(5, V, (16, 8))
    out = model.scores(ids, rng=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    _, positions, weights = mask_tokens(ids, torch.ones_like(ids), mask_prob=0.5, replacement=True,
                                        mask_token_id=MASK_ID, special_token_ids=SPECIAL, generator=g)
    real = weights > 0
    assert any(len(set(p[r].tolist())) < int(r.sum()) for p, r in zip(positions, real)), "no position drawn twice"
    hit = torch.zeros_like(ids).scatter_add_(1, positions, real.long()) > 0
    assert not (out["is_replaced"] & ~hit).any()  # only drawn positions change
    assert torch.isfinite(model(ids).loss)
    model.save_pretrained(tmp_path)
    assert ElectraPretrainer.from_pretrained(str(tmp_path)).masking == "with_replacement"


def test_param_groups_split_decay():
    model = make(gdes=False)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "generator.embeddings.norm.weight" in no_decay_names and "generator.head.bias" in no_decay_names
    assert "discriminator.layers.0.attn_norm.weight" in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # shared once


def test_compiled_step_has_no_graph_break_and_matches_eager():
    import torch._inductor.config as inductor_config

    model = make()
    ids, mask = batch()
    torch.manual_seed(11)
    eager = model(ids, mask)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # fullgraph=True turns any graph break into an error; fallback_random makes compiled RNG match eager.
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        torch.manual_seed(11)
        out = compiled(ids, mask)
        out.loss.backward()
    for name in ("loss", "mlm_loss", "disc_loss", "disc_accuracy", "replaced_frac", "gen_accuracy"):
        torch.testing.assert_close(getattr(out, name), getattr(eager, name), rtol=1e-4, atol=1e-5, msg=name)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_compiled_model_takes_a_second_batch_shape():
    """Called with another batch size, torch.compile retraces with symbolic sizes (automatic dynamic shapes): every
    op of the step must take them (torch.rand's generator overload did not). aot_eager: the same RNG as eager."""
    model = make()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask = batch()
    for rows in (4, 3, 2):
        torch.manual_seed(rows)
        want = model(ids[:rows], mask[:rows]).loss
        torch.manual_seed(rows)
        torch.testing.assert_close(compiled(ids[:rows], mask[:rows]).loss, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- GDES
@pytest.mark.parametrize("gdes", [False, True])
def test_gdes_keeps_the_discriminator_loss_away_from_every_generator_parameter(gdes):
    model = make(gdes=gdes)
    gen_params = dict(model.generator.named_parameters())
    assert {"embeddings.word.weight", "embeddings.position.weight", "embeddings.token_type.weight",
            "embeddings.norm.weight", "embeddings.norm.bias"} <= set(gen_params)
    ids, mask = batch()
    out = model(ids, mask, torch.randint(0, 2, ids.shape))
    grads = dict(zip(gen_params, torch.autograd.grad(out.disc_loss, list(gen_params.values()), retain_graph=True,
                                                    allow_unused=True)))
    reached = sorted(n for n, g in grads.items() if g is not None and g.abs().sum() > 0)
    if not gdes:  # plain sharing: the RTD loss trains the shared embeddings, and nothing else of the generator
        assert reached == sorted(n for n in gen_params if n.startswith("embeddings."))
        return
    assert reached == []  # all None or exactly zero
    delta = dict(model.discriminator.embeddings_delta.named_parameters())
    assert len(delta) == 5
    for name, g in zip(delta, torch.autograd.grad(out.disc_loss, list(delta.values()), retain_graph=True)):
        assert g.abs().sum() > 0, name  # the RTD loss trains the deltas instead
    assert all(g is None for g in torch.autograd.grad(out.mlm_loss, list(delta.values()), allow_unused=True))


# ---------------------------------------------------------------------------------- the padded vocabulary
@pytest.mark.parametrize("gdes", [False, True])
def test_padded_vocabulary_rows_get_exactly_zero_gradient_and_stay_zero(gdes):
    model = make(gdes=gdes)
    gen = model.generator
    assert gen.config.padded_vocab_size == 256 and model.vocab_size == V
    tables = {"word": gen.embeddings.word.weight, "bias": gen.head.bias}
    if gdes:
        tables["delta"] = model.discriminator.embeddings_delta.word.weight
    ids, mask = batch()
    ids[:, 1:4] = torch.tensor([V - 1, V - 2, 5])  # the last real rows of the tables are used too
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        model(ids, mask).loss.backward()
        for name, t in tables.items():
            assert torch.all(t.grad[V:] == 0), name
            assert t.grad[:V].abs().sum() > 0, name
        opt.step()
    for name, t in tables.items():  # weight decay and Adam moved every real row, never a padded one
        assert torch.all(t[V:] == 0) and t.shape[0] == 256, name


def test_padded_logit_columns_never_reach_the_step():
    model = make()
    ids, mask = batch()
    torch.manual_seed(0)
    want = model(ids, mask)
    with torch.no_grad():
        model.generator.head.bias[V:] = 1e4  # would win every softmax, argmax and sample if they were read
    torch.manual_seed(0)
    got = model(ids, mask)
    for name in ("loss", "mlm_loss", "disc_loss", "gen_accuracy", "replaced_frac"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ drop-in models share their embeddings
def hf_pair(**gen_changes):
    """A transformers generator and discriminator built separately: each with its own random embeddings."""
    transformers = pytest.importorskip("transformers")
    gen = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**COMMON, **GEN, **gen_changes))
    disc = transformers.ElectraForPreTraining(transformers.ElectraConfig(**COMMON, **DISC))
    return gen, disc


def test_drop_in_transformers_pair_ends_up_sharing_embeddings():
    gen, disc = hf_pair()
    d = disc.electra.embeddings
    assert not torch.equal(gen.electra.embeddings.word_embeddings.weight, d.word_embeddings.weight)
    theirs = dict(d.named_parameters())
    model = ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    ours = dict(gen.electra.embeddings.named_parameters())
    assert sorted(ours) == sorted(theirs) and len(ours) == 5  # word, position, token type, LayerNorm weight/bias
    for name, p in ours.items():
        assert p is theirs[name] and p.data_ptr() == theirs[name].data_ptr(), name
    assert gen.generator_lm_head.weight is d.word_embeddings.weight  # the LM head stays tied to the shared table
    assert embeddings_shared(gen, disc)
    n = len(list(gen.parameters())) + len(list(disc.parameters())) - 5
    assert len(list(model.parameters())) == n  # the shared tables are one set of parameters
    ids, mask = batch()
    out = model(ids, mask)
    shared = [d.word_embeddings.weight, d.position_embeddings.weight, d.LayerNorm.weight]
    for loss in (out.mlm_loss, out.disc_loss):  # both losses reach the shared tables
        for g in torch.autograd.grad(loss, shared, retain_graph=True):
            assert g.abs().sum() > 0


def test_separately_built_slim_pair_ends_up_sharing_embeddings():
    from electra_fast.model.encoder import Discriminator, Generator

    gen, disc = Generator(ElectraModelConfig(**COMMON, **GEN)), Discriminator(ElectraModelConfig(**COMMON, **DISC))
    ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    assert gen.embeddings is disc.embeddings and embeddings_shared(gen, disc)
    assert gen.embeddings.word.weight.data_ptr() == disc.embeddings.word.weight.data_ptr()


def test_share_embeddings_false_keeps_the_models_apart():
    gen, disc = hf_pair()
    gen_word, disc_word = gen.electra.embeddings.word_embeddings.weight, disc.electra.embeddings.word_embeddings.weight
    model = ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL, share_embeddings=False)
    assert not embeddings_shared(gen, disc) and gen.electra.embeddings.word_embeddings.weight is gen_word
    ids, mask = batch()
    out = model(ids, mask)
    assert torch.autograd.grad(out.mlm_loss, disc_word, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(out.disc_loss, gen_word, allow_unused=True)[0] is None
    assert model.settings()["share_embeddings"] is False
    slim = make(share_embeddings=False)
    assert slim.generator.embeddings is not slim.discriminator.embeddings
    shared = make()
    with pytest.raises(ValueError, match="share_embeddings=False but the models already share"):
        ElectraPretrainer(shared.generator, shared.discriminator, mask_token_id=MASK_ID, special_token_ids=SPECIAL,
                          share_embeddings=False)


def test_embeddings_that_cannot_be_shared_are_refused():
    gen, disc = hf_pair(layer_norm_eps=1e-5)
    with pytest.raises(ValueError, match="same layer_norm_eps, the discriminator has 1e-12, the generator 1e-05 "
                                         "\\(or pass share_embeddings=False\\)"):
        ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    assert not embeddings_shared(gen, disc)  # nothing was tied before the error
    gen, disc = hf_pair()
    disc.electra.embeddings.token_type_embeddings = torch.nn.Embedding(3, COMMON["embedding_size"])
    with pytest.raises(ValueError, match="generator's token_type embedding parameters have shapes \\{'weight': "
                                         "\\(2, 16\\)\\}, the discriminator's \\{'weight': \\(3, 16\\)\\}"):
        ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    assert ElectraPretrainer(*hf_pair(), mask_token_id=MASK_ID, special_token_ids=SPECIAL, gdes=True).gdes
    with pytest.raises(ValueError, match="gdes=True but the discriminator was built with gdes=False"):
        slim = make()
        ElectraPretrainer(slim.generator, slim.discriminator, mask_token_id=MASK_ID, special_token_ids=SPECIAL,
                          gdes=True)


# ------------------------------------------------------------------- token ids: the tokenizer's or given
def test_token_ids_come_from_the_tokenizer_or_must_be_given(tmp_path):
    from electra_fast.data.tokenizer import save_tokenizer, train_tokenizer

    lines = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps", "quick foxes jump high"] * 4
    tok = train_tokenizer(lines, vocab_size=60, min_frequency=1)  # its own ids: [PAD] 0 ... [MASK] 4
    t = {name: tok.token_to_id(f"[{name}]") for name in ("PAD", "CLS", "SEP", "MASK")}
    save_tokenizer(tok, str(tmp_path / "tok"))
    sources = [tok, str(tmp_path / "tok"), str(tmp_path / "tok" / "vocab.txt")]
    transformers = pytest.importorskip("transformers")
    sources.append(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    for source in sources:
        model = ElectraPretrainer.from_preset("tiny", tokenizer=source)
        assert model.vocab_size == tok.get_vocab_size(with_added_tokens=True), source
        assert model.mask_token_id == t["MASK"] and sorted(model.special_token_ids.tolist()) == sorted(t.values())
        assert model.generator.config.pad_token_id == model.discriminator.config.pad_token_id == t["PAD"]
    explicit = ElectraPretrainer.from_preset("tiny", tokenizer=tok, special_token_ids=[t["PAD"], t["MASK"]])
    assert explicit.special_token_ids.tolist() == [t["PAD"], t["MASK"]]  # explicit ids win over the tokenizer's
    with pytest.raises(ValueError, match="mask_token_id, special_token_ids, pad_token_id must be given: no default "
                                         "fits every vocabulary.*Pass tokenizer=.*mask_token_id=103"):
        ElectraPretrainer.from_preset("tiny")
    with pytest.raises(ValueError, match="^pad_token_id must be given"):
        ElectraPretrainer.from_preset("tiny", vocab_size=V, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    with pytest.raises(ValueError, match="more than the model's vocab_size=20"):
        ElectraPretrainer.from_preset("tiny", tokenizer=tok, vocab_size=20)
