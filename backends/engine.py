"""The engine: one conversation driven step by step over any backend (framework-free).

A ``Session`` owns the conversation (messages), its ``CodecSession`` (one codebook shared by
prompt and reply) and the backend's state (KV cache and hypertoken caches). ``send(text)``
renders the new turn with the tokenizer's chat template, encodes only the new tokens, prefills
them, then samples codes one by one until end-of-turn, ``max_tokens``, the context limit or a
cancel request (``cancel.set()`` from any thread, honoured between steps). It yields events:

- ``Token(text, code, span)``: one emitted code, its number of base tokens, and the text that
  became final with it (possibly ``""`` while a multi-byte character is incomplete);
- ``Notice(text)``: something the user should know (old turns dropped to fit the context);
- ``Done(reason, stats)``: ``stop`` | ``length`` | ``cancelled`` | ``context``, with ``TurnStats``.

The backend only sees codes, positions and new codebook entries::

    add_entries(entries, candidate)   # new (id, base ids); candidate: the valid new id, if any
    forward(codes, positions) -> np.ndarray   # logits of the last position, (V + C,)
    trim(n); reset(); close(); context_length: int

A new turn continues the codebook and KV cache: nothing already fed is encoded or prefilled
again. ``to_dict``/``from_dict`` save and resume a conversation; the KV cache is rebuilt by one
prefill at the next ``send``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from .codec import CodecConfig, CodecSession
from .detok import Detokenizer
from .sampling import Sampler, SamplingSettings


class Backend(Protocol):
    context_length: int

    def add_entries(self, entries: Sequence[tuple[int, tuple[int, ...]]],
                    candidate: tuple[int, tuple[int, ...]] | None = None) -> None: ...
    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray: ...
    def trim(self, n: int) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class ContextFullError(RuntimeError):
    """The new message alone does not fit in the model's context window."""


@dataclass
class Token:
    text: str
    code: int | None  # None: text held back until the end of the reply, no code of its own
    span: int


@dataclass
class Notice:
    text: str


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

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.reply_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def decode_codes_s(self) -> float:
        return self.reply_codes / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tok -> {self.prompt_codes} codes | "
                f"reply {self.reply_tokens} tok -> {self.reply_codes} codes | "
                f"codebook {self.codebook_size}/{self.codebook_capacity} | "
                f"ttft {self.ttft_s * 1000:.0f} ms | prefill {self.prefill_tok_s:.1f} tok/s | "
                f"decode {self.decode_tok_s:.1f} tok/s ({self.decode_codes_s:.1f} codes/s)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                               "decode_codes_s": self.decode_codes_s}


@dataclass
class Done:
    reason: str
    stats: TurnStats


Event = Token | Notice | Done


@dataclass
class GenerationSettings:
    max_tokens: int = 512  # codes generated per reply
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


