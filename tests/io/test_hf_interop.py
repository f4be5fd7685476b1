"""Interop with transformers' ELECTRA (CPU, fp32): checkpoints both ways give the same logits (<= 1e-5)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers

from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining  # noqa: E402

from electra_fast.io import hf  # noqa: E402
from electra_fast.model import Discriminator, ElectraModelConfig, Generator  # noqa: E402
from electra_fast.pretraining.pretrainer import ElectraPretrainer  # noqa: E402

V, L = 113, 24
COMMON = dict(vocab_size=V, embedding_size=16, num_hidden_layers=2, max_position_embeddings=32,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GEN = dict(hidden_size=24, num_attention_heads=2, intermediate_size=40)   # E != H: embeddings_project
DISC = dict(hidden_size=16, num_attention_heads=4, intermediate_size=32)  # E == H: none
# Our ElectraEmbeddings parameter names -> transformers' (under electra.embeddings.)
EMBEDDINGS = {"word.weight": "word_embeddings.weight", "position.weight": "position_embeddings.weight",
              "token_type.weight": "token_type_embeddings.weight", "norm.weight": "LayerNorm.weight",
              "norm.bias": "LayerNorm.bias"}


def perturb(model):
    """Random values everywhere (fresh inits leave biases 0 and LayerNorms 1, which would hide mix-ups), except the
    slim models' padded vocabulary rows, which no training step can move from zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("word.weight", "head.bias")):  # the word table, its GDES delta, the LM bias
                p[V:].zero_()
    return model.eval()


def batch():
    ids = torch.randint(0, V, (3, L))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 6:] = 0
    return ids, mask, torch.randint(0, 2, (3, L))


def assert_same_logits(a, b, mask):
    real = mask.bool()
    diff = (a - b).abs()[real]
    assert diff.max().item() <= 1e-5, diff.max().item()


