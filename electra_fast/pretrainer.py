"""Kept for the import path `electra_fast.pretrainer`: the pretrainer lives in `electra_fast.pretraining`."""
from electra_fast.pretraining.pretrainer import (ElectraPretrainer, PretrainerOutput, param_groups, rtd_step,
                                                 tie_embeddings, tokenizer_ids)

__all__ = ["ElectraPretrainer", "PretrainerOutput", "param_groups", "rtd_step", "tie_embeddings", "tokenizer_ids"]
