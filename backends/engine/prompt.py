"""What a turn feeds the model, as functions of the conversation (framework-free).

- ``render(tokenizer, system, messages)``: the chat template's rendering of the messages plus a
  generation prompt, as pieces ``(text, is_message_text)``, so that message text is tokenized as
  text and never as template markers (a typed ``<|im_end|>`` stays text);
- ``tokenize(tokenizer, pieces, skip)``: text and base ids of the pieces after ``skip`` characters;
- ``plan(...)``: how a new message joins the conversation within the window: continue the stream
  (only the new text is read), or restart it after dropping the fewest oldest turns (down to half
  the window, so that the next turns continue the cache), or ``ContextFullError`` when it cannot
  fit even alone. Pure: nothing changes until the caller applies the ``TurnPlan``;
- ``reply_room``: positions kept free for a reply; ``ContextUsage``: how full the window is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from z2z_chat.backends.codec import CodecSession
from z2z_chat.backends.errors import Z2ZError
from z2z_chat.backends.engine.steps import Stream

Piece = tuple[str, bool]  # (text, is_message_text)


class ContextFullError(Z2ZError, RuntimeError):
    """The new message alone does not fit in the model's context window."""


@dataclass
class ContextUsage:
    """How full a conversation's context window is: what the status line and ``--stats`` show."""

    positions: int  # positions the conversation takes in the KV cache (with the pending code)
    window: int
    tokens: int  # base tokens they hold
    reply_room: int  # positions a reply keeps free (``max_tokens``, at most a quarter of the window)

    @property
    def saved(self) -> float:
        """Share of positions hypertokens saved."""
        return 1 - self.positions / self.tokens if self.tokens else 0.0

    @property
    def nearly_full(self) -> bool:
        """The next message (and its reply) may not fit: old turns will be dropped."""
        return self.positions + 2 * self.reply_room > self.window

    def describe(self, short: bool = False) -> str:
        if short:  # the status line
            text = f"ctx {self.positions:,}/{self.window:,} ({self.tokens:,} tok, {self.saved:.0%} saved)"
            return text + (" nearly full: oldest turns go next" if self.nearly_full else "")
        text = (f"context {self.positions:,} / {self.window:,} positions, {self.tokens:,} tokens, "
                f"{self.saved:.0%} saved")
        if self.nearly_full:
            text += " | nearly full: the next message drops the oldest turns"
        return text


SENTINEL = "\x00z2z-content-{}\x00"  # stands for a message's text while the template renders


def reply_room(max_tokens: int, context_length: int) -> int:
    """Positions kept free for a reply: max_tokens, but never more than a quarter of the window,
    so a large max_tokens does not make every message too long (the reply then stops at
    ``context``)."""
    return min(max_tokens, max(context_length // 4, 1))


@dataclass
class TurnPlan:
    drop: int  # oldest turns (user + reply) to drop
    restart: bool  # the stream starts again (a drop, or the rendering changed)
    text: str  # what is fed: the new text, or the whole kept conversation on a restart
    ids: list[int]  # its base ids


def render(tok: Any, system: str | None, messages: list[dict[str, str]]) -> list[Piece]:
    """The chat template's rendering of ``messages`` plus a generation prompt, as pieces
    ``(text, is_message_text)`` so message text is tokenized as text, never as markers."""
    msgs = ([{"role": "system", "content": system}] if system else []) + messages
    real = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marked = tok.apply_chat_template(
        [{**m, "content": SENTINEL.format(i)} for i, m in enumerate(msgs)], tokenize=False,
        add_generation_prompt=True)
    pieces: list[Piece] = []
    for i, m in enumerate(msgs):
        before, sep, marked = marked.partition(SENTINEL.format(i))
        if not sep:
            return [(real, False)]  # the template transforms message text: no split possible
        pieces += [(before, False), (m["content"], True)]
    pieces.append((marked, False))
    return pieces if "".join(p for p, _ in pieces) == real else [(real, False)]



def tokenize(tok: Any, pieces: list[Piece], skip: int) -> tuple[str, list[int]]:
    """Text and base ids of the pieces after their first ``skip`` characters."""
    text, ids = "", []
    for piece, is_text in pieces:
        if skip >= len(piece):
            skip -= len(piece)
            continue
        piece, skip = piece[skip:], 0
        if piece:
            text += piece
            ids += tok(piece, add_special_tokens=False, split_special_tokens=is_text)["input_ids"]
    return text, ids


def plan(tok: Any, system: str | None, messages: list[dict[str, str]], user_text: str, fed_text: str,
         codec: CodecSession, stream: Stream, window: int, room: int, prefix: str = "") -> TurnPlan:
    """How to add ``user_text`` to ``messages``, whose stream (``codec``, ``stream``) holds
    ``fed_text``, keeping ``room`` positions of the ``window`` for the reply; ``prefix`` is the
    start of the reply, given (read after the generation prompt, as message text)."""
    ctx, config, mode = window, codec.config, stream.mode
    M = config.max_merge_size  # the next code may take M positions (base_token_end)

    def turn(msgs: list[dict[str, str]]) -> list[Piece]:
        pieces = render(tok, system, msgs + [{"role": "user", "content": user_text}])
        return pieces + [(prefix, True)] if prefix else pieces

    pieces = turn(messages)
    target = ctx  # a restart only because the rendering changed (a new system prompt) drops nothing
    if "".join(p for p, _ in pieces).startswith(fed_text):
        target = ctx // 2
        text, ids = tokenize(tok, pieces, len(fed_text))
        # a message takes at most one position per base token: when that bound fits, no trial
        if stream.next_positions([1] * len(ids) + [M])[-1] + room <= ctx:
            return TurnPlan(0, False, text, ids)
        trial = CodecSession.from_dict(codec.to_dict())
        longer = Stream(mode, list(stream.codes), list(stream.positions), stream.n_base)
        longer.extend(trial.encode(ids), trial)
        if longer.next_position(M) + room <= ctx:
            return TurnPlan(0, False, text, ids)
    # the cache restarts. When the window is full, drop enough turns that the conversation then
    # fills at most half of it, so the next turns continue the cache instead of each restarting
    # it one turn short; when nothing reaches that, the fewest turns that make the message fit
    fit = None
    for drop in range(0, len(messages) // 2 + 1):
        kept = messages[2 * drop:]
        text, ids = tokenize(tok, turn(kept), 0)
        trial, fresh = CodecSession(config), Stream(mode)
        fresh.extend(trial.encode(ids), trial)
        need = fresh.next_position(M) + room
        if need <= ctx:
            fit = fit or TurnPlan(drop, True, text, ids)
            if need <= target:
                return TurnPlan(drop, True, text, ids)
    if fit is not None:
        return fit
    raise ContextFullError(
        f"the message needs {fresh.next_position(M)} positions plus {room} for the reply, "
        f"but the context window holds {ctx}: shorten it or lower max tokens")
