"""The torch backend: hyper-encoders, the zip2zip model around a transformers causal LM, zip2zip
checkpoints, and the model and decode states over them (``backend.py``). Importing this package imports torch."""