def test_hf_checkpoints_load_into_the_slim_models(tmp_path):
    hf_disc = perturb(ElectraForPreTraining(ElectraConfig(**COMMON, **DISC)))
    hf_gen = perturb(ElectraForMaskedLM(ElectraConfig(**COMMON, **GEN)))
    hf_disc.save_pretrained(tmp_path / "d")
    hf_gen.save_pretrained(tmp_path / "g")
    disc = Discriminator.from_pretrained(str(tmp_path / "d")).eval()
    gen = Generator.from_pretrained(str(tmp_path / "g")).eval()
    assert disc.embeddings_project is None and gen.embeddings_project is not None
    # Import pads the vocabulary tables with zero rows (V = 113 -> 128).
    for table, want in ((gen.embeddings.word.weight, hf_gen.electra.embeddings.word_embeddings.weight),
                        (gen.head.bias, hf_gen.generator_lm_head.bias)):
        assert table.shape[0] == 128 and torch.all(table[V:] == 0)
        torch.testing.assert_close(table[:V], want, rtol=0, atol=0)
    ids, mask, tt = batch()
    with torch.no_grad():
        assert_same_logits(disc(ids, mask, tt), hf_disc(ids, attention_mask=mask, token_type_ids=tt).logits, mask)
        want = hf_gen(ids, attention_mask=mask, token_type_ids=tt).logits
        assert_same_logits(gen(ids, mask, tt), want, mask)
        positions = torch.tensor([[1, 5, 9], [0, 3, 16], [2, 4, 5]])
        at = gen(ids, mask, tt, positions=positions)
        torch.testing.assert_close(at, torch.stack([want[b, positions[b]] for b in range(3)]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("gdes", [False, True])
def test_slim_checkpoints_load_into_transformers(tmp_path, gdes):
    model = ElectraPretrainer.from_configs(ElectraModelConfig(**COMMON, **GEN), ElectraModelConfig(**COMMON, **DISC),
                                           gdes=gdes, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4))
    perturb(model)
    model.save_pretrained(str(tmp_path))
    # The files hold the logical vocabulary only: the padded rows are sliced off on export.
    from safetensors.torch import load_file

    for name in ("generator", "discriminator"):
        saved = load_file(tmp_path / name / "model.safetensors")
        assert saved["electra.embeddings.word_embeddings.weight"].shape == (V, COMMON["embedding_size"])
        assert name == "discriminator" or saved["generator_lm_head.bias"].shape == (V,)
        assert all(t.shape[:1] != (128,) for t in saved.values())  # no padded table left (V=113 pads to 128)
    hf_disc, info_d = ElectraForPreTraining.from_pretrained(tmp_path / "discriminator", output_loading_info=True)
    hf_gen, info_g = ElectraForMaskedLM.from_pretrained(tmp_path / "generator", output_loading_info=True)
    for info in (info_d, info_g):
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf_disc.eval()
    hf_gen.eval()
    ids, mask, tt = batch()
    with torch.no_grad():
        assert_same_logits(model.discriminator(ids, mask, tt),
                           hf_disc(ids, attention_mask=mask, token_type_ids=tt).logits, mask)
        assert_same_logits(model.generator(ids, mask, tt), hf_gen(ids, attention_mask=mask, token_type_ids=tt).logits,
                           mask)
    # Each checkpoint carries its own copy of the shared embeddings: the generator's as they are, the discriminator's
    # with GDES as it reads them, shared + delta, for each of the five parameters.
    delta = model.discriminator.embeddings_delta
    for ours, theirs in EMBEDDINGS.items():
        shared = model.generator.embeddings.get_parameter(ours)[:V]
        disc_copy = shared + delta.get_parameter(ours)[:V] if gdes else shared
        torch.testing.assert_close(hf_gen.electra.embeddings.get_parameter(theirs), shared, rtol=0, atol=0)
        torch.testing.assert_close(hf_disc.electra.embeddings.get_parameter(theirs), disc_copy, rtol=0, atol=0)
        assert gdes == (not torch.equal(disc_copy, shared)), ours  # perturbed deltas make every copy differ
    settings = json.loads((tmp_path / "electra_fast.json").read_text())
    assert settings["gdes"] == gdes and settings["mask_token_id"] == 4

    # ... and the pair loads back into a pretrainer with the same weights (the same shared/delta split: generator
    # embeddings from the generator's checkpoint, deltas = discriminator's - generator's), settings and step.
    back = ElectraPretrainer.from_pretrained(str(tmp_path))
    assert back.gdes == gdes and back.generator.embeddings is back.discriminator.embeddings
    assert list(model.state_dict()) == list(back.state_dict())
    assert back.special_token_ids.tolist() == [0, 1, 2, 3, 4]
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    torch.manual_seed(7)
    want = model(ids, mask, tt).loss
    torch.manual_seed(7)
    torch.testing.assert_close(back(ids, mask, tt).loss, want)


def test_pretrainer_loads_two_checkpoints_written_by_transformers(tmp_path):
    hf_disc = perturb(ElectraForPreTraining(ElectraConfig(**COMMON, **DISC)))
    hf_gen = perturb(ElectraForMaskedLM(ElectraConfig(**COMMON, **GEN)))
    hf_gen.electra.embeddings.load_state_dict(hf_disc.electra.embeddings.state_dict())  # shared, as trained
    hf_disc.save_pretrained(tmp_path / "discriminator")
    hf_gen.save_pretrained(tmp_path / "generator")
    model = ElectraPretrainer.from_pretrained(str(tmp_path), mask_token_id=4, special_token_ids=[0, 4]).eval()
    ids, mask, tt = batch()
    with torch.no_grad():
        assert_same_logits(model.generator(ids, mask, tt), hf_gen(ids, attention_mask=mask, token_type_ids=tt).logits,
                           mask)
    # Checkpoints whose embeddings differ: the shared copy is the discriminator's, and we say so.
    perturb(hf_gen)
    hf_gen.save_pretrained(tmp_path / "generator")
    with pytest.warns(UserWarning, match="differs from the shared embeddings"):
        ElectraPretrainer.from_pretrained(str(tmp_path), mask_token_id=4, special_token_ids=[0, 4])


def test_model_objects_convert_both_ways():
    gen = perturb(Generator(ElectraModelConfig(**COMMON, **GEN)))
    hf_gen = hf.to_transformers(gen).eval()
    assert isinstance(hf_gen, ElectraForMaskedLM)
    ids, mask, tt = batch()
    with torch.no_grad():
        assert_same_logits(gen(ids, mask, tt), hf_gen(ids, attention_mask=mask, token_type_ids=tt).logits, mask)
    hf_disc = perturb(ElectraForPreTraining(ElectraConfig(**COMMON, **DISC)))
    disc = hf.from_transformers(hf_disc).eval()
    with torch.no_grad():
        assert_same_logits(disc(ids, mask, tt), hf_disc(ids, attention_mask=mask, token_type_ids=tt).logits, mask)
    with pytest.raises(TypeError, match="hf_model"):
        hf.from_transformers(torch.nn.Linear(2, 2))


def test_gdes_discriminator_loads_alone_or_beside_the_generator_embeddings(tmp_path):
    hf_disc = perturb(ElectraForPreTraining(ElectraConfig(**COMMON, **DISC)))
    hf_disc.save_pretrained(tmp_path)
    ids, mask, tt = batch()
    with torch.no_grad():
        want = hf_disc(ids, attention_mask=mask, token_type_ids=tt).logits
    theirs = {ours: hf_disc.electra.embeddings.get_parameter(name) for ours, name in EMBEDDINGS.items()}
    # Alone it owns its embeddings: they take the checkpoint's values and the deltas stay zero.
    alone = Discriminator.from_pretrained(str(tmp_path), gdes=True).eval()
    for name, t in theirs.items():
        torch.testing.assert_close(alone.embeddings.get_parameter(name)[:V], t, rtol=0, atol=0)
        assert torch.all(alone.embeddings_delta.get_parameter(name) == 0), name
    # Beside a generator's embeddings it keeps them and holds the difference in its deltas.
    gen = perturb(Generator(ElectraModelConfig(**COMMON, **GEN)))
    before = {n: p.detach().clone() for n, p in gen.embeddings.named_parameters()}
    beside = Discriminator.from_pretrained(str(tmp_path), gen.embeddings, gdes=True).eval()
    assert beside.embeddings is gen.embeddings
    for name, t in theirs.items():
        assert torch.equal(gen.embeddings.get_parameter(name), before[name]), name
        delta = beside.embeddings_delta.get_parameter(name)
        torch.testing.assert_close(delta[:V], t - before[name][:V], rtol=0, atol=0)
        assert torch.all(delta[V:] == 0)
    with torch.no_grad():
        for model in (alone, beside):
            assert_same_logits(model(ids, mask, tt), want, mask)


def test_loader_errors(tmp_path):
    ElectraForMaskedLM(ElectraConfig(**COMMON, **GEN)).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="lacks .* Discriminator needs"):
        Discriminator.from_pretrained(str(tmp_path / "g"))
    cfg_path = tmp_path / "g" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_act"] = "gelu_new"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_act"):
        Generator.from_pretrained(str(tmp_path / "g"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="config.json"):
        Generator.from_pretrained(str(tmp_path / "empty"))


def test_untied_generator_head_is_refused(tmp_path):
    hf_gen = ElectraForMaskedLM(ElectraConfig(**COMMON, **GEN, tie_word_embeddings=False))
    with torch.no_grad():
        hf_gen.generator_lm_head.weight.add_(1.0)
    hf_gen.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        Generator.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("share", [True, False])
def test_drop_in_pair_keeps_its_sharing_through_save_and_load(tmp_path, share):
    hf_gen = perturb(ElectraForMaskedLM(ElectraConfig(**COMMON, **GEN)))
    hf_disc = perturb(ElectraForPreTraining(ElectraConfig(**COMMON, **DISC)))
    model = ElectraPretrainer(hf_gen, hf_disc, mask_token_id=4, special_token_ids=[0, 1, 2, 3, 4],
                              share_embeddings=share)
    model.save_pretrained(str(tmp_path))
    # Each checkpoint carries its own copy of the embeddings: the same tables when they are shared.
    from safetensors.torch import load_file

    g, d = (load_file(tmp_path / name / "model.safetensors") for name in ("generator", "discriminator"))
    for name in ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
                 "LayerNorm.weight", "LayerNorm.bias"):
        name = "electra.embeddings." + name
        assert torch.equal(g[name], d[name]) == share, name
    back = ElectraPretrainer.from_pretrained(str(tmp_path))
    assert (back.generator.embeddings is back.discriminator.embeddings) == share
    assert back.settings()["share_embeddings"] == share
    ids, mask, tt = batch()
    torch.manual_seed(7)
    want = model(ids, mask, tt)
    torch.manual_seed(7)
    got = back(ids, mask, tt)
    for name in ("loss", "mlm_loss", "disc_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)


def test_from_pretrained_takes_ids_from_a_tokenizer_or_refuses(tmp_path):
    from electra_fast.data.tokenizer import save_tokenizer, train_tokenizer

    hf_disc = ElectraForPreTraining(ElectraConfig(**COMMON, **DISC, pad_token_id=3))
    hf_gen = ElectraForMaskedLM(ElectraConfig(**COMMON, **GEN, pad_token_id=3))
    hf_gen.electra.embeddings.load_state_dict(hf_disc.electra.embeddings.state_dict())  # shared, as trained
    hf_disc.save_pretrained(tmp_path / "discriminator")
    hf_gen.save_pretrained(tmp_path / "generator")
    # transformers' files name no [MASK] id, and 103 is not a default: the error says which ids to pass.
    with pytest.raises(ValueError, match="^mask_token_id, special_token_ids must be given.*tokenizer="):
        ElectraPretrainer.from_pretrained(str(tmp_path))
    tok = train_tokenizer(["a small text to train on", "another small line of text"] * 3, vocab_size=50,
                          min_frequency=1)
    mask_id, special = tok.token_to_id("[MASK]"), sorted(tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]",
                                                                                       "[MASK]"))
    model = ElectraPretrainer.from_pretrained(str(tmp_path), tokenizer=tok)  # its [PAD] replaces the config's 3
    assert model.mask_token_id == mask_id and sorted(model.special_token_ids.tolist()) == special
    assert model.generator.config.pad_token_id == model.discriminator.config.pad_token_id == tok.token_to_id("[PAD]")
    save_tokenizer(tok, str(tmp_path / "generator"))  # a tokenizer saved beside the checkpoints is found
    model = ElectraPretrainer.from_pretrained(str(tmp_path))
    assert model.mask_token_id == mask_id and sorted(model.special_token_ids.tolist()) == special
    assert model.discriminator.config.pad_token_id == 3  # the checkpoint's own setting
    assert ElectraPretrainer.from_pretrained(str(tmp_path), mask_token_id=7).mask_token_id == 7
