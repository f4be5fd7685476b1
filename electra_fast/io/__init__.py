"""Files: the `transformers` format, training checkpoints, export of a run to `transformers` directories, warm starts."""
