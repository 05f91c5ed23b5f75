"""The app's rules without Textual (``app/controller.py``) on a real SQLite file and a tiny model."""

from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("torch")

from z2z_chat.app.cli import build_parser  # noqa: E402
from z2z_chat.app.controller import ChatController, TurnEnd  # noqa: E402
from z2z_chat.app.options import AppOptions  # noqa: E402
from z2z_chat.app.store import open_store  # noqa: E402


@pytest.fixture(scope="module")
def runtime(tiny_ckpt):
    from z2z_chat.backends.runtime import open_runtime

    return open_runtime(str(tiny_ckpt), "torch", "cpu")


def controller(runtime, db, tiny_ckpt) -> ChatController:
    args = build_parser().parse_args(["--model", str(tiny_ckpt), "--max-tokens", "8"])
    ctl = ChatController(AppOptions.from_args(args), open_store(db))
    ctl.runtime, ctl.session = runtime, runtime.session()
    return ctl


def turn(ctl: ChatController, text: str, locked: bool = False) -> None:
    """One turn as the UI runs it: a StoreBusy (a locked database) is shown, the turn goes on."""
    from z2z_chat.app.store import StoreBusy

    busy = pytest.raises(StoreBusy) if locked else contextlib.nullcontext()
    with busy:
        ctl.begin_turn(text)
    end = ctl.run_turn(text, ctl.generation_settings(), None, lambda ev: None)
    busy = pytest.raises(StoreBusy) if locked else contextlib.nullcontext()
    with busy:
        ctl.finish_turn(end)
    return end


def test_reopening_after_a_crash_mid_reply_continues_the_messages_shown(runtime, tiny_ckpt, tmp_path):
    db = tmp_path / "h.db"
    ctl = controller(runtime, db, tiny_ckpt)
    turn(ctl, "hello there")
    ctl.begin_turn("second message")  # the process dies here, before the reply is saved
    cid = ctl.conv_id
    ctl.store.close()

    again = controller(runtime, db, tiny_ckpt)
    opened = again.open(cid)
    shown = [{"role": m.role, "content": m.content} for m in opened.messages]
    assert shown[-1] == {"role": "user", "content": "second message"}
    assert again.session.messages == shown  # the model continues what the user sees
    assert any("older than the messages" in n for n in opened.notes)


def test_a_saved_state_that_matches_is_resumed_without_a_note(runtime, tiny_ckpt, tmp_path):
    db = tmp_path / "h.db"
    ctl = controller(runtime, db, tiny_ckpt)
    turn(ctl, "hello there")
    cid = ctl.conv_id
    again = controller(runtime, db, tiny_ckpt)
    opened = again.open(cid)
    assert opened.notes == [] and again.session.codes == ctl.session.codes


def test_a_locked_database_on_the_first_message_loses_nothing(runtime, tiny_ckpt, tmp_path, monkeypatch):
    """The conversation row and both messages are queued while another process holds the lock,
    then written in order; the queue is not blocked by a message without a conversation."""
    import sqlite3

    import z2z_chat.app.store as store_mod

    monkeypatch.setattr(store_mod, "BUSY_WAIT_S", 0.2)
    db = tmp_path / "h.db"
    ctl = controller(runtime, db, tiny_ckpt)
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        turn(ctl, "first, while locked", locked=True)
        assert ctl.conv_id is None and len(ctl.pending.queue) == 4  # create, user, reply, state
    finally:
        holder.rollback()
        holder.close()
    turn(ctl, "second")  # flushes the queue first
    msgs = ctl.store.messages(ctl.conv_id)
    assert [m.role for m in msgs] == ["user", "assistant"] * 2 and msgs[0].content == "first, while locked"
    assert not ctl.pending.queue and len(ctl.store.conversations()) == 1


def test_leaving_a_chat_keeps_its_kv_cache_and_reopening_takes_it(tiny_ckpt, tmp_path):
    """On llama.cpp: a new chat (or quitting) saves the conversation's KV cache; after a relaunch,
    opening the chat takes it, so the next message reads only itself."""
    pytest.importorskip("llama_cpp")
    from z2z_chat.backends.runtime import open_runtime

    db = tmp_path / "h.db"
    args = build_parser().parse_args(["--model", str(tiny_ckpt), "--max-tokens", "8"])
    ctl = ChatController(AppOptions.from_args(args), open_store(db))
    ctl.attach(open_runtime(str(tiny_ckpt), "llamacpp"))
    turn(ctl, "hello there, how are you today?")
    cid, fed = ctl.conv_id, ctl.session.fed
    assert ctl.new_chat() == [] and ctl.kv.path(ctl._kv_key(cid)).is_file()
    ctl.runtime.close()

    again = ChatController(AppOptions.from_args(args), open_store(db))  # a relaunch
    again.attach(open_runtime(str(tiny_ckpt), "llamacpp"))
    opened = again.open(cid)
    assert opened.notes == [] and again.session.fed == fed > 0
    events = list(again.session.send("and tomorrow?", again.generation_settings()))
    assert events[-1].stats.cached_codes == fed
    again.delete(cid)
    assert not again.kv.path(again._kv_key(cid)).exists()


