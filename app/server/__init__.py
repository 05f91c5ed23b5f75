"""``z2z-chat serve``: the OpenAI chat API on localhost over one loaded model.

- ``openai_shapes``: request validation and the response, chunk and error bodies (no I/O);
- ``conversations``: the per-conversation cache (sessions matched by their messages, LRU);
- ``worker``: the one thread that owns the model, fed by a bounded queue;
- ``http``: the Starlette app and the ``serve`` command (uvicorn).
"""
