"""Where a model comes from: checkpoint description, base and tokenizer sources, downloaded
assets and the embedded default model's location."""
