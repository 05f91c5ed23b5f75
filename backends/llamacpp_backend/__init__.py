"""zip2zip on llama.cpp (llama-cpp-python's low-level API): every CPU, no torch or MLX needed."""
