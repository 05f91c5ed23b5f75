"""How a conversation runs: its session, prompt planning, saved state, the decode loops, sampling
and the text guards (framework-free; the state of each framework implements ``protocol.py``)."""
