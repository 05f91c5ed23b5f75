"""Checkpoint converters, command-line front ends over ``backends/mlx_backend/convert.py`` and
``backends/llamacpp_backend/convert.py``: a torch zip2zip checkpoint to an MLX directory (``to_mlx.py``) or to
a directory the llama.cpp backend runs (``to_gguf.py``)."""
