"""The MLX backend (Apple silicon; also runs, slowly, on a Linux CPU with ``mlx[cpu]``): the
zip2zip model over an mlx-lm decoder converted by ``convert/to_mlx.py``. Importing this package
imports mlx."""
