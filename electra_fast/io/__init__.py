"""Files of a run and conversions: training checkpoints (`checkpoint`), the slim models to and from transformers'
model objects (`hf`). One model's transformers format is `electra_fast.model.hf_format`; a generator/discriminator
pair's files are `electra_fast.pretraining.pairs`; a run's export and warm starts are in `electra_fast.train`."""
