"""``z2z-bench``: benchmark commands, apart from the core library (``cli.py`` is the entry point).

- ``codec.py``: compression and codec throughput, ours vs ``zip2zip-compression``;
- ``model.py``: prefill / decode / chat, zip2zip against the same model without it;
- ``quality.py``: byte-level perplexity and answers side by side with the base model;
- ``compare.py``: z2z-chat beside the engines a user would run instead (``engines.py``: those
  engines; ``report.py``: the figures, table and chart);
- ``long.py``: long documents, a question, a follow-up, and reopening the chat;
- ``serve.py``: the OpenAI-compatible server beside llama-cpp-python's;
- ``scale.py``: a random-weight model of a released model's size on llama.cpp, beside plain llama.cpp;
- ``memory.py``: peak memory of a benchmark process.
"""
