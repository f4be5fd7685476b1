"""Interop with transformers' ELECTRA (CPU, fp32): checkpoints both ways give the same logits (<= 1e-5)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining  # noqa: E402

from electra_fast import hf  # noqa: E402
from electra_fast.model import Discriminator, ElectraModelConfig, Generator  # noqa: E402
from electra_fast.pretrainer import ElectraPretrainer  # noqa: E402

V, L = 113, 24
COMMON = dict(vocab_size=V, embedding_size=16, num_hidden_layers=2, max_position_embeddings=32,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GEN = dict(hidden_size=24, num_attention_heads=2, intermediate_size=40)   # E != H: embeddings_project
DISC = dict(hidden_size=16, num_attention_heads=4, intermediate_size=32)  # E == H: none


def perturb(model):
    """Random values everywhere (fresh inits leave biases 0 and LayerNorms 1, which would hide mix-ups)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
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
    # Each checkpoint carries its own copy of the shared embeddings (the discriminator's plus delta with GDES).
    shared = model.generator.embeddings.word.weight
    torch.testing.assert_close(hf_gen.electra.embeddings.word_embeddings.weight, shared, rtol=0, atol=0)
    disc_word = shared + model.discriminator.word_delta if gdes else shared
    torch.testing.assert_close(hf_disc.electra.embeddings.word_embeddings.weight, disc_word, rtol=0, atol=0)
    torch.testing.assert_close(hf_disc.electra.embeddings.LayerNorm.weight, model.generator.embeddings.norm.weight)
    settings = json.loads((tmp_path / "electra_fast.json").read_text())
    assert settings["gdes"] == gdes and settings["mask_token_id"] == 4

    # ... and the pair loads back into a pretrainer with the same weights, settings and step.
    back = ElectraPretrainer.from_pretrained(str(tmp_path))
    assert back.gdes == gdes and back.generator.embeddings is back.discriminator.embeddings
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
