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
leaves the conversation exactly as it was. ``to_dict``/``restore`` save and resume a
conversation (the KV cache is rebuilt by one prefill at the next ``send``, or taken from a
``kv_snapshot`` saved with it when the backend can); ``rewind`` goes back to an earlier
``to_dict`` of the same stream by trimming the KV cache.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .codec import CodecConfig, CodecSession
from .detok import Detokenizer
from .errors import BackendError, SettingsError
from .generate import PREFILL_CHUNK, generate_codes, prefill_chunks
from .prompt import ContextFullError, ContextUsage, Plan, plan, reply_room
from .protocol import DecodeState, SavesKV
from .sampling import Sampler, SamplingSettings
from .snapshot import SessionState
from .steps import Stream, sync_entries
from .utf8_guard import Utf8Guard


@dataclass
class Token:
    text: str
    code: int | None  # None: text held back until the end of the reply, no code of its own
    span: int


@dataclass
class Notice:
    text: str


@dataclass
class Progress:
    """Prefill of a long input: positions fed of those to feed, seconds since it began."""

    done: int
    total: int
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / self.done * (self.total - self.done) if self.done else 0.0


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # base tokens prefilled this turn
    prompt_codes: int = 0
    reply_tokens: int = 0
    reply_codes: int = 0
    codebook_size: int = 0
    codebook_capacity: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    drafted_codes: int = 0  # reply codes that came from accepted lookahead drafts
    context_tokens: int = 0  # base tokens of the whole conversation the reply continues (clients' "prompt")
    context_codes: int = 0
    cached_tokens: int = 0  # of those, already in the KV cache when the turn began
    cached_codes: int = 0

    @property
    def codes_per_forward(self) -> float:
        """Reply codes per decode forward: 1.0 without lookahead, more when drafts are accepted."""
        forwards = self.reply_codes - self.drafted_codes
        return self.reply_codes / forwards if forwards > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.reply_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def decode_codes_s(self) -> float:
        return self.reply_codes / self.decode_s if self.decode_s else 0.0

    @property
    def meaningful_speed(self) -> bool:
        """Throughput of a reply of a few codes, or of a few milliseconds, is noise."""
        return self.reply_codes >= 8 and self.decode_s >= 0.05

    def summary(self) -> str:
        speed = (f"decode {self.decode_tok_s:.1f} tok/s ({self.decode_codes_s:.1f} codes/s)"
                 if self.meaningful_speed else "decode -")
        look = f" ({self.codes_per_forward:.2f} codes/forward)" if self.drafted_codes else ""
        return (f"prompt {self.prompt_tokens} tok -> {self.prompt_codes} codes | "
                f"reply {self.reply_tokens} tok -> {self.reply_codes} codes{look} | "
                f"codebook {self.codebook_size}/{self.codebook_capacity} | "
                f"ttft {self.ttft_s * 1000:.0f} ms | prefill {self.prefill_tok_s:.1f} tok/s | {speed}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TurnStats:
        """Read back ``to_dict()`` (derived and unknown keys ignored, bad values zeroed)."""
        out = cls()
        for f in fields(cls):
            v = d.get(f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                setattr(out, f.name, type(getattr(out, f.name))(v))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                               "decode_codes_s": self.decode_codes_s, "codes_per_forward": self.codes_per_forward}


@dataclass(frozen=True)
class KVSnapshot:
    """A conversation's KV cache as a backend exported it: ``fed`` positions holding the codes
    whose ``codes_digest`` is ``digest``."""

    data: bytes
    fed: int
    digest: str


def codes_digest(codes: Sequence[int]) -> str:
    return hashlib.sha256(array("q", codes).tobytes()).hexdigest()


@dataclass
class Done:
    reason: str
    stats: TurnStats


Event = Token | Notice | Progress | Done


@dataclass
class GenerationSettings:
    max_tokens: int = 512  # base tokens per reply: generation stops at the code that reaches it
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    lookahead: int = 0  # most drafted codes verified per forward (greedy only; 0: off)
    drop_old_turns: bool = True  # False: a conversation past the window is a ContextFullError (the server)
    hyper_margin: float | None = None  # a hypertoken must beat its first subtoken's logit by this (None: off)
    hyper_batch: int = 1  # new hypertokens reach the model this many at a time while it writes (1: as trained)

    def __post_init__(self) -> None:
        b = self.hyper_batch
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 64:
            raise SettingsError(f"hyper_batch must be an integer in 1..64, got {b!r}")
        m = self.hyper_margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)):
            raise SettingsError(f"hyper_margin must be a finite number or None, got {m!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SettingsError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or not 0 <= self.lookahead <= 8:
            raise SettingsError(f"lookahead must be an integer in 0..8, got {self.lookahead!r}")


class Session:
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

    def _plan(self, user_text: str, settings: GenerationSettings) -> Plan:
        window = self.state.context_length
        return plan(self.tok, self.system, self.messages, user_text, self.fed_text, self.codec, self.stream,
                    window, reply_room(settings.max_tokens, window))

    # --- one turn ---------------------------------------------------------------------------

    def send(self, user_text: str, settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None) -> Iterator[Event]:
        """Add a user message and stream the reply (see the module docstring)."""
        settings = settings or GenerationSettings()
        p = self._plan(user_text, settings)
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
        reply_mark = (len(self.codes), len(self.fed_text))
        pending = sum(len(self.codec.expand(c)) for c in self.codes[self.fed:])
        stats = TurnStats(prompt_tokens=len(ids), prompt_codes=len(self.codes) - start,
                          codebook_capacity=self.codec_config.max_codebook_size,
                          context_tokens=self.stream.n_base, context_codes=len(self.codes),
                          cached_tokens=self.stream.n_base - pending, cached_codes=self.fed)
        reply: list[str] = []
        withdrawn: list[bool] = []
        try:
            yield from self._reply(settings, cancel, stats, reply, withdrawn)
        finally:  # also when the consumer stops early: what was said stays said
            if withdrawn:
                self.restore(before) if restart else self.rewind(before)
            else:
                self.messages.append({"role": "assistant", "content": "".join(reply)})
                self.marks.append(reply_mark)

    def _reply(self, settings: GenerationSettings, cancel: threading.Event | None, stats: TurnStats,
               reply: list[str], withdrawn: list[bool]) -> Iterator[Event]:
        detok = Detokenizer(self.tok)
        t0 = time.perf_counter()
        sync_entries(self.state, self.codec)
        done = total = 0
        for done, total, logits in prefill_chunks(self.state, self.stream, cancel):
            if total > PREFILL_CHUNK:
                yield Progress(done, total, time.perf_counter() - t0)
        stats.prefill_s = time.perf_counter() - t0
        if done < total:
            withdrawn.append(True)
            yield Done("withdrawn", stats)
            return
        reply_ids: list[int] = []
        reason = "length"
        t_dec = time.perf_counter()
        steps = generate_codes(self.state, self.codec, self.stream, logits,
                               Sampler(settings.sampling, self.V), max_tokens=settings.max_tokens,
                               stop_ids=self.stop_ids, context_length=self.state.context_length,
                               cancel=cancel, window=settings.sampling.repetition_window,
                               lookahead=settings.lookahead, guard=self.guard,
                               hyper_margin=settings.hyper_margin, hyper_batch=settings.hyper_batch)
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

    # --- save / resume ----------------------------------------------------------------------

    def kv_snapshot(self) -> KVSnapshot | None:
        """The conversation's KV cache as bytes, with what it holds (None: this backend cannot, or
        nothing was read yet)."""
        if not isinstance(self.state, SavesKV) or self.fed == 0:
            return None
        try:
            data, n = self.state.export_kv()
        except BackendError:  # a cache kind it does not save (a sliding window): read it again instead
            return None
        if n != self.fed:  # the cache and the stream disagree: not worth keeping
            return None
        return KVSnapshot(data, n, codes_digest(self.codes[:n]))

    def _import_kv(self, kv: KVSnapshot | None) -> str | None:
        """On a fresh state after ``restore``'s ``_set``: take ``kv`` (and the entries' vectors saved
        with it) when it holds exactly the start of this stream. Returns why it was not taken (the
        caller then registers the entries and the next send reads the conversation again)."""
        if kv is None:
            return "no saved KV cache"
        if not isinstance(self.state, SavesKV):
            return "this backend cannot reuse a saved KV cache"
        if not 0 < kv.fed <= len(self.codes) or kv.digest != codes_digest(self.codes[:kv.fed]):
            return "the saved KV cache does not match the conversation"
        try:
            self.state.import_kv(kv.data, kv.fed, list(self.codec.codebook.items()), self.codec.candidate())
        except BackendError as e:
            return f"the saved KV cache was refused ({e})"
        self.stream.fed = kv.fed
        return None

    def to_dict(self) -> dict[str, Any]:
        """The conversation as JSON data (``snapshot.SessionState``): what the history stores."""
        return SessionState(self.system, self.position_mode, self.messages, self.codes, self.fed, self.fed_text,
                            self.codec, self.marks).to_dict()

    def restore(self, d: dict[str, Any], kv: KVSnapshot | None = None) -> str | None:
        """Resume a saved conversation. Its KV cache is ``kv`` when that holds the start of this
        stream (only the rest is read at the next send), else rebuilt by one prefill at the next
        send; returns why ``kv`` was not used, or None. A state that does not fit this model
        raises ``ValueError`` and changes nothing."""
        saved = SessionState.from_dict(d, self.codec_config)
        self._clear_stream()
        self._set(saved)
        self.stream.fed = 0
        self.codec.take_new_entries()
        why = self._import_kv(kv)
        if why is not None:
            self.state.add_entries(list(self.codec.codebook.items()), self.codec.candidate())
        return None if kv is None else why

    def restore_or_rebuild(self, d: dict[str, Any] | None, messages: list[dict[str, str]],
                           kv: KVSnapshot | None = None) -> str | None:
        """Resume from ``d`` (and ``kv``, see ``restore``); when it is unusable, rebuild the
        conversation from ``messages`` (re-encoded at the next send). Returns a note for the user
        when it had to rebuild."""
        if d:
            try:
                self.restore(d, kv)  # a cache that does not fit is dropped quietly: it is only a cache
                return None
            except ValueError as e:
                note = f"the saved model state was unusable ({e}); it was rebuilt from the messages"
        else:
            note = None
        self.reset()
        self.messages = [dict(m) for m in messages]
        self.marks = [None] * len(messages)
        return note

    def rewind_to(self, n: int) -> bool:
        """Go back to just before message ``n`` (to edit it, or answer it again): the KV cache is
        trimmed to that point and the hyper entries made since are dropped, so only what follows
        is read. Where the boundary is not known (the message was re-read with dropped turns), the
        conversation is rebuilt from its first ``n`` messages instead. True when the cache was kept."""
        mark = self.marks[n] if n < len(self.marks) else None
        if mark is None:
            messages = self.messages[:n]
            self.reset()
            self.messages, self.marks = messages, [None] * n
            return False
        n_codes, n_text = mark
        codec = CodecSession(self.codec_config)
        for c in self.codes[:n_codes]:
            codec.push(c)
        codec.fresh = self.codec.fresh  # entries the state has are not new
        self._rewind(SessionState(self.system, self.position_mode, [dict(m) for m in self.messages[:n]],
                                  self.codes[:n_codes], min(self.fed, n_codes), self.fed_text[:n_text], codec,
                                  self.marks[:n]))
        return True

    def follow(self, messages: list[dict[str, str]]) -> None:
        """Messages of another branch after the current end (a branch switched to): they are read
        with the next send, which continues the stream from here."""
        self.messages += [dict(m) for m in messages]
        self.marks += [None] * len(messages)

    def rewind(self, d: dict[str, Any]) -> None:
        """Go back to an earlier ``to_dict()`` of this session (e.g. to regenerate a reply),
        trimming the KV cache and dropping the hyper entries created since, instead of rebuilding."""
        self._rewind(SessionState.from_dict(d, self.codec_config), d)

    def _rewind(self, saved: SessionState, d: dict[str, Any] | None = None) -> None:
        if self.codes[:len(saved.codes)] != saved.codes:
            self.restore(d if d is not None else saved.to_dict())  # not an earlier state of this stream
            return
        keep = min(saved.fed, self.fed)
        fresh = saved.codec.fresh
        self.state.trim(self.fed - keep)
        self._set(saved)
        self.stream.fed = keep
        # the state had every entry the snapshot had handed over; the rest come with the next sync
        self.state.drop_entries(fresh)

    def _set(self, saved: SessionState) -> None:
        self.system, self.messages, self.marks = saved.system, saved.messages, list(saved.marks)
        self.codec, self.fed_text = saved.codec, saved.fed_text
        self.stream = Stream(self.position_mode)
        self.stream.extend(saved.codes, saved.codec)