def test_edit_switch_and_regenerate_keep_every_branch_and_reread_only_from_the_branch_point(runtime, tiny_ckpt,
                                                                                          tmp_path):
    ctl = controller(runtime, tmp_path / "h.db", tiny_ckpt)
    turn(ctl, "first message")
    turn(ctl, "second message")
    cid = ctl.conv_id
    first_turn_codes = ctl.session.marks[2][0]
    assert ctl.prepare_edit(2) == "second message"
    end = turn(ctl, "second, edited")
    assert end.stats.cached_codes == first_turn_codes > 0  # the first turn was not read again
    branch = ctl.store.messages(cid)
    assert [m.content for m in branch][:3] == ["first message", branch[1].content, "second, edited"]
    assert len(ctl.store.siblings(branch[2].id)) == 2

    shown = ctl.switch_branch(2, -1)  # back to the original second message and its reply
    assert [m.content for m in shown][2] == "second message" and len(shown) == 4
    assert ctl.session.messages == [{"role": m.role, "content": m.content} for m in shown]
    assert turn(ctl, "third").stats.cached_codes == first_turn_codes  # only the branch's own part was read
    assert ctl.switch_branch(2, -1) is None  # there is no branch before the first

    old = ctl.store.messages(cid)[-1]
    again, answered = ctl.prepare_regenerate()
    assert again == "third" and answered
    ctl.run_turn(again, ctl.generation_settings(), None, lambda ev: None)
    ctl.finish_turn(TurnEnd("cancelled"))  # quitting mid-reply: kept as a stopped branch
    last = ctl.store.messages(cid)[-1]
    assert last.stopped and ctl.store.siblings(last.id) == [old.id, last.id]
    reopened = controller(runtime, tmp_path / "h.db", tiny_ckpt).open(cid)  # the branch shown is kept
    assert reopened.messages[-1].id == last.id


def test_export_is_utf8_marks_stopped_replies(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path / "data"))
    from z2z_chat.app.store import Message

    store = open_store(tmp_path / "h.db")
    args = build_parser().parse_args(["--model", str(tiny_ckpt)])
    ctl = ChatController(AppOptions.from_args(args), store)
    cid = store.create("emoji 🙂", "m", None, {})
    store.add_message(cid, Message("user", "smile 🙂"))
    store.add_message(cid, Message("assistant", "partial", stopped=True))
    ctl.open(cid)
    path = ctl.export()
    text = path.read_bytes().decode("utf-8")
    assert "smile 🙂" in text and "(stopped)" in text and path.parent == tmp_path / "data" / "exports"


def test_settings_dialog_validates_like_the_cli(tiny_ckpt, tmp_path):
    from z2z_chat.backends.errors import SettingsError

    args = build_parser().parse_args(["--model", str(tiny_ckpt), "--top-k", "5", "--repetition-penalty", "1.2"])
    ctl = ChatController(AppOptions.from_args(args), open_store(tmp_path / "h.db"))
    g = ctl.generation_settings()
    assert g.sampling.top_k == 5 and g.sampling.repetition_penalty == 1.2  # not dropped by the UI
    for bad in ("temperature=nan", "repetition_penalty=inf", "max_tokens=0", "colour=red", "top_k=x"):
        with pytest.raises(SettingsError):
            ctl.set_settings(bad)
    ctl.set_settings("temperature=0.5 top_k=3")
    assert ctl.generation_settings().sampling.top_k == 3


def test_a_new_chat_starts_from_the_defaults_not_from_the_previous_chat(runtime, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path / "data"))  # defaults other tests saved stay theirs
    ctl = controller(runtime, tmp_path / "h.db", tiny_ckpt)
    defaults = dict(ctl.settings)
    turn(ctl, "hello")
    ctl.set_system("You are a pirate.")
    ctl.apply_settings(dict(ctl.settings, temperature=0.9, top_k=7))  # this conversation only
    ctl.new_chat()
    assert ctl.session.system is None and ctl.settings == defaults
    ctl.apply_settings(dict(ctl.settings, top_k=3), as_defaults=True)  # saved as the defaults (F8)
    ctl.new_chat()
    assert ctl.settings == dict(defaults, top_k=3)


def test_regenerate_answers_a_last_message_left_unanswered(runtime, tiny_ckpt, tmp_path):
    ctl = controller(runtime, tmp_path / "h.db", tiny_ckpt)
    turn(ctl, "hello")
    ctl.begin_turn("second")  # its reply never came (an error, a crash)
    text, answered = ctl.prepare_regenerate()
    assert (text, answered) == ("second", False)
    ctl.finish_turn(ctl.run_turn(text, ctl.generation_settings(), None, lambda ev: None))
    assert [m.role for m in ctl.store.messages(ctl.conv_id)] == ["user", "assistant", "user", "assistant"]
