"""A chat tokenizer from ``tokenizer.json`` alone: the ``tokenizers`` library and jinja2, no transformers.

The llama.cpp path needs a tokenizer and nothing else of transformers, whose import costs ~2 s and
~50 MB, and ~4 s and ~240 MB where torch is installed (transformers imports it). ``ChatTokenizer``
does what z2z-chat asks of a tokenizer, with transformers' results (``tests/test_tokenizer.py``
compares them on every tokenizer the tests have):

- ``tok(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]``: ids of text;
  ``split_special_tokens`` reads special-token strings as text (message text is never a marker);
  ``return_offsets_mapping`` adds each token's character span;
- ``decode(ids, skip_special_tokens=False)``; ``convert_ids_to_tokens`` / ``convert_tokens_to_ids``;
- ``apply_chat_template(messages, tokenize=False, add_generation_prompt=False)``, rendered as
  transformers renders it (a sandboxed jinja2 environment, ``trim_blocks``/``lstrip_blocks``, the
  special tokens and ``raise_exception``/``strftime_now`` in scope);
- ``eos_token_id``, ``pad_token_id``, ``unk_token_id``, ``bos_token_id``, ``len(tok)``,
  ``get_added_vocab()``, ``all_special_ids``, ``backend_tokenizer``.

``load(directory)`` returns None where this is not enough (no readable ``tokenizer.json``, a template
this environment cannot compile, ``clean_up_tokenization_spaces`` set): the caller loads transformers
then, which reads what it can or says what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return v.get("content") if isinstance(v, dict) else v


def _template(d: Path, config: dict[str, Any]) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):  # named templates: transformers uses "default"
        t = next((x["template"] for x in t if x.get("name") == "default"), None)
    return t


def _environment() -> Any:
    from datetime import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTokenizer:
    def __init__(self, backend: Any, specials: dict[str, str | None], extra_specials: list[str],
                 chat_template: str | None):
        self.backend_tokenizer = backend
        self._specials = specials
        self.chat_template = chat_template
        self._template = None if chat_template is None else _environment().from_string(chat_template)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._added_vocab = {t.content: i for i, t in sorted(added.items())}
        named = [v for v in specials.values() if v is not None] + extra_specials
        self.all_special_ids = sorted({i for i in (backend.token_to_id(t) for t in named) if i is not None})
        for key in SPECIAL_KEYS:  # eos_token_id, ...
            tok = specials.get(key)
            setattr(self, f"{key}_id", None if tok is None else backend.token_to_id(tok))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False,
                 return_offsets_mapping: bool = False) -> dict[str, list]:
        b = self.backend_tokenizer
        b.encode_special_tokens = split_special_tokens  # as transformers sets it, per call
        try:
            enc = b.encode(text, add_special_tokens=add_special_tokens)
        finally:
            b.encode_special_tokens = False
        return {"input_ids": enc.ids} | ({"offset_mapping": enc.offsets} if return_offsets_mapping else {})

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
               ) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, token: str) -> int | None:
        i = self.backend_tokenizer.token_to_id(token)
        return self.unk_token_id if i is None else i

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self._added_vocab)

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False, return_dict: bool = False) -> str | list[int]:
        if return_dict:
            raise ValueError("ChatTokenizer returns ids or text, not a BatchEncoding")
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                     documents=None, **{k: v for k, v in self._specials.items() if v is not None})
        return self(text)["input_ids"] if tokenize else text


def load(directory: str | Path) -> ChatTokenizer | None:
    """The tokenizer of a directory holding ``tokenizer.json``, or None (see the module docstring)."""
    d = Path(directory)
    if not (d / "tokenizer.json").is_file():
        return None
    import jinja2
    from tokenizers import Tokenizer

    cfg_file = d / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    if config.get("clean_up_tokenization_spaces"):
        return None
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    try:
        backend = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception; transformers then names the problem
        return None
    try:
        return ChatTokenizer(backend, {k: _content(config.get(k)) for k in SPECIAL_KEYS}, [t for t in extra if t],
                             _template(d, config))
    except jinja2.TemplateSyntaxError:  # e.g. transformers' {% generation %} tag
        return None
