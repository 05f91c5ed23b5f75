"""The torch backend: hyper-encoders, the zip2zip model around a transformers causal LM, zip2zip
checkpoints, and the engine's ``Backend`` over them. Importing this package imports torch."""
