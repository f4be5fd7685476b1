"""Other transformers encoders (BERT, RoBERTa, DeBERTa-v2/v3) through the same RTD step (electra_fast.pretraining.families):
the step equals a recomputation from transformers' own forward passes, training lowers both losses, embeddings are
shared (or GDES-shared, with the gradients kept apart), exports reload in transformers' own classes with the same
outputs, and the step traces as one graph."""
import copy
from types import SimpleNamespace

import pytest
import torch

from test_pretrainer import MASK_ID, SPECIAL, V, batch, recompute_with_transformers

from electra_fast.pretraining import pairs, sharing
from electra_fast.pretraining.deberta_v3 import DEBERTA_V3_PRESETS, deberta_v3_models
from electra_fast.pretraining.families import RTDDiscriminator, adapt
from electra_fast.pretraining.pretrainer import ElectraPretrainer, param_groups

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers


TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, max_position_embeddings=64)
ARCHS = ("bert", "roberta", "deberta")


def pair(arch: str, disc_kind: str = "encoder"):
    """A fresh tiny (generator, discriminator): the generator has half the discriminator's depth, the same width
    (BERT and RoBERTa have no embedding projection: sharing the word table needs the same width)."""
    if arch == "deberta":  # DeBERTa-v3's config: relative attention, no absolute positions, no token types
        gen, disc = deberta_v3_models("tiny", vocab_size=V, pad_token_id=0, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, max_position_embeddings=64)
        if disc_kind == "token-classification":
            cfg = copy.deepcopy(disc.config)
            cfg.num_labels = 1
            disc = tf.DebertaV2ForTokenClassification(cfg)
        return gen, disc
    cfg_cls, mlm_cls, prefix = {"bert": (tf.BertConfig, tf.BertForMaskedLM, "Bert"),
                                "roberta": (tf.RobertaConfig, tf.RobertaForMaskedLM, "Roberta")}[arch]
    gen = mlm_cls(cfg_cls(**{**TINY, "num_hidden_layers": 1}))
    cfg = cfg_cls(**TINY)
    if disc_kind == "token-classification":
        return gen, getattr(tf, f"{prefix}ForTokenClassification")(cfg_cls(**TINY, num_labels=1))
    return gen, getattr(tf, f"{prefix}Model")(cfg, add_pooling_layer=False)


def pretrainer(arch, disc_kind="encoder", gdes=False, **kwargs):
    gen, disc = pair(arch, disc_kind)
    return ElectraPretrainer(gen, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL, gdes=gdes, **kwargs)


def disc_logits(disc):
    """transformers-style call returning `.logits [B, L]` for the recomputation oracle."""
    if isinstance(disc, RTDDiscriminator):
        return lambda ids, attention_mask: SimpleNamespace(logits=disc(ids, attention_mask))
    return lambda ids, attention_mask: SimpleNamespace(logits=disc(ids, attention_mask=attention_mask).logits[..., 0])


def assert_same_step(model, again, ids, mask, seed):
    """`again` (a reloaded `model`) takes the same step: losses and metrics, masking and sampling seeded alike."""
    outs = []
    for m in (model, again):
        torch.manual_seed(seed)
        outs.append(m(ids, mask))
    for name in ("loss", "mlm_loss", "disc_loss", "gen_accuracy", "disc_accuracy"):
        torch.testing.assert_close(getattr(outs[1], name), getattr(outs[0], name), msg=name)


@pytest.mark.parametrize("arch,disc_kind,gdes", [
    ("bert", "encoder", False), ("roberta", "token-classification", True), ("deberta", "encoder", True),
    ("deberta", "token-classification", False)])
def test_step_equals_recomputation_from_transformers_forward(arch, disc_kind, gdes):
    """The step's losses and metrics equal transformers' own forward passes (full-sequence MLM logits from the
    model's head, the discriminator's own logits) plus explicit Gumbel noise from the same random draws: the
    adapter reads the right head weights, whether the LM head is fused or not."""
    model = pretrainer(arch, disc_kind, gdes=gdes)
    with torch.no_grad():  # non-zero GDES deltas: the discriminator must read shared + delta
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.generator.get_output_embeddings().bias[5:12] += 4.0  # some right argmax predictions
    ids, mask = batch()
    for fused in (True, False):
        model.fused_lm_head = fused
        for seed in range(2):
            torch.manual_seed(seed)
            out = model(ids, mask)
            with torch.no_grad():
                want = recompute_with_transformers(model.generator, disc_logits(model.discriminator), ids, mask,
                                                   seed=seed)
            for name, value in want.items():
                torch.testing.assert_close(getattr(out, name).double(), value.double(), rtol=5e-5, atol=5e-6,
                                           msg=f"{name} fused={fused}")