class Session:
    def __init__(self, backend: Backend, tokenizer: Any, codec: CodecConfig, *,
                 position_mode: str = "compressed", system: str | None = None):
        self.backend = backend
        self.tok = tokenizer
        self.codec_config = codec
        self.position_mode = position_mode
        self.system = system
        self.V = codec.base_vocab_size
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                 tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|end|>")}
        self.stop_ids = {i for i in stops if isinstance(i, int) and 0 <= i < self.V and i != tokenizer.unk_token_id}
        self.reset()

    # --- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: messages, codebook and KV cache."""
        self.messages: list[dict[str, str]] = []
        self._clear_stream()

    def _clear_stream(self) -> None:
        self.codec = CodecSession(self.codec_config)
        self.codes: list[int] = []  # every code of the conversation, in order
        self.positions: list[int] = []
        self.fed = 0  # codes[:fed] are in the backend's KV cache; the rest are pending
        self.fed_text = ""  # the text equivalent of codes (template markers included)
        self.backend.reset()

    def _next_position(self, span: int) -> int:
        if self.position_mode == "base_token_end":
            return (self.positions[-1] if self.positions else -1) + span
        return len(self.positions)

    def _append(self, code: int, span: int) -> None:
        self.codes.append(code)
        self.positions.append(self._next_position(span))

    # --- prompt -----------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def _prompt_delta(self, user_text: str) -> tuple[str, bool]:
        """Text to feed for the new turn; True when the whole conversation must be re-fed."""
        full = self._render(self.messages + [{"role": "user", "content": user_text}], True)
        if full.startswith(self.fed_text):
            return full[len(self.fed_text):], False
        return full, True  # the template re-rendered history differently: start the stream over

    def _feed(self, text: str, ids: list[int]) -> None:
        for c in self.codec.encode(ids):
            self._append(c, len(self.codec.expand(c)))
        self.fed_text += text

    def _fit(self, user_text: str, max_tokens: int) -> Generator[Notice, None, tuple[str, list[int]]]:
        """Drop the oldest turns until prompt + reply budget fit the context window; returns the
        text to feed for the new turn and its base ids."""
        dropped = 0
        while True:
            delta, restart = self._prompt_delta(user_text)
            if restart:
                self._clear_stream()
            ids = self.tok(delta, add_special_tokens=False)["input_ids"]  # at least as many as its codes
            budget = self.backend.context_length - max(len(self.codes), self._next_position(1))
            if len(ids) + max_tokens <= budget:
                break
            if not self.messages:
                raise ContextFullError(
                    f"the message needs about {len(ids)} tokens plus {max_tokens} for the reply, but the "
                    f"context window holds {self.backend.context_length}: shorten it or lower max tokens")
            self.messages = self.messages[2:] if len(self.messages) >= 2 else []
            dropped += 1
            self._clear_stream()
        if dropped:
            yield Notice(f"dropped the {dropped} oldest turn(s) to fit the context window "
                         f"({self.backend.context_length} tokens); the rest was re-read")
        return delta, ids

    # --- one turn ---------------------------------------------------------------------------

    def send(self, user_text: str, settings: GenerationSettings | None = None,
             cancel: threading.Event | None = None) -> Iterator[Event]:
        """Add a user message and stream the reply (see the module docstring)."""
        settings = settings or GenerationSettings()
        delta, ids = yield from self._fit(user_text, settings.max_tokens)
        self.messages.append({"role": "user", "content": user_text})
        start = len(self.codes)
        self._feed(delta, ids)
        stats = TurnStats(prompt_tokens=len(ids), codebook_capacity=self.codec_config.max_codebook_size)
        reply: list[str] = []
        try:
            yield from self._generate(settings, cancel, stats, start, reply)
        finally:  # also when the consumer stops early: what was said stays said
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def _sync_entries(self) -> None:
        self.backend.add_entries(self.codec.take_new_entries(), self.codec.candidate())

    def _generate(self, settings: GenerationSettings, cancel: threading.Event | None,
                  stats: TurnStats, prompt_start: int, reply: list[str]) -> Iterator[Event]:
        sampler = Sampler(settings.sampling, self.V)
        detok = Detokenizer(self.tok)
        window = settings.sampling.repetition_window
        t0 = time.perf_counter()
        self._sync_entries()
        logits = self.backend.forward(self.codes[self.fed:], self.positions[self.fed:])
        stats.prompt_codes = len(self.codes) - prompt_start
        self.fed = len(self.codes)
        stats.prefill_s = time.perf_counter() - t0
        reply_ids: list[int] = []
        reason = "length"
        t_dec = time.perf_counter()
        try:
            while True:
                code = sampler.sample(logits, self.codec.num_allowed_hyper(), self.codes[-window:])
                ids = self.codec.push(code)
                self._append(code, len(ids))
                reply_ids += ids
                if stats.reply_codes == 0:
                    stats.ttft_s = time.perf_counter() - t0
                stats.reply_codes += 1
                stats.reply_tokens += len(ids)
                if code in self.stop_ids:
                    reason = "stop"
                    break
                text = detok.add(ids)
                reply.append(text)
                yield Token(text, code, len(ids))
                if stats.reply_codes >= settings.max_tokens:
                    break
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if self._next_position(self.codec_config.max_merge_size) >= self.backend.context_length:
                    reason = "context"
                    break
                self._sync_entries()
                logits = self.backend.forward([code], [self.positions[-1]])
                self.fed = len(self.codes)
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

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "system": self.system, "position_mode": self.position_mode,
                "messages": [dict(m) for m in self.messages], "codes": list(self.codes), "fed": self.fed,
                "fed_text": self.fed_text, "codec": self.codec.to_dict()}

    def _load(self, d: dict[str, Any]) -> CodecSession:
        codec = CodecSession.from_dict(d["codec"])
        if codec.config != self.codec_config:
            raise ValueError("the saved conversation was made with a different codec configuration "
                             "(another model?); start a new conversation")
        return codec

    def restore(self, d: dict[str, Any]) -> None:
        """Resume a saved conversation; the KV cache is rebuilt by one prefill at the next send."""
        codec = self._load(d)
        self._clear_stream()
        self._set(d, codec)
        codec.take_new_entries()
        self.backend.add_entries(list(codec.codebook.items()), codec.candidate())

    def rewind(self, d: dict[str, Any]) -> None:
        """Go back to an earlier ``to_dict()`` of this session (e.g. to regenerate a reply),
        trimming the KV cache instead of rebuilding it."""
        codec = self._load(d)
        if self.codes[:len(d["codes"])] != list(d["codes"]):
            self.restore(d)  # not an earlier state of this stream
            return
        keep = min(int(d["fed"]), self.fed)
        self.backend.trim(self.fed - keep)
        self._set(d, codec)
        self.fed = keep

    def _set(self, d: dict[str, Any], codec: CodecSession) -> None:
        self.system, self.messages = d.get("system"), [dict(m) for m in d["messages"]]
        self.codec, self.fed_text = codec, d["fed_text"]
        self.codes, self.positions = [], []
        for c in d["codes"]:
            self._append(c, len(codec.expand(c)))
