"""Structured output over hypertokens (``backends/engine/grammar.py``): every reply parses and
follows its schema, greedy and sampled, on the tiny models (torch and llama.cpp) and on the
default model, and hypertokens are still written where the grammar accepts their whole text."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llguidance", reason='structured output: pip install "z2z-chat[serve]"')
jsonschema = pytest.importorskip("jsonschema")

from z2z_chat.backends.engine.events import Done, GenerationSettings, Token  # noqa: E402
from z2z_chat.backends.engine.grammar import Grammar, GrammarError  # noqa: E402
from z2z_chat.backends.engine.sampling import SamplingSettings  # noqa: E402

# bounded schemas: a random model ends each of them by itself (nothing can grow without limit)
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["colour", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                "maxItems": 3}},
     "required": ["words"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "admin": {"type": "boolean"}},
        "required": ["name", "admin"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def rt(tiny_rt):
    return tiny_rt


def structured(rt, prompt: str, schema, settings: GenerationSettings) -> tuple[str, int, str]:
    """(reply, hypertokens written, why it stopped) under ``schema``."""
    session = rt.session()
    grammar = Grammar.json(rt.tokenizer, schema, session.stop_ids)
    text, hyper, reason = "", 0, ""
    for ev in session.send(prompt, settings, grammar=grammar):
        if isinstance(ev, Token):
            text, hyper = text + ev.text, hyper + (ev.span > 1)
        elif isinstance(ev, Done):
            reason = ev.reason
    return text, hyper, reason


@pytest.mark.parametrize("schema", SCHEMAS, ids=["bool", "enum+int", "array", "nested"])
def test_every_reply_parses_and_follows_its_schema_greedy_and_sampled(rt, schema):
    settings = [GenerationSettings(max_tokens=200)] + [
        GenerationSettings(max_tokens=200, sampling=SamplingSettings(temperature=1.0, seed=s)) for s in range(4)]
    for prompt in ("def f(x):\n    return x", "words words words words"):
        for st in settings:
            text, _, reason = structured(rt, prompt, schema, st)
            assert reason == "stop", (text, reason)  # ended by itself: the JSON was complete
            jsonschema.validate(json.loads(text), schema)


def test_hypertokens_are_written_only_where_the_grammar_takes_their_whole_text(rt):
    """A text that repeats itself: the conversation's entries are candidates; whatever the model
    writes is valid, and some of it comes as hypertokens (the grammar does not reduce the model
    to base tokens)."""
    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 120}},
              "required": ["text"], "additionalProperties": False}
    prompt = "abc abc abc abc def def def def " * 6
    hyper = 0
    for seed in range(6):
        st = GenerationSettings(max_tokens=300, sampling=SamplingSettings(temperature=1.0, seed=seed))
        text, h, _ = structured(rt, prompt, schema, st)
        jsonschema.validate(json.loads(text), schema)
        hyper += h
    assert hyper > 0


def test_a_hypertoken_whose_later_tokens_the_grammar_refuses_is_not_written(rt):
    from z2z_chat.backends.codec import CodecSession
    from z2z_chat.backends.engine.sampling import Sampler
    from z2z_chat.backends.engine.steps import StepRules, Stream

    tok, V = rt.tokenizer, rt.codec.base_vocab_size
    codec = CodecSession(rt.codec)
    for text in ('{"a', '{"b', "{{", '{"'):  # entries that start as the JSON must, then go astray
        for code in codec.encode(tok(text, add_special_tokens=False)["input_ids"] * 4):
            codec.push(code)
    session = rt.session()
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    grammar = Grammar.json(tok, schema, session.stop_ids)
    rules = StepRules(codec, Stream(), Sampler(SamplingSettings(), V), 100, session.stop_ids, 1000, grammar=grammar)
    first_ok = grammar.allowed()
    entries = [j for j in range(len(codec)) if first_ok[codec.expand(V + j)[0]]]
    bad = [j for j in entries if not grammar.fits(codec.expand(V + j))]
    if not bad:
        pytest.skip("no entry starts validly and goes wrong with this tokenizer")
    logits = np.full(V + rt.codec.max_codebook_size, -5.0, dtype=np.float32)
    logits[V + bad[0]] = 10.0  # the model's favourite goes wrong after its first token
    code = rules.pick(logits, len(codec), None, [])
    ids = codec.expand(code) if code >= V else (code,)
    assert code != V + bad[0] and grammar.fits(ids)


def test_a_schema_that_cannot_be_compiled_is_a_clear_error(rt):
    with pytest.raises(GrammarError, match="schema"):
        Grammar.json(rt.tokenizer, {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}},
                     rt.session().stop_ids)


def test_the_default_model_writes_hypertokens_inside_json_strings():
    pytest.importorskip("llama_cpp", reason='llama.cpp backend: pip install "z2z-chat[llamacpp]"')
    from z2z_chat.backends.runtime import open_runtime

    rt = open_runtime(None, "llamacpp")
    try:
        schema = {"type": "object", "properties": {"copies": {"type": "array", "maxItems": 4,
                                                              "items": {"type": "string", "maxLength": 80}}},
                  "required": ["copies"], "additionalProperties": False}
        text, hyper, reason = structured(rt, "Write the sentence 'the cat sat on the mat' three times.", schema,
                                         GenerationSettings(max_tokens=160))
        jsonschema.validate(json.loads(text), schema)
        assert reason == "stop" and hyper > 0, text
    finally:
        rt.close()