@pytest.mark.parametrize("arch,gdes", [("bert", False), ("bert", True), ("roberta", True), ("deberta", True)])
def test_training_lowers_both_losses(arch, gdes):
    model = pretrainer(arch, "encoder" if arch != "roberta" else "token-classification", gdes=gdes)
    opt = torch.optim.AdamW(param_groups(model), lr=3e-3)
    ids, mask = batch()
    losses = []
    for _ in range(20):
        out = model(ids, mask, rng=torch.Generator().manual_seed(0))  # the same slots and noise every step
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append((out.mlm_loss.item(), out.disc_loss.item()))
    (mlm0, disc0), (mlm1, disc1) = losses[0], losses[-1]
    assert mlm1 < 0.7 * mlm0 and disc1 < 0.7 * disc0, losses


@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_shared_as_each_architecture_allows(arch):
    model = pretrainer(arch)
    gen, disc = adapt(model.generator, "generator"), adapt(model.discriminator, "discriminator")
    keys = sharing.shared_keys(model.generator, model.discriminator)
    # BERT, RoBERTa: all of ELECTRA's four; DeBERTa-v3: no absolute positions, no token types.
    assert keys == (["word", "norm"] if arch == "deberta" else ["word", "position", "token_type", "norm"])
    assert sharing.embeddings_shared(model.generator, model.discriminator)
    word = disc.embeddings.word_embeddings
    assert gen.embeddings.word_embeddings is word
    assert gen.lm_head_parts(torch.zeros(1, 32))[1] is word.weight  # the LM decoder stays tied
    n_params = {id(p) for p in model.parameters()}
    assert len(n_params) == len(list(model.parameters()))  # each shared parameter once


@pytest.mark.parametrize("arch", ARCHS)
def test_gdes_keeps_the_discriminator_loss_off_the_generator(arch):
    model = pretrainer(arch, gdes=True)
    assert model.gdes and sharing.has_gdes(model.discriminator)
    g, d = adapt(model.generator, "generator"), adapt(model.discriminator, "discriminator")
    ids, mask = batch()
    # Deltas start at zero: the discriminator starts from the generator's embeddings exactly.
    torch.testing.assert_close(d.embeddings.word_embeddings(ids), g.embeddings.word_embeddings(ids), rtol=0, atol=0)
    torch.manual_seed(3)
    out = model(ids, mask)
    gen_params = list(model.generator.parameters())
    for grad in torch.autograd.grad(out.disc_loss, gen_params, retain_graph=True, allow_unused=True):
        assert grad is None or not grad.any()
    deltas = [p for n, p in model.discriminator.named_parameters() if ".delta" in n]
    assert len(deltas) == (2 if arch == "deberta" else 4) + 1  # word (+ position, token type) + LayerNorm's two
    grads = torch.autograd.grad(out.disc_loss, deltas, retain_graph=True)
    assert grads[0].abs().sum() > 0  # the word delta learns from the RTD loss
    for grad in torch.autograd.grad(out.mlm_loss, deltas, allow_unused=True):
        assert grad is None or not grad.any()


@pytest.mark.parametrize("arch,disc_kind,gdes", [
    ("bert", "encoder", True), ("roberta", "token-classification", False), ("deberta", "encoder", True)])
def test_export_reloads_in_transformers_classes(tmp_path, arch, disc_kind, gdes):
    model = pretrainer(arch, disc_kind, gdes=gdes).eval()
    with torch.no_grad():  # trained-looking weights, non-zero deltas
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(tmp_path))
    ids, mask = batch()
    d = adapt(model.discriminator, "discriminator")
    with torch.no_grad():
        hidden = d.encode(ids, mask, None)
        features, projection = d.disc_head(hidden)
        disc_out = projection(features)[..., 0]
        gen_logits = model.generator(ids, attention_mask=mask).logits
        encoder = tf.AutoModel.from_pretrained(tmp_path / "discriminator").eval()
        torch.testing.assert_close(encoder(ids, attention_mask=mask).last_hidden_state, hidden)
        classifier = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "discriminator").eval()
        torch.testing.assert_close(classifier.base_model(ids, attention_mask=mask)[0], hidden)
        if disc_kind == "encoder":
            reloaded = RTDDiscriminator.from_pretrained(str(tmp_path / "discriminator")).eval()
            torch.testing.assert_close(reloaded(ids, mask), disc_out)
        else:
            reloaded = tf.AutoModelForTokenClassification.from_pretrained(tmp_path / "discriminator").eval()
            torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits[..., 0], disc_out)
        generator = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "generator").eval()
        torch.testing.assert_close(generator(ids, attention_mask=mask).logits, gen_logits)
    assert sharing.has_gdes(model.discriminator) == gdes  # the export left the GDES modules in place
    # The pair reloads for more pretraining: the same step, GDES deltas included.
    assert pairs.is_adapter_export(str(tmp_path))
    again = ElectraPretrainer(*pairs.load_pair(str(tmp_path), gdes=gdes), mask_token_id=MASK_ID,
                              special_token_ids=SPECIAL, gdes=gdes).eval()
    assert_same_step(model, again, ids, mask, seed=9)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_traces_as_one_graph(arch):
    """fullgraph=True turns any graph break into an error. Dynamo's trace only (backend="eager": the graph runs
    as traced; inductor's code generation, which the slim step's compile test covers, would cost minutes here)."""
    model = pretrainer(arch, gdes=arch == "deberta")
    ids, mask = batch()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.manual_seed(7)
    out = compiled(ids, mask)
    out.loss.backward()
    torch.manual_seed(7)
    torch.testing.assert_close(out.loss, model(ids, mask).loss)
    assert all(p.grad is not None for p in adapt(model.discriminator, "discriminator").embeddings.parameters()
               if p.requires_grad and p.dim() == 2 and p.shape[0] == V)


