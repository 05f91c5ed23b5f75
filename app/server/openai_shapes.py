"""OpenAI chat-completions shapes: validate a request, build responses, chunks and errors.

``parse_request(body, model_id)`` returns a ``ChatRequest`` or raises ``APIError`` with the
status, type, param and code OpenAI uses, so every user error is a 4xx with OpenAI's body
(``{"error": {"message", "type", "param", "code"}}``). Token counts in ``usage`` are base tokens
(what clients count); the zip2zip figures travel in an extra ``zip2zip`` object.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from z2z_chat.backends.errors import SettingsError
from z2z_chat.backends.engine.settings import SETTINGS, TABLE

# Every field a request may carry: implemented, accepted without effect (documented), or refused
# with a 400 naming it when it asks for something this server does not do. Anything else: a 400.
NO_EFFECT = {"user", "metadata", "store", "service_tier", "cache_prompt", "parallel_tool_calls"}
REFUSED = {"tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls",
           "function_call": "function calls", "audio": "audio output", "logprobs": "log probabilities",
           "top_logprobs": "log probabilities", "logit_bias": "logit bias", "prediction": "predicted outputs",
           "web_search_options": "web search", "presence_penalty": "presence penalty (use repetition_penalty)",
           "frequency_penalty": "frequency penalty (use repetition_penalty)"}
HANDLED = {"model", "messages", "stream", "stream_options", "stop", "n", "response_format", "modalities",
           "max_completion_tokens"} | {s.name for s in SETTINGS}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    system: str | None
    history: list[dict[str, str]]  # user/assistant turns before the new message, alternating
    message: str  # the new user message
    prefix: str = ""  # an assistant message sent last: the reply continues it
    json: bool = False  # response_format json_object / json_schema: the reply is JSON
    schema: dict[str, Any] | None = None  # its JSON schema (None: any JSON object)
    settings: dict[str, Any] = field(default_factory=dict)  # the settings table's names the request gave
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined); valid Unicode only."""
    if isinstance(content, list):
        content = "".join(_parts(content, where))
    if not isinstance(content, str):
        raise _bad(f"{where}: content must be a string or a list of text parts", where)
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # JSON lets "\ud800" through: a lone surrogate is no text
        raise _bad(f"{where}: content holds a lone surrogate (invalid Unicode)", where) from None
    return content


def _parts(content: list, where: str) -> list[str]:
    out = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(f"{where}: each content part must be an object with a 'type'", where)
        if part["type"] != "text":
            raise _bad(f"{where}: content parts of type {part['type']!r} are not supported (text only)", where,
                       "unsupported_content")
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}: a text part needs a string 'text'", where)
        out.append(part["text"])
    return out


def _settings(body: dict) -> dict[str, Any]:
    """The generation settings the request gives, by the settings table (OpenAI's names, plus ours:
    ``top_k``, ``repetition_penalty``, ``lookahead``, ...); each checked against its bounds."""
    given = {s.name: body[s.name] for s in SETTINGS if body.get(s.name) is not None}
    if body.get("max_completion_tokens") is not None:
        given["max_tokens"] = body["max_completion_tokens"]
    for name, v in given.items():
        try:
            TABLE[name].check(v)
        except SettingsError as e:
            raise _bad(str(e), name, "invalid_value") from None
    return given


def _fields(body: dict) -> None:
    """Every field is one this server implements or accepts without effect; a refused one set to
    anything but its "off" value is a 400 naming it."""
    for key, value in body.items():
        if key in REFUSED:
            if value not in (None, False, [], {}, 0, 0.0):
                raise _bad(f"{REFUSED[key]} ({key!r}) are not supported by this server", key, "unsupported_parameter")
        elif key not in HANDLED and key not in NO_EFFECT:
            raise _bad(f"unrecognized request argument supplied: {key!r}", key, "unknown_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise _bad("this server writes text only (modalities: ['text'])", "modalities", "unsupported_parameter")
    n = body.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise _bad("n must be 1: this server writes one reply per request", "n", "invalid_value")


def _turns(msgs: Any) -> tuple[str | None, list[dict[str, str]]]:
    """The system prompt and the user/assistant turns: consecutive messages of one role are joined
    with a blank line (the chat templates expect turns that alternate)."""
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list", "messages")
    system_parts: list[str] = []
    turns: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object", where)
        role = m.get("role")
        text = _text(m.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            if turns:
                raise _bad(f"{where}: a {role} message is only supported before the conversation's first turn", where)
            system_parts.append(text)
        elif role in ("user", "assistant"):
            if not turns and role == "assistant":
                raise _bad(f"{where}: the conversation must start with a user message", where)
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n\n" + text
            else:
                turns.append({"role": role, "content": text})
        elif role == "tool":
            raise _bad(f"{where}: tool messages are not supported", where, "unsupported_parameter")
        else:
            raise _bad(f"{where}: unknown role {role!r} (system, user or assistant)", where)
    if not turns:
        raise _bad("messages need at least one user message", "messages")
    return ("\n\n".join(system_parts) if system_parts else None), turns


def _response_format(fmt: Any) -> tuple[bool, dict[str, Any] | None]:
    """(JSON wanted, its schema): ``text``, ``json_object`` (any object) or ``json_schema``."""
    if fmt is None:
        return False, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                       "response_format")
        return True, schema
    raise _bad("response_format must be {'type': 'text' | 'json_object' | 'json_schema'}", "response_format",
               "unsupported_parameter")


def parse_request(body: Any, model_id: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_id!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    _fields(body)
    system, turns = _turns(body.get("messages"))
    prefix = turns.pop()["content"] if turns[-1]["role"] == "assistant" else ""
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise _bad("stop must be a non-empty string or a list of up to 16 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options must be an object", "stream_options")
    wants_json, schema = _response_format(body.get("response_format"))
    return ChatRequest(system, turns[:-1], turns[-1]["content"], prefix, wants_json, schema, _settings(body), stop,
                       stream, bool(opts.get("include_usage")))


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion(cid: str, model: str, text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage}


def chunk(cid: str, model: str, delta: dict[str, Any] | None, finish: str | None = None,
          usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``; with ``usage`` and no delta: the final usage chunk (no choices)."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                                 "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
    return out


def usage(stats: Any) -> dict[str, Any]:
    """OpenAI's usage in base tokens, plus the zip2zip figures."""
    return {"prompt_tokens": stats.context_tokens, "completion_tokens": stats.reply_tokens,
            "total_tokens": stats.context_tokens + stats.reply_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "zip2zip": {"prompt_codes": stats.context_codes, "cached_codes": stats.cached_codes,
                        "completion_codes": stats.reply_codes, "codebook_size": stats.codebook_size,
                        "prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4),
                        "ttft_s": round(stats.ttft_s, 4)}}
