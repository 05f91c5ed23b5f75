"""The engine: one conversation driven turn by turn over any backend (framework-free).

A ``Session`` owns the conversation (messages), its ``CodecSession`` (one codebook shared by
prompt and reply), its code ``Stream`` and its decode state (KV cache and hypertoken caches).
``send(text)`` renders the new turn with the tokenizer's chat template (message text is
tokenized as text: a typed ``<|im_end|>`` is not a marker), encodes only the new tokens,
prefills them in chunks, then runs ``generate.generate_codes`` until end-of-turn, ``max_tokens``
base tokens, the context limit or a cancel request (``cancel.set()`` from any thread, honoured
between prefill chunks and decode steps). This module is the text level; ``generate.py`` is
the id level. It yields events:

- ``Token(text, code, span)``: one emitted code, its number of base tokens, and the text that
  became final with it (possibly ``""`` while a multi-byte character is incomplete);
- ``Notice(text)``: something the user should know (old turns dropped to fit the context);
- ``Progress(done, total, elapsed_s)``: prefill of an input longer than one chunk, after each chunk;
- ``Done(reason, stats)``: ``stop`` | ``length`` | ``cancelled`` | ``context`` | ``withdrawn`` (cancelled
  during the prefill: the message is taken back and the conversation is as it was), with ``TurnStats``.

The session's decode state (``protocol.DecodeState``, its own: two sessions never share one)
only sees codes, positions and new codebook entries.

A new turn continues the codebook and KV cache: nothing already fed is encoded or prefilled
again. How a message joins the conversation (rendering, dropping the oldest turns when the window
is full, ``ContextFullError`` when it cannot fit even alone) is ``prompt.plan``; a refused message
leaves the conversation exactly as it was. Saving, resuming and rewinding are ``resume.py``;
the events and settings are ``events.py``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from collections.abc import Iterator
from typing import Any

from z2z_chat.backends.codec import CodecConfig, CodecSession
from z2z_chat.backends.engine.detok import Detokenizer
from z2z_chat.backends.engine.grammar import Grammar
from z2z_chat.backends.engine.generate import PREFILL_CHUNK, generate_codes, prefill_chunks
from z2z_chat.backends.engine.prompt import ContextFullError, ContextUsage, TurnPlan, plan, reply_room
from z2z_chat.backends.protocol import DecodeState
from z2z_chat.backends.engine.steps import Stream, sync_entries
from z2z_chat.backends.engine.utf8_guard import Utf8Guard
from z2z_chat.backends.engine.events import Done, Event, GenerationSettings, Notice, Progress, Token, TurnStats
from z2z_chat.backends.engine.kv_store import codes_digest
from z2z_chat.backends.engine.resume import Resumable


class Session(Resumable):
    def __init__(self, state: DecodeState, tokenizer: Any, codec: CodecConfig, *,
                 position_mode: str = "compressed", system: str | None = None, guard: Utf8Guard | None = None):
        self.state = state
        self.tok = tokenizer
        self.codec_config = codec
        self.position_mode = position_mode
        self.system = system
        self.V = codec.base_vocab_size
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                 tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|end|>")}
        self.stop_ids = {i for i in stops if isinstance(i, int) and 0 <= i < self.V and i != tokenizer.unk_token_id}
        self.guard = guard or Utf8Guard(tokenizer, self.V)
        self.reset()

    # --- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: messages, codebook and KV cache."""
        self.messages: list[dict[str, str]] = []
        self.marks: list[tuple[int, int] | None] = []  # per message: (codes, fed_text chars) before it
        self._clear_stream()

    def _clear_stream(self) -> None:
        self.codec = CodecSession(self.codec_config)
        self.stream = Stream(self.position_mode)
        self.fed_text = ""  # the text equivalent of the stream (template markers included)
        self._prompt_logits: tuple[str, np.ndarray] | None = None  # (codes' digest, logits after them)
        self.state.reset()

    @property
    def codes(self) -> list[int]:
        return self.stream.codes

    @property
    def positions(self) -> list[int]:
        return self.stream.positions

    @property
    def fed(self) -> int:
        return self.stream.fed

    def measure(self, text: str) -> tuple[int, int]:
        """(base tokens, positions) ``text`` would take if sent next, against the codebook as it is
        now (the conversation's own entries apply); nothing changes."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return len(ids), len(CodecSession.from_dict(self.codec.to_dict()).encode(ids))

    def check_fits(self, user_text: str, settings: GenerationSettings | None = None) -> None:
        """Raise ``ContextFullError`` when ``user_text`` cannot fit even with every earlier turn
        dropped (what ``send`` would raise), before anything changes: the app keeps the text."""
        self._plan(user_text, settings or GenerationSettings())

    def context_usage(self, settings: GenerationSettings | None = None) -> ContextUsage:
        settings = settings or GenerationSettings()
        window = self.state.context_length
        return ContextUsage(len(self.codes) if self.position_mode == "compressed" else self.stream.n_base,
                            window, self.stream.n_base, reply_room(settings.max_tokens, window))

    def _plan(self, user_text: str, settings: GenerationSettings, prefix: str = "") -> TurnPlan:
        window = self.state.context_length
        return plan(self.tok, self.system, self.messages, user_text, self.fed_text, self.codec, self.stream,
                    window, reply_room(settings.max_tokens, window), prefix)

    # --- one turn ---------------------------------------------------------------------------

    def send(self, user_text: str, settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None, prefix: str = "", grammar: Grammar | None = None) -> Iterator[Event]:
        """Add a user message and stream the reply (see the module docstring). With ``prefix``
        the reply starts with that text (given, not written: only what follows it is streamed);
        with ``grammar`` the reply follows it (``grammar.py``: structured output)."""
        settings = settings or GenerationSettings()
        p = self._plan(user_text, settings, prefix)
        drop, restart, text, ids = p.drop, p.restart, p.text, p.ids
        if drop and not settings.drop_old_turns:
            window = self.state.context_length
            raise ContextFullError(
                f"the conversation does not fit in the context window ({window} positions, "
                f"{reply_room(settings.max_tokens, window)} of them kept for the reply): drop {drop} of its "
                "oldest turns or lower max tokens")
        before = self.to_dict()  # a message withdrawn during its prefill leaves no trace
        if restart:
            self.messages = self.messages[2 * drop:]
            self.marks = [None] * len(self.messages)  # re-read as one text: no boundaries inside it
            self._clear_stream()
        if drop:
            yield Notice(f"dropped the {drop} oldest turn(s) to fit the context window "
                         f"({self.state.context_length} positions); the rest was re-read")
        self.messages.append({"role": "user", "content": user_text})
        start = len(self.codes)
        self.marks.append(None if restart else (start, len(self.fed_text)))
        self.stream.extend(self.codec.encode(ids), self.codec)
        self.fed_text += text
        # where the reply begins; a given prefix is merged with the generation prompt's codes: no boundary
        reply_mark = None if prefix else (len(self.codes), len(self.fed_text))
        pending = sum(len(self.codec.expand(c)) for c in self.codes[self.fed:])
        stats = TurnStats(prompt_tokens=len(ids), prompt_codes=len(self.codes) - start,
                          codebook_capacity=self.codec_config.max_codebook_size,
                          context_tokens=self.stream.n_base, context_codes=len(self.codes),
                          cached_tokens=self.stream.n_base - pending, cached_codes=self.fed)
        reply: list[str] = [prefix]
        withdrawn: list[bool] = []
        try:
            yield from self._reply(settings, cancel, stats, reply, withdrawn, grammar=grammar)
        finally:  # also when the consumer stops early: what was said stays said
            if withdrawn:
                self.restore(before) if restart else self.rewind(before)
            else:
                self.messages.append({"role": "assistant", "content": "".join(reply)})
                self.marks.append(reply_mark)

    def regenerate(self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                   grammar: Grammar | None = None) -> Iterator[Event]:
        """Answer the last message again, when the conversation ends with it (after ``rewind_to``
        the reply): from the logits kept when it was first answered, so nothing is read again and,
        greedy, the reply is the first one; where they are gone (a restored conversation), the
        message is taken back and sent again. ``ValueError`` when the last message is not a user's."""
        settings = settings or GenerationSettings()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("there is no unanswered user message to answer again")
        kept = self._prompt_logits
        if self.fed != len(self.codes) or kept is None or kept[0] != codes_digest(self.codes):
            text = self.messages[-1]["content"]
            self.rewind_to(len(self.messages) - 1)
            yield from self.send(text, settings, cancel, grammar=grammar)
            return
        reply_mark = (len(self.codes), len(self.fed_text))
        stats = TurnStats(codebook_capacity=self.codec_config.max_codebook_size, context_tokens=self.stream.n_base,
                          context_codes=len(self.codes), cached_tokens=self.stream.n_base, cached_codes=self.fed)
        reply: list[str] = []
        try:
            yield from self._reply(settings, cancel, stats, reply, [], logits=kept[1], grammar=grammar)
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            self.marks.append(reply_mark)

    @property
    def prompt_logits(self) -> tuple[str, np.ndarray] | None:
        """(digest of the codes, logits after them) kept where the last reply began, for ``regenerate``;
        a conversation parked elsewhere keeps them with its state (``keep_prompt_logits``)."""
        return self._prompt_logits

    def keep_prompt_logits(self, kept: tuple[str, np.ndarray] | None) -> None:
        self._prompt_logits = kept

    def _reply(self, settings: GenerationSettings, cancel: threading.Event | None, stats: TurnStats,
               reply: list[str], withdrawn: list[bool], logits: np.ndarray | None = None,
               grammar: Grammar | None = None) -> Iterator[Event]:
        """Prefill what is pending (unless ``logits``, the last fed position's, are given), then decode."""
        detok = Detokenizer(self.tok)
        t0 = time.perf_counter()
        sync_entries(self.state, self.codec)
        if logits is None:
            done = total = 0
            for done, total, logits in prefill_chunks(self.state, self.stream, cancel):
                if total > PREFILL_CHUNK:
                    yield Progress(done, total, time.perf_counter() - t0)
            stats.prefill_s = time.perf_counter() - t0
            if done < total:
                withdrawn.append(True)
                yield Done("withdrawn", stats)
                return
        # a regenerate at this point reuses these logits: the same reply, greedy, without a forward
        self._prompt_logits = (codes_digest(self.codes), logits.copy())
        reply_ids: list[int] = []
        reason = "length"
        t_dec = time.perf_counter()
        steps = generate_codes(self.state, self.codec, self.stream, logits, settings, stop_ids=self.stop_ids,
                               context_length=self.state.context_length, cancel=cancel, guard=self.guard,
                               grammar=grammar)
        try:
            for step in steps:
                if stats.reply_codes == 0:
                    stats.ttft_s = time.perf_counter() - t0
                stats.reply_codes += 1
                stats.drafted_codes += step.drafted
                stats.reply_tokens += len(step.ids)
                reply_ids += step.ids
                reason = step.reason or reason
                if step.reason == "stop":
                    break
                text = detok.add(step.ids)
                reply.append(text)
                yield Token(text, step.code, len(step.ids))
        finally:
            # the stream holds every sampled code (the last one is fed with the next turn)
            self.fed_text += self.tok.decode(reply_ids, skip_special_tokens=False)
        tail = detok.flush()
        if tail:
            reply.append(tail)
            yield Token(tail, None, 0)
        stats.decode_s = time.perf_counter() - t_dec
        stats.codebook_size = len(self.codec)
        yield Done(reason, stats)
