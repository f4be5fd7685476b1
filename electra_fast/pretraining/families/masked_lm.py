"""transformers masked LMs as generators, by the layout of their LM head: BERT's (`cls.predictions`: BERT,
DeBERTa-v2 with `legacy=True`, the default), RoBERTa's (`lm_head.{dense,layer_norm,decoder}`: RoBERTa, XLM-R,
CamemBERT, ...) and DeBERTa-v2's `legacy=False` head (`lm_predictions.lm_head`, decoder = the word embeddings)."""
from __future__ import annotations

import torch.nn.functional as F

from electra_fast.pretraining.families.base import TransformersAdapter


class BertHeadAdapter(TransformersAdapter):
    """`cls.predictions.{transform, decoder}`: BERT, DeBERTa-v2 (legacy head), and others laid out so."""
    family = "bert-head"
    mlm_head = "cls.predictions.transform"

    def lm_head_parts(self, hidden):
        p = self.model.cls.predictions
        return p.transform(hidden), p.decoder.weight, p.decoder.bias


class RobertaHeadAdapter(TransformersAdapter):
    """`lm_head.{dense, layer_norm, decoder}` with GELU: RoBERTa, XLM-R, CamemBERT, ..."""
    family = "roberta-head"
    mlm_head = "lm_head.layer_norm"

    def lm_head_parts(self, hidden):
        h = self.model.lm_head
        return h.layer_norm(F.gelu(h.dense(hidden))), h.decoder.weight, h.decoder.bias


class DebertaHeadAdapter(TransformersAdapter):
    """DeBERTa-v2 `legacy=False`: `lm_predictions.lm_head.{dense, transform_act_fn, LayerNorm, bias}` and the word
    embeddings as decoder."""
    family = "deberta-head"
    mlm_head = "lm_predictions.lm_head"

    def lm_head_parts(self, hidden):
        h = self.model.lm_predictions.lm_head
        return (h.LayerNorm(h.transform_act_fn(h.dense(hidden))), self.embeddings.word_embeddings.weight, h.bias)


MLM_HEADS = (BertHeadAdapter, RobertaHeadAdapter, DebertaHeadAdapter)

__all__ = ["BertHeadAdapter", "RobertaHeadAdapter", "DebertaHeadAdapter", "MLM_HEADS"]
