"""The server's request parsing and stop strings in-process (``app/server/openai_shapes.py``,
``app/server/worker.py``): every field implemented or refused with a 400 naming it."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")

from z2z_chat.app.server.openai_shapes import APIError, parse_request  # noqa: E402
from z2z_chat.app.server.worker import StopText  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


def parse(**body):
    return parse_request({"messages": USER} | body, "tiny")


def refused(body: dict) -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(body, "tiny")
    return e.value


def test_consecutive_messages_of_one_role_are_joined():
    r = parse_request({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "tiny")
    assert r.message == "a\n\nb" and r.history == []


def test_an_assistant_message_last_is_a_prefix_to_continue():
    r = parse_request({"messages": USER + [{"role": "assistant", "content": "Once upon"}]}, "tiny")
    assert r.message == "hi" and r.prefix == "Once upon" and r.history == []


@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logprobs", True),
                                         ("logit_bias", {"1": 5}), ("tools", [{"type": "function"}])])
def test_what_is_not_done_is_refused_naming_the_field(field, value):
    e = refused({"messages": USER, field: value})
    assert e.status == 400 and e.param == field and field in e.message


def test_unknown_fields_are_refused_and_off_values_accepted():
    e = refused({"messages": USER, "temprature": 0.5})
    assert e.param == "temprature" and "unrecognized" in e.message
    parse(presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="me", metadata={})


def test_settings_come_from_the_table_with_readable_bounds():
    r = parse(max_completion_tokens=7, top_k=3, repetition_penalty=1.1, seed=4)
    assert r.settings == {"max_tokens": 7, "top_k": 3, "repetition_penalty": 1.1, "seed": 4}
    e = refused({"messages": USER, "max_tokens": 0})
    assert e.param == "max_tokens" and "[1, 1048576]" in e.message and "e+" not in e.message


def test_a_lone_surrogate_is_a_400():
    e = refused({"messages": [{"role": "user", "content": "a\ud800b"}]})
    assert e.status == 400 and "surrogate" in e.message


@pytest.mark.parametrize("chunks,stops,sent", [
    (["The capital ", "of", " France ", "is Paris"], ["of"], "The capital "),
    (["1. ", "2. ", "3. ", "4. ", "5. ", "6."], ["5"], "1. 2. 3. 4. "),
    (["ab", "c|", "|d"], ["||"], "abc"),
    (["no stop here"], ["zz"], "no stop here"),
])
def test_stop_text_sends_nothing_after_a_stop(chunks, stops, sent):
    st = StopText(stops)
    out = "".join(st.feed(c) for c in chunks) + st.flush()
    assert out == sent == st.sent and st.hit == (sent != "".join(chunks))
