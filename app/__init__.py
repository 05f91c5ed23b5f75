"""z2z-chat, the application: the command line (one-shot ``--prompt`` mode) and the Textual chat UI
with its conversation store. It drives ``backends`` and never the other way round.
"""
