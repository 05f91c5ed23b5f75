"""The z2z-chat core library: the LZW codec, zip2zip configs, model sources, the engine and one
module per framework backend.

Importing this package (or any module of it other than the ``*_backend`` ones) never imports
torch, mlx or llama_cpp; backends are chosen by a factory that imports them lazily.
"""
