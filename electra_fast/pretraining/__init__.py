"""Replaced-token detection on top of an encoder pair: token ids (`token_ids`), model families (`families`),
embedding sharing (`sharing`), the RTD step (`rtd_step`), `ElectraPretrainer` (`pretrainer`), saving and loading a
pair (`pairs`) and the DeBERTa-v3 recipe (`deberta_v3`)."""
