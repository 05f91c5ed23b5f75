"""The server's conversation cache in-process (``app/server/conversations.py``), on llama.cpp at
the settings users run (f16 KV cache, flash attention auto) and on torch: continuations, regenerates,
edits of earlier messages, eviction to disk and a restart answer as the conversation kept in
memory would have; damaged parked files are read again. Greedy throughout."""

from __future__ import annotations

import logging

import pytest

from z2z_chat.app.server.conversations import Conversations
from z2z_chat.backends.engine.events import Done, GenerationSettings, Token
from z2z_chat.backends.engine.kv_store import KVStore

SETTINGS = GenerationSettings(max_tokens=24, drop_old_turns=False)
SYSTEM = "You answer briefly."
TURNS = ["def add(a, b):\n    return a + b", "Now write sub the same way.", "And mul.", "Thanks."]


@pytest.fixture(scope="module")
def rt(tiny_rt):
    return tiny_rt


def ask(convs: Conversations, history: list[dict], message: str, prefix: str = ""):
    """One request as the worker runs it: (reply text, stats, how the conversation was found)."""
    session, found = convs.checkout(SYSTEM, history, message, prefix)
    events = session.regenerate(SETTINGS) if found.regenerate else session.send(message, SETTINGS, prefix=prefix)
    text, done = "", None
    for ev in events:
        if isinstance(ev, Token):
            text += ev.text
        elif isinstance(ev, Done):
            done = ev
    convs.checkin(session)
    return text, done.stats, found


def talk(convs: Conversations, turns: list[str], history: list[dict] | None = None) -> list[dict]:
    history = list(history or [])
    for t in turns:
        text, _, _ = ask(convs, history, t)
        history += [{"role": "user", "content": t}, {"role": "assistant", "content": text}]
    return history


def test_a_continuation_reads_only_the_new_message(rt):
    convs = Conversations(rt)
    history = talk(convs, TURNS[:2])
    text, stats, found = ask(convs, history, TURNS[2])
    assert found.how == "hit" and found.reused == len(history)
    assert 0 < stats.cached_tokens < stats.context_tokens and stats.prompt_tokens < stats.context_tokens // 2


def test_a_regenerate_gives_the_first_reply_again_without_reading_anything(rt):
    convs = Conversations(rt)
    history = talk(convs, TURNS[:1])
    first, _, _ = ask(convs, history, TURNS[1])
    again, stats, found = ask(convs, history, TURNS[1])
    assert found.regenerate and again == first
    assert stats.cached_tokens == stats.context_tokens > 0 and stats.prompt_tokens == 0
    # the first message of a conversation too
    fresh = Conversations(rt)
    one, _, _ = ask(fresh, [], TURNS[0])
    assert ask(fresh, [], TURNS[0])[0] == one


def test_an_edit_reuses_the_shared_messages_and_keeps_the_branch_it_left(rt, tmp_path):
    reference = talk(Conversations(rt), TURNS)  # never edited
    convs = Conversations(rt, store=KVStore(tmp_path, rt.identity))
    history = talk(convs, TURNS[:2])
    _, stats, found = ask(convs, history[:2], "Now write a division, carefully.")  # edits the second message
    assert found.how == "rewound" and found.reused == 2 and stats.cached_tokens > 0
    # another client goes on with the branch the edit left: it answers as if nothing had happened
    rest = talk(convs, TURNS[2:], history)
    assert rest == reference


@pytest.mark.parametrize("slots", [1, 4])
def test_parked_conversations_answer_as_if_kept_across_eviction_and_a_restart(rt, tmp_path, slots):
    a, b = TURNS, ["Tell me about cats.", "Shorter, please.", "Why?", "Thanks."]
    kept = [talk(Conversations(rt), c) for c in (a, b)]
    store = KVStore(tmp_path, rt.identity)
    convs = Conversations(rt, slots=slots, store=store)
    ha, hb = [], []
    for i in range(2):  # interleaved: with one slot every turn parks the other conversation on disk
        ha = talk(convs, a[i:i + 1], ha)
        hb = talk(convs, b[i:i + 1], hb)
    convs.close()  # a restart: every held conversation is parked
    again = Conversations(rt, slots=slots, store=store)
    assert len(again.parked) >= 2
    ha, hb = talk(again, a[2:], ha), talk(again, b[2:], hb)
    assert [ha, hb] == kept
    assert again.counters.restores >= 2


def test_a_regenerate_after_a_restart_gives_the_first_reply(rt, tmp_path):
    store = KVStore(tmp_path, rt.identity)
    convs = Conversations(rt, store=store)
    history = talk(convs, TURNS[:1])
    first, _, _ = ask(convs, history, TURNS[1])
    convs.close()
    again, stats, found = ask(Conversations(rt, store=store), history, TURNS[1])
    assert found.how == "disk" and found.regenerate and again == first and stats.cached_tokens > 0


def test_a_damaged_parked_file_is_refused_with_a_log_line_and_read_again(rt, tmp_path, caplog):
    store = KVStore(tmp_path, rt.identity)
    convs = Conversations(rt, store=store)
    history = talk(convs, TURNS[:2])
    convs.close()
    (path,) = tmp_path.glob("*.kv")
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # truncated
    with caplog.at_level(logging.WARNING):
        text, stats, found = ask(Conversations(rt, store=store), history, TURNS[2])
    assert found.how == "new" and text and "refused" in caplog.text


def test_a_stop_cut_continues_from_the_text_the_client_got(rt):
    convs = Conversations(rt)
    session, _ = convs.checkout(SYSTEM, [], TURNS[0])
    reply = "".join(ev.text for ev in session.send(TURNS[0], SETTINGS) if isinstance(ev, Token))
    session.cut_reply(reply[:5])
    assert session.messages[-1] == {"role": "assistant", "content": reply[:5]}
    convs.checkin(session)
    history = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": reply[:5]}]
    _, stats, found = ask(convs, history, TURNS[1])
    assert found.how == "hit" and stats.cached_tokens > 0
