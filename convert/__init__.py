"""Checkpoint converters: a torch zip2zip checkpoint to other runtimes (``to_mlx.py``)."""