def test_deberta_v3_recipe_with_a_unigram_tokenizer():
    from electra_fast.data import builtin_lines
    from electra_fast.data.tokenizer import special_ids, train_unigram_tokenizer

    lines = list(builtin_lines())[:300]
    tok = train_unigram_tokenizer(lines, vocab_size=200)
    assert tok.get_vocab_size() == 200 and special_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert tok.decode(tok.encode(lines[0]).ids) == lines[0].strip()
    model = ElectraPretrainer.from_deberta_v3("tiny", tokenizer=tok)
    gen, disc = model.generator, model.discriminator
    assert model.vocab_size == 200 and model.mask_token_id == 4 and model.special_token_ids.tolist() == [0, 2, 3, 4]
    assert model.gdes and model.disc_weight == 50.0 and model.mask_prob == 0.15
    assert isinstance(gen, tf.DebertaV2ForMaskedLM) and isinstance(disc.encoder, tf.DebertaV2Model)
    assert gen.config.num_hidden_layers * 2 == disc.config.num_hidden_layers
    assert not disc.config.position_biased_input and disc.config.relative_attention
    for name, p in DEBERTA_V3_PRESETS.items():
        assert p["hidden_size"] % p["num_attention_heads"] == 0, name


def test_models_that_cannot_be_wired_are_refused():
    gen, disc = pair("bert")
    with pytest.raises(TypeError, match="generator BertModel: no MLM head found"):
        ElectraPretrainer(disc, disc, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    with pytest.raises(ValueError, match="must have num_labels=1 .* got num_labels=2"):
        adapt(tf.BertForTokenClassification(tf.BertConfig(**TINY, num_labels=2)), "discriminator")
    with pytest.raises(TypeError, match="bare encoder without an RTD head: wrap it"):
        adapt(disc, "discriminator")
    with pytest.raises(TypeError, match="discriminator must be .* got Linear"):
        adapt(torch.nn.Linear(2, 2), "discriminator")
    wide = tf.BertModel(tf.BertConfig(**{**TINY, "hidden_size": 48}))
    with pytest.raises(ValueError, match=r"cannot share the word embeddings: the generator's have shapes "
                                         r"\{'weight': \(150, 32\)\}, the discriminator's \{'weight': \(150, 48\)\}"):
        ElectraPretrainer(gen, wide, mask_token_id=MASK_ID, special_token_ids=SPECIAL)
    model = ElectraPretrainer(gen, wide, mask_token_id=MASK_ID, special_token_ids=SPECIAL, share_embeddings=False)
    assert sharing.shared_keys(model.generator, model.discriminator) == []


@pytest.mark.parametrize("arch,gdes", [("deberta", True), ("deberta", False), ("bert", False)])
def test_from_pretrained_reloads_other_architectures(tmp_path, arch, gdes):
    """`ElectraPretrainer.from_pretrained` loads an export of a non-ELECTRA pair in its own classes (not as slim
    ELECTRA): the same losses with the same seed, GDES deltas included."""
    model = pretrainer(arch, gdes=gdes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(tmp_path))
    again = ElectraPretrainer.from_pretrained(str(tmp_path)).eval()
    assert type(again.generator) is type(model.generator) and again.gdes == gdes
    assert again.settings() == model.settings()
    ids, mask = batch()
    assert_same_step(model, again, ids, mask, seed=5)


def test_unigram_tokenizer_saves_for_auto_tokenizer(tmp_path):
    """A Unigram tokenizer is saved as a `PreTrainedTokenizerFast` (no WordPiece vocab.txt) that AutoTokenizer
    loads with the same ids and special tokens."""
    from electra_fast.data import builtin_lines
    from electra_fast.data.tokenizer import save_tokenizer, train_unigram_tokenizer

    lines = list(builtin_lines())[:300]
    tok = train_unigram_tokenizer(lines, vocab_size=200)
    save_tokenizer(tok, str(tmp_path))
    assert not (tmp_path / "vocab.txt").exists()
    hf = tf.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(hf, tf.PreTrainedTokenizerFast)
    assert hf(lines[1], lines[2])["input_ids"] == tok.encode(lines[1], lines[2]).ids
    assert (hf.pad_token_id, hf.mask_token_id, hf.cls_token_id, hf.sep_token_id) == (0, 4, 2, 3)
