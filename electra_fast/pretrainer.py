"""Kept for the import path `electra_fast.pretrainer`: the pretrainer lives in `electra_fast.pretraining`."""
from electra_fast.pretraining.pretrainer import ElectraPretrainer, param_groups
from electra_fast.pretraining.rtd_step import PretrainerOutput, rtd_step
from electra_fast.pretraining.sharing import tie_embeddings
from electra_fast.pretraining.token_ids import tokenizer_ids

__all__ = ["ElectraPretrainer", "PretrainerOutput", "param_groups", "rtd_step", "tie_embeddings", "tokenizer_ids"]
