"""Replaced-token detection on top of an encoder pair: token ids, model families, embedding sharing, the RTD step
and `ElectraPretrainer`."""
