"""The chat screen: sending, streaming, stopping, regenerating, snapshots, signals, bad stored data."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("torch")

from z2z_chat.app.store import open_store  # noqa: E402
from z2z_chat.app.tui import ReplyView  # noqa: E402
from app_pilot import in_tmux, make_app, ready, run, say  # noqa: E402


def test_send_message_streams_reply_and_persists(tiny_ckpt, tmp_path):
    db = tmp_path / "history.db"

    async def first():
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            assert app.focused is app.query_one("#input")
            await say(app, pilot, "def f(x): return x + x + x")
            replies = app.query(ReplyView)
            assert len(replies) == 1 and replies.last().text
            assert "codebook" in str(app.query_one("#status").render())
            return replies.last().text

    text = run(first())

    async def second():  # a new app run finds the conversation and its reply
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            items = app.query_one("#history").children
            assert len(items) == 1
            app.open_conversation(items[0].conv_id)
            await pilot.pause()
            assert app.query(ReplyView).last().text == text
            assert app.ctl.session.messages and app.ctl.session.messages[-1]["content"] == text  # engine resumed
            await say(app, pilot, "again")
            assert len(app.query(ReplyView)) == 2

    run(second())


def test_escape_cancels_and_next_message_works(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db", "--max-tokens", "3000")  # seconds of work
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            app.query_one("#input").insert("write a lot")
            await pilot.press("enter")
            while app.reply is None or not app.reply.units:  # the reply is streaming
                await pilot.pause(0.01)
            await pilot.press("escape")
            await app.workers.wait_for_complete()
            await pilot.pause()
            msgs = app.ctl.store.messages(app.ctl.conv_id)
            assert msgs[-1].role == "assistant" and msgs[-1].stopped
            assert 0 < len(app.reply.units) < 3000
            await say(app, pilot, "next")
            assert len(app.query(ReplyView)) == 2 and app.ctl.store.messages(app.ctl.conv_id)[-1].role == "assistant"

    run(go())


def test_new_chat_regenerate_toggle_and_export(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path / "data"))

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "x = 1; x = 1; x = 1")
            first = app.query(ReplyView).last().text
            await pilot.press("ctrl+r")  # greedy: the regenerated reply is the same
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert len(app.query(ReplyView)) == 1
            assert app.query(ReplyView).last().text == first
            assert [m.role for m in app.ctl.store.messages(app.ctl.conv_id)] == ["user", "assistant"]
            view = app.query(ReplyView).last()
            before = view.query_one(".units").display
            await pilot.press("ctrl+t")
            assert view.query_one(".units").display != before and view.coloured
            assert any(s for _, s in view.units if s >= 2) or view.units  # units carry spans
            await pilot.press("f4")
            await pilot.pause()
            assert not list(tmp_path.glob("z2z-chat-*.md"))  # never into the current directory
            assert list((tmp_path / "data" / "exports").glob("z2z-chat-*.md"))
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert not app.query(ReplyView) and app.ctl.conv_id is None and len(app.ctl.session.codec) == 0

    run(go())


def test_failing_model_shows_error_and_keeps_history(tiny_ckpt, tmp_path):
    db = tmp_path / "h.db"
    store = open_store(db)
    from z2z_chat.app.store import Message

    cid = store.create("old chat", "m", None, {})
    store.add_message(cid, Message("user", "hello"))
    store.close()

    async def go():
        app = make_app(tmp_path / "no-such-model", db)
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.ctl.runtime is None
            assert any("Could not load the model" in n.message for n in app._notifications)
            assert len(app.query_one("#history").children) == 1  # the history is still there
            app.query_one("#input").insert("hi")
            await pilot.press("enter")
            await pilot.pause()
            assert any("No model is loaded" in n.message for n in app._notifications)
            assert app.query_one("#input").text == "hi"  # what was typed is kept

    run(go())


def test_snapshot_main_screen(tiny_ckpt, tmp_path, snap_compare):
    app = make_app(tiny_ckpt, tmp_path / "h.db")

    async def before(pilot):
        await app.workers.wait_for_complete()
        await pilot.pause()
        app.query_one("#status").update("torch | tiny model | cpu float32 | ready")  # paths vary

    assert snap_compare(app, terminal_size=(100, 28), run_before=before)


def test_snapshot_stats_view(tiny_ckpt, tmp_path, snap_compare):
    app = make_app(tiny_ckpt, tmp_path / "h.db")

    async def before(pilot):
        await app.workers.wait_for_complete()
        await say(app, pilot, "count: 1 2 3 1 2 3 1 2 3")
        await say(app, pilot, "more")
        for t in app.ctl.turns:  # timings vary from run to run
            t.decode_s = 0.0
        await pilot.press("f3")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(100, 28), run_before=before)


def test_message_sent_while_a_reply_runs_stays_in_the_input(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db", "--max-tokens", "3000")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            app.query_one("#input").insert("write a lot")
            await pilot.press("enter")
            while app.reply is None or not app.reply.units:
                await pilot.pause(0.01)
            assert "writing a reply" in str(app.query_one("#status").render())
            app.query_one("#input").insert("typed too early")
            await pilot.press("enter")
            await pilot.pause()
            assert app.query_one("#input").text == "typed too early"
            await pilot.press("escape")
            await app.workers.wait_for_complete()

    run(go())


def test_bad_stored_data_opens_what_it_can(tiny_ckpt, tmp_path):
    db = tmp_path / "h.db"
    store = open_store(db)
    from z2z_chat.app.store import Message

    good_state = None

    async def make_state():
        nonlocal good_state
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "first")
            good_state = app.ctl.store.get(app.ctl.conv_id).state

    run(make_state())
    bad_codec = {**good_state["engine"], "codec": {**good_state["engine"]["codec"], "buffer": [60000]}}
    cases = {"missing key": {"engine": {k: v for k, v in good_state["engine"].items() if k != "codec"}},
             "id >= V": {"engine": bad_codec}, "not json": None}
    ids = {}
    for name, state in cases.items():
        cid = store.create(name, "m", None, {})
        store.add_message(cid, Message("user", "hello"))
        store.add_message(cid, Message("assistant", "hi there"))
        store.update(cid, state=state)
        ids[name] = cid
    store.db.execute("UPDATE conversations SET state = 'not json{' WHERE id = ?", (ids["not json"],))
    cid = store.create("bad utf8", "m", None, {})
    store.db.execute("INSERT INTO messages (conversation, role, content, created) VALUES (?, 'user', "
                     "CAST(X'68656c6c6fff' AS TEXT), 0)", (cid,))
    store.db.commit()
    ids["bad utf8"] = cid
    store.close()

    async def go():
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            for name, cid in ids.items():
                app.open_conversation(cid)
                await pilot.pause()
                assert app.query(UserView), name
                await say(app, pilot, f"after {name}")
                msgs = app.ctl.store.messages(cid)
                assert msgs[-1].role == "assistant" and msgs[-2].content == f"after {name}", name
                # the engine was rebuilt from the messages: the history is in the model's context
                assert app.ctl.session.messages[0]["content"].startswith("hello"), name
            text = " ".join(n.message for n in app._notifications)
            assert "rebuilt from the messages" in text and "damaged" in text

    from z2z_chat.app.widgets import UserView

    run(go())


def test_locked_database_during_a_session_keeps_the_message(tiny_ckpt, tmp_path, monkeypatch):
    import z2z_chat.app.store as store_mod

    monkeypatch.setattr(store_mod, "BUSY_WAIT_S", 0.3)
    db = tmp_path / "h.db"

    async def go():
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "first")
            holder = sqlite3.connect(db)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                await say(app, pilot, "while locked")
                assert any("locked" in n.message for n in app._notifications)
                assert len(app.query(UserView)) == 2  # still on screen
                assert app.ctl.pending.queue  # and queued
            finally:
                holder.rollback()
                holder.close()
            await say(app, pilot, "after the lock")
            contents = [m.content for m in app.ctl.store.messages(app.ctl.conv_id)]
            assert contents[2] == "while locked" and contents[4] == "after the lock"

    from z2z_chat.app.widgets import UserView

    run(go())


def test_ui_refuses_a_non_terminal():
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "terminal" in r.stderr


def test_unexpected_error_in_an_action_is_logged_and_the_app_keeps_running(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path / "data"))

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "hello")

            def boom(*a, **k):
                raise RuntimeError("simulated bug")

            app.ctl.export = boom
            await pilot.press("f4")
            await pilot.pause()
            assert app.is_running
            assert any("simulated bug" in n.message for n in app._notifications)
            assert "simulated bug" in (tmp_path / "data" / "z2z-chat.log").read_text()
            assert app.ctl.store.messages(app.ctl.conv_id)[0].content == "hello"

    run(go())


def test_chat_on_the_llamacpp_backend(tiny_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("Z2Z_CACHE_DIR", str(tmp_path / "cache"))  # the GGUF conversion goes there

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db", "--backend", "llamacpp")
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            assert app.ctl.runtime.backend_name == "llamacpp"
            await say(app, pilot, "x = 1; x = 1; x = 1")
            await say(app, pilot, "again")
            assert len(app.query(ReplyView)) == 2
            assert "llamacpp" in str(app.query_one("#status").render())

    run(go())


def test_keys_typed_at_once_with_enter_send_the_whole_message(tiny_ckpt, tmp_path):
    """Keys that arrive in one burst (a fast typist, tmux send-keys, a paste without bracketed
    paste) are taken in order: Enter sends all that came before it. Found in a tmux walkthrough:
    Enter was a priority binding that ran ahead of the queued keys, sending "W" and clearing the rest."""
    from textual import events

    app = make_app(tiny_ckpt, tmp_path / "h.db")

    async def go():
        async with app.run_test() as pilot:
            await ready(app, pilot)
            for ch in "Write a story":  # posted together, no waiting in between
                app.post_message(events.Key("space" if ch == " " else ch, ch))
            app.post_message(events.Key("enter", "\r"))
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert [m["content"] for m in app.ctl.session.messages if m["role"] == "user"] == ["Write a story"]
            assert app.query_one("#input").text == ""

    run(go())


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_saves_the_reply_being_written(tiny_ckpt, tmp_path, sig, code):
    """kill (SIGTERM) or a closed terminal (SIGHUP) during a reply: the partial reply is stored as
    stopped, and the app exits 143 / 129."""
    status = tmp_path / "status"
    cmd = f"{sys.executable} -m z2z_chat.app.cli --model {tiny_ckpt} --max-tokens 100000 --device cpu; echo $? > {status}"
    tmux, screen = in_tmux(tmp_path, cmd)
    try:
        time.sleep(1.0)
        subprocess.run([*tmux, "send-keys", "-l", "write forever"], check=True)
        time.sleep(0.5)
        subprocess.run([*tmux, "send-keys", "Enter"], check=True)
        deadline = time.time() + 30
        while "writing a reply" not in screen() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # some of the reply is written
        pid = subprocess.run(["pgrep", "-f", f"^{sys.executable} -m z2z_chat.app.cli --model {tiny_ckpt} --max-tokens 100000"],
                             capture_output=True, text=True).stdout.split()  # python, not the shell around it
        assert pid, "the app is not running"
        os.kill(int(pid[0]), sig)
        deadline = time.time() + 20
        while not status.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert status.read_text().strip() == str(code)  # our exit path, not a traceback (1)
        store = open_store(tmp_path / "history.db")
        msgs = store.messages(store.conversations()[0].id)
        assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].stopped and msgs[1].content
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_up_and_down_recall_sent_messages_across_launches(tiny_ckpt, tmp_path):
    db = tmp_path / "h.db"

    async def first():
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "first question")
            await say(app, pilot, "second question")

    async def second():
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            box = app.query_one("#input")
            box.focus()
            await pilot.press("up")
            assert box.text == "second question"
            await pilot.press("up")
            assert box.text == "first question"
            await pilot.press("down", "down")
            assert box.text == ""
            box.insert("typed")
            await pilot.press("up")  # a typed message is never replaced
            assert box.text == "typed"

    run(first())
    run(second())


def test_version():
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("z2z-chat ")


def test_waiting_shows_a_spinner_and_the_time_until_the_first_token(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(130, 32)) as pilot:
            await ready(app, pilot)
            state = app.ctl.session.state
            forward = state.forward

            def slow(codes, positions):  # a slow first forward: the wait a user sees
                time.sleep(0.6)
                return forward(codes, positions)

            state.forward = slow
            app.query_one("#input").insert("hello")
            await pilot.press("enter")
            await pilot.pause(0.4)
            status = str(app.query_one("#status").render())
            assert "waiting for the first token" in status and re.search(r"\d\.\d s", status), status
            await app.workers.wait_for_complete()
            await pilot.pause()
            state.forward = forward
            assert re.search(r"ttft (6|7|8|9)\d\d ms", str(app.query_one("#status").render()))

    run(go())


def test_small_things_a_new_user_found(tiny_ckpt, tmp_path):
    """A title of spaces is refused; the list highlights the open chat and none after Ctrl+N; F3 on
    an empty chat draws no chart; a system prompt shows in the status line and its saving is said."""
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(120, 32), notifications=True) as pilot:
            await ready(app, pilot)
            await pilot.press("f3")
            await pilot.pause()
            assert not app.screen.query("Sparkline") and "no turns yet" in str(app.screen.query_one("#stats-total").render())
            await pilot.press("escape")
            await say(app, pilot, "hello")
            await pilot.pause()
            assert app.query_one("#history").index == 0
            await pilot.press("f2")
            await pilot.pause()
            app.screen.query_one("#value").value = "   "
            await pilot.press("enter")
            await pilot.pause()
            assert app.ctl.store.get(app.ctl.conv_id).title == "hello"
            await pilot.press("f5")
            await pilot.pause()
            app.screen.query_one("#value").insert("Answer in French.")
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert "system prompt on" in str(app.query_one("#status").render())
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert app.query_one("#history").index is None
            text = " ".join(n.message for n in app._notifications)
            assert "at least one visible character" in text and "System prompt saved" in text

    run(go())


def test_labels_code_without_a_fence_its_copy_button_and_a_small_window(tiny_ckpt, tmp_path):
    """Messages say who wrote them; a reply that is code without a fence is shown as a code block
    (streamed too: no "# comment" heading), and its button copies it; at 50x15 the chat list hides
    itself (Ctrl+B shows it, titles cut with an ellipsis, dated) and a toast stays off the message box."""
    from textual.widgets._toast import Toast
    from textual.widgets._markdown import MarkdownHeader
    from textual.widgets.markdown import MarkdownFence

    from z2z_chat.app.widgets import ConversationItem, CopyButton, UserView

    code = "def f(x):\n    # add one\n    return x + 1\n"

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "a question whose title is long enough to be cut in the list of chats")
            assert str(app.query(UserView).last().render()).startswith("You\n")
            assert str(app.query(ReplyView).last().query_one(".who").render()) == app.who() == Path(app.ctl.runtime.model_name).name
            item = app.query(ConversationItem).last()
            assert re.fullmatch(r"\d\d:\d\d", str(item.query_one(".when").render()))
            streamed = ReplyView(who="m")
            await app.query_one("#chat").mount(streamed)
            for part in code.splitlines(keepends=True):
                streamed.append(part, 1)
                await pilot.pause()
            await pilot.pause(0.2)  # the block is redrawn ten times a second
            whole = ReplyView([[code, 0]], who="m")
            await app.query_one("#chat").mount(whole)
            await pilot.pause()
            for view in (streamed, whole):
                assert view.query(MarkdownFence) and not view.query(MarkdownHeader)
                assert view.query_one(MarkdownFence).code.rstrip("\n") == code.rstrip("\n")
            whole.scroll_visible(animate=False)
            await pilot.pause()
            await pilot.click(whole.query_one(CopyButton))
            assert app.clipboard.rstrip("\n") == code.rstrip("\n")
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(50, 15), notifications=True) as pilot:
            await ready(app, pilot)
            sidebar = app.query_one("#sidebar")
            assert not sidebar.display
            await pilot.press("ctrl+b")
            await pilot.pause()
            assert sidebar.display
            title = app.query(ConversationItem).first().query_one(".title")
            assert title.region.width < len("a question whose title") and "…" in str(title.render_line(0).text)
            app.notify("a toast with a few words in it, long enough to wrap over more than one line")
            await pilot.pause(0.3)
            box = app.query_one("#input").region
            toasts = app.screen.query(Toast)
            assert toasts and all(not t.region.overlaps(box) for t in toasts)

    run(go())


def test_esc_while_a_long_message_is_read_takes_it_back(tiny_ckpt, tmp_path):
    """Cancelled during its prefill, a message leaves no trace: not on screen, not in the history,
    not in the model's state; its text (and files) go back to the input."""
    notes = tmp_path / "notes.txt"
    notes.write_text("remember the milk\n")

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "hello")
            before = app.ctl.session.to_dict()
            state = app.ctl.session.state
            forward = state.forward

            def slow_reader(codes, positions):  # Esc arrives while the first chunk is read
                out = forward(codes, positions)
                if len(codes) > 100:
                    app.ctl.stop()
                return out

            state.forward = slow_reader
            box = app.query_one("#input")
            box.insert(f"/file {notes}")
            await pilot.press("enter")
            await say(app, pilot, "word " * 1500)
            state.forward = forward
            assert box.text.strip() == ("word " * 1500).strip() and [a.name for a in app.attachments] == ["notes.txt"]
            assert [m.content for m in app.ctl.store.messages(app.ctl.conv_id)][-1] != ("word " * 1500).strip()
            assert len(app.ctl.store.messages(app.ctl.conv_id)) == 2 and len(app.query(".attachment")) == 0
            assert app.ctl.session.to_dict()["messages"] == before["messages"]

    run(go())


def test_a_message_sent_while_the_model_loads_is_sent_once_it_is_ready(tiny_ckpt, tmp_path, monkeypatch):
    import time as time_module

    import z2z_chat.backends.runtime as runtime_module

    real = runtime_module.open_runtime

    def slow(*a, **k):
        time_module.sleep(1.5)  # the default model takes seconds: the user types meanwhile
        return real(*a, **k)

    monkeypatch.setattr(runtime_module, "open_runtime", slow)

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await pilot.pause()
            app.query_one("#input").insert("hello early")
            await pilot.press("enter")
            await pilot.pause()
            assert app.ctl.runtime is None and app.queued
            await app.workers.wait_for_complete()
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            msgs = app.ctl.store.messages(app.ctl.conv_id)
            assert [m.role for m in msgs] == ["user", "assistant"] and msgs[0].content == "hello early"

    run(go())
