"""The Textual app against the real engine and torch backend on a tiny random model."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("torch")

from z2z_chat.app.cli import build_parser  # noqa: E402
from z2z_chat.app.options import AppOptions  # noqa: E402
from z2z_chat.app.store import open_store  # noqa: E402
from z2z_chat.app.tui import ReplyView, Z2ZChat  # noqa: E402


def make_app(ckpt, db: Path, *extra: str) -> Z2ZChat:
    args = build_parser().parse_args(["--model", str(ckpt), "--max-tokens", "12", "--device", "cpu", *extra])
    return Z2ZChat(AppOptions.from_args(args), store_path=db)


async def ready(app, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.ctl.runtime is not None, "model did not load"


async def say(app, pilot, text: str) -> None:
    app.query_one("#input").insert(text)
    await pilot.press("enter")
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def run(coro):
    return asyncio.run(coro)


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


@pytest.mark.slow
def in_tmux(tmp_path: Path, cmd: str) -> tuple[list[str], Callable[[], str]]:
    """``cmd`` in a real terminal (tmux, 110x30), waited for until the model has loaded: the tmux
    command line and a function that reads the screen. The caller kills the server."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    env = {**os.environ, "Z2Z_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    subprocess.run([*tmux, "new-session", "-d", "-x", "110", "-y", "30", cmd], env=env, check=True,
                   cwd=Path(__file__).resolve().parents[1])

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout

    deadline = time.time() + 90
    while "codebook" not in screen() and time.time() < deadline:
        time.sleep(0.5)
    if "codebook" not in screen():
        shown = screen()
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        pytest.fail(f"the app did not load in a real terminal:\n{shown}")
    return tmux, screen


def test_real_terminal_with_tmux(tiny_ckpt, tmp_path):
    tmux, screen = in_tmux(tmp_path, f"{sys.executable} -m z2z_chat.app.cli --model {tiny_ckpt} --max-tokens 8 --device cpu")
    try:
        time.sleep(1.0)  # let the first frames after loading settle before typing
        subprocess.run([*tmux, "send-keys", "-l", "hello tmux"], check=True)
        deadline = time.time() + 20
        while "hello tmux" not in screen() and time.time() < deadline:  # typed text is echoed in the input
            time.sleep(0.25)
        assert "hello tmux" in screen(), screen()
        subprocess.run([*tmux, "send-keys", "Enter"], check=True)
        deadline = time.time() + 60
        while "ttft" not in screen() and time.time() < deadline:
            time.sleep(0.5)
        out = screen()
        assert "hello tmux" in out and "ttft" in out, out
        subprocess.run([*tmux, "send-keys", "C-q"], check=True)
        time.sleep(1.5)
        assert open_store(tmp_path / "history.db").conversations()  # saved on the way out
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.slow
def test_edit_and_branch_in_a_real_terminal(tiny_ckpt, tmp_path):
    """Shift+Tab reaches the messages, e edits one, Enter sends the edit, < goes back to the first
    branch: what a user does, through tmux."""
    tmux, screen = in_tmux(tmp_path, f"{sys.executable} -m z2z_chat.app.cli --model {tiny_ckpt} --max-tokens 8 --device cpu")

    def keys(*k: str, literal: bool = False) -> None:
        subprocess.run([*tmux, "send-keys", *(["-l"] if literal else []), *k], check=True)
        time.sleep(0.4)

    def wait_for(text: str, timeout: float = 30) -> str:
        deadline = time.time() + timeout
        while text not in screen() and time.time() < deadline:
            time.sleep(0.25)
        assert text in screen(), screen()
        return screen()

    try:
        time.sleep(1.0)
        for question in ("first question", "second question"):
            keys(question, literal=True)
            keys("Enter")
            wait_for("ttft")
            time.sleep(0.5)
        keys("BTab")
        keys("BTab")  # the input, then the last reply, then the second question
        keys("e")
        wait_for("editing: Enter sends it as a new branch")
        for _ in range(len("question")):
            keys("BSpace")
        keys("edited", literal=True)
        keys("Enter")
        out = wait_for("‹ 2/2 ›")
        assert "second edited" in out and "second question" not in out, out
        time.sleep(1.0)
        keys("BTab")
        keys("BTab")
        keys("<")
        out = wait_for("‹ 1/2 ›")
        assert "second question" in out and "second edited" not in out, out
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


# --- what a new user runs into: each test failed before its fix ----------------------------


def test_second_conversation_rename_and_delete_do_not_crash(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "hello")
            await pilot.press("ctrl+n")
            await say(app, pilot, "second chat")
            await pilot.pause()
            items = app.query_one("#history").children
            assert len(items) == 2 and app.ctl.store.messages(app.ctl.conv_id)[0].content == "second chat"
            await pilot.press("f2")
            await pilot.pause()
            assert app.focused is not None and app.focused.id == "value"  # the dialog has focus
            app.focused.value = ""
            await pilot.press(*"renamed")  # typed straight into the focused field
            await pilot.press("enter")
            await pilot.pause()
            await app.workers.wait_for_complete()
            assert app.ctl.store.get(app.ctl.conv_id).title == "renamed"
            await pilot.press("f12")
            await pilot.pause()
            await pilot.press("y")
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert len(app.query_one("#history").children) == 1
            assert app.is_running

    run(go())


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


def test_attach_by_command_key_and_pasted_path(tiny_ckpt, tmp_path):
    """/file, Ctrl+O and a pasted path attach files to the next message; a bad file is named and
    the typed command stays; the message the model reads holds the files."""
    notes = tmp_path / "notes.txt"
    notes.write_text("remember the milk\n")
    code = tmp_path / "x.py"
    code.write_text("def f(x):\n    return x + 1\n")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            box = app.query_one("#input")
            box.insert(f"/file {bad}")
            await pilot.press("enter")
            await pilot.pause()
            assert box.text == f"/file {bad}" and any("offset 3" in n.message for n in app._notifications)
            box.load_text(f"/file {notes}")
            await pilot.press("enter")
            await pilot.pause()
            assert box.text == "" and [a.name for a in app.attachments] == ["notes.txt"]
            tokens, positions = app.ctl.session.measure("remember the milk\n")
            assert f"notes.txt (18 B, {tokens} tokens, {positions} positions)" in str(app.query_one("#attached").render())
            box.insert(str(code))  # a path pasted alone
            await pilot.press("enter")
            await pilot.pause()
            await pilot.press("ctrl+o")
            await pilot.pause()
            app.screen.query_one("#value").value = str(notes)
            await pilot.press("enter")
            await pilot.pause()
            assert [a.name for a in app.attachments] == ["notes.txt", "x.py", "notes.txt"]
            await say(app, pilot, "What is in these files?")
            assert app.attachments == [] and len(app.query(".attachment")) == 3
            sent = app.ctl.store.messages(app.ctl.conv_id)[0].content
            assert "remember the milk" in sent and "return x + 1" in sent and sent.endswith("What is in these files?")
            assert app.ctl.session.messages[0]["content"] == sent  # what the model read

    run(go())


def test_edit_an_earlier_message_switch_branches_and_copy(tiny_ckpt, tmp_path):
    """Focus a message, e edits it, Enter sends it as a new branch; < and > switch branches, both
    kept across a relaunch; c copies an entry, y a reply's code blocks (the clipboard call observed)."""
    db = tmp_path / "h.db"

    async def go():
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 40), notifications=True) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "first question")
            await say(app, pilot, "second question")
            entries = app.entries()
            assert [type(e).__name__ for e in entries] == ["UserView", "ReplyView"] * 2
            entries[2].focus()
            await pilot.press("e")
            box = app.query_one("#input")
            assert box.text == "second question" and "editing" in str(app.query_one("#status").render())
            box.load_text("second, edited")
            await say(app, pilot, "")
            entries = app.entries()
            assert [e.text for e in entries][::2] == ["first question", "second, edited"] and len(entries) == 4
            assert "2/2" in str(entries[2].render())
            entries[2].focus()
            await pilot.press("less_than_sign")
            await pilot.pause()
            assert [e.text for e in app.entries()][::2] == ["first question", "second question"]
            assert "1/2" in str(app.entries()[2].render()) and app.focused is app.entries()[2]
            await pilot.press("c")
            assert app.clipboard == "second question"
            reply = app.entries()[1]
            reply.units = [["Here:\n```python\nprint(1)\n```\nand\n```\nx = 2\n```", 1]]
            reply.focus()
            await pilot.press("y")
            assert app.clipboard == "print(1)\n\n\nx = 2\n"
            await pilot.press("e")  # replies are not edited: nothing happens
            assert app.editing is None

    run(go())

    async def relaunch():
        app = make_app(tiny_ckpt, db)
        async with app.run_test(size=(110, 40)) as pilot:
            await ready(app, pilot)
            app.open_conversation(app.query_one("#history").children[0].conv_id)
            await pilot.pause()
            assert [e.text for e in app.entries()][::2] == ["first question", "second question"]
            app.entries()[2].focus()
            await pilot.press("greater_than_sign")
            await pilot.pause()
            assert app.entries()[2].text == "second, edited"

    run(relaunch())


def test_search_finds_messages_on_every_branch_and_opens_there(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 36)) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "tell me about zebras")
            await say(app, pilot, "and about giraffes")
            first = app.ctl.conv_id
            app.entries()[2].focus()
            await pilot.press("e")
            app.query_one("#input").load_text("and about elephants")
            await say(app, pilot, "")  # the giraffes are on the other branch now
            await pilot.press("ctrl+n")
            await say(app, pilot, "something else")
            await pilot.press("ctrl+f")
            await pilot.pause()
            app.screen.query_one("#query").insert_text_at_cursor("giraf")
            await pilot.pause()
            assert "1 message" in str(app.screen.query_one("#count").render())
            await pilot.press("enter")
            await pilot.pause()
            assert app.ctl.conv_id == first
            assert [e.text for e in app.entries()][::2] == ["tell me about zebras", "and about giraffes"]
            assert app.focused is app.entries()[2]
            await pilot.press(*"more")  # typed while the message found has the focus: not lost
            assert app.query_one("#input").text == "more" and app.focused is app.query_one("#input")
            await say(app, pilot, "")  # the branch found is the one the model continues
            assert app.ctl.session.messages[2]["content"] == "and about giraffes"

    run(go())


def test_export_all_and_import_in_the_app(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path / "data"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "robot", "content": "x"}]')
    good = tmp_path / "good.json"
    good.write_text('[{"role": "user", "content": "Where is Rome?"}, {"role": "assistant", "content": "Italy."}]')

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "hello")
            await pilot.press("f6")
            await pilot.pause()
            found = list((tmp_path / "data" / "exports").glob("z2z-chat-all-*.jsonl"))
            assert len(found) == 1
            exported = found[0]
            assert '"content": "hello"' in exported.read_text()
            for path, count in ((bad, 1), (good, 2)):
                await pilot.press("f7")
                await pilot.pause()
                app.screen.query_one("#value").value = str(path)
                await pilot.press("enter")
                await pilot.pause()
                await pilot.pause()
                assert len(app.query_one("#history").children) == count
            text = " ".join(n.message for n in app._notifications)
            assert "bad.json: message 1 needs a role" in text and "Imported 1 conversation" in text

    run(go())


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


def test_settings_form_checks_each_field_keeps_the_dialog_open_and_saves_defaults(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            await ready(app, pilot)
            await pilot.press("f8")
            await pilot.pause()
            form = app.screen
            form.query_one("#set-temperature").value = "nan"
            form.query_one("#set-top_k").value = "3"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert app.screen is form and "temperature" in str(form.query_one("#settings-error").render())
            assert form.query_one("#set-top_k").value == "3" and app.focused is form.query_one("#set-temperature")
            form.query_one("#set-temperature").value = "0.7"
            form.query_one("#as-default").value = True
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert app.screen is not form
            g = app.ctl.generation_settings()
            assert g.sampling.temperature == 0.7 and g.sampling.top_k == 3

    run(go())
    args = build_parser().parse_args([])  # the next launch starts from them; a flag still wins
    assert args.temperature == 0.7 and args.top_k == 3
    assert build_parser().parse_args(["--top-k", "9"]).top_k == 9


def test_tab_completes_a_file_path_after_slash_file(tiny_ckpt, tmp_path):
    (tmp_path / "notes-2025.txt").write_text("a")
    (tmp_path / "notes-2026.txt").write_text("b")
    (tmp_path / "src").mkdir()

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            box = app.query_one("#input")
            box.insert(f"/file {tmp_path}/no")
            await pilot.press("tab")
            await pilot.pause()
            assert box.text == f"/file {tmp_path}/notes-202"  # as far as the two files agree
            assert any("notes-2025.txt, notes-2026.txt" in n.message for n in app._notifications)
            box.insert("6")
            await pilot.press("tab")
            assert box.text == f"/file {tmp_path}/notes-2026.txt" and box.has_focus
            box.load_text(f"/file {tmp_path}/s")
            box.move_cursor(box.document.end)
            await pilot.press("tab")
            assert box.text == f"/file {tmp_path}/src/"
            await pilot.press("ctrl+o")  # the dialog suggests the completion; the right arrow takes it
            await pilot.pause()
            field = app.screen.query_one("#value")
            field.insert_text_at_cursor(f"{tmp_path}/notes-2025")
            await pilot.pause(0.2)
            await pilot.press("right")
            assert field.value == f"{tmp_path}/notes-2025.txt"

    run(go())


def test_f9_lists_the_models_opened_before_and_opens_one(tiny_ckpt, trained_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32)) as pilot:
            await ready(app, pilot)
            await pilot.press("f9")
            await pilot.pause()
            field = app.screen.query_one("#value")
            field.value = str(trained_ckpt)  # typed (or completed): opens, and is remembered
            await pilot.press("enter")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.ctl.runtime.model_name == str(trained_ckpt)
            await pilot.press("f9")
            await pilot.pause()
            models = app.screen.query_one("#models")
            assert [str(models.get_option_at_index(i).prompt) for i in range(models.option_count)] == [
                "the embedded default model", str(trained_ckpt), str(tiny_ckpt)]
            models.focus()
            models.highlighted = 2
            await pilot.press("enter")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.ctl.runtime.model_name == str(tiny_ckpt)

    run(go())


def test_a_failed_model_switch_keeps_the_old_model_and_shows_hints_verbatim(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            old = app.ctl.runtime
            app.load_model(str(tmp_path / "typo[torch]"))
            await app.workers.wait_for_complete()
            await pilot.pause()
            failed = [n for n in app._notifications if "Could not load the model" in n.message]
            assert failed and "typo[torch]" in failed[-1].message and failed[-1].markup is False
            assert app.ctl.runtime is old
            status = str(app.query_one("#status").render())
            assert "no model loaded" not in status and "codebook" in status
            await say(app, pilot, "still here?")  # the old model still answers
            assert len(app.ctl.store.messages(app.ctl.conv_id)) == 2

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
                    app.cancel.set()
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


def test_a_chat_list_date_reads_as_a_time_today_and_a_day_before():
    import time as t

    from z2z_chat.app.widgets import when

    now = t.mktime((2026, 12, 2, 15, 0, 0, 0, 0, -1))
    assert when(now - 3600, now) == "14:00"
    assert when(now - 86400 * 3, now) == "29 Nov"
    assert when(t.mktime((2025, 3, 4, 9, 0, 0, 0, 0, -1)), now) == "4 Mar 2025"
    assert when(0, now) == ""


def test_an_edit_too_long_for_the_window_stays_in_the_box(tiny_ckpt, tmp_path):
    """Checked before anything changes: the message box keeps the edit, still an edit, and the
    conversation and its history are as they were."""
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 40), notifications=True) as pilot:
            await ready(app, pilot)
            await say(app, pilot, "first question")
            before, fed = [m.content for m in app.ctl.store.messages(app.ctl.conv_id)], app.ctl.session.fed
            app.entries()[0].focus()
            await pilot.press("e")
            long = " ".join(f"w{i}" for i in range(app.ctl.runtime.model.context_length * 2))
            box = app.query_one("#input")
            box.load_text(long)
            await say(app, pilot, "")
            assert box.text == long and app.editing == 0
            assert [m.content for m in app.ctl.store.messages(app.ctl.conv_id)] == before
            assert len(app.entries()) == 2 and app.ctl.session.fed == fed
            assert [n.message.split(":")[0] for n in app._notifications] == ["Too long"]

    run(go())


def test_a_completed_path_with_spaces_is_quoted_and_attaches(tiny_ckpt, tmp_path):
    d = tmp_path / "my notes"
    d.mkdir()
    (d / "plan.txt").write_text("the plan")

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            box = app.query_one("#input")
            box.insert(f"/file {d}/pl")
            await pilot.press("tab")
            await pilot.pause()
            assert box.text == f"/file '{d}/plan.txt'"
            await pilot.press("enter")
            await pilot.pause()
            assert [a.name for a in app.attachments] == ["plan.txt"]

    run(go())


def test_help_and_unknown_slash_commands_are_answered_not_sent(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            box = app.query_one("#input")
            for typed, said in (("/help", "/file PATH"), ("/summarize", "is not a command")):
                box.load_text(typed)
                await pilot.press("enter")
                await pilot.pause()
                assert any(said in n.message for n in app._notifications), typed
            assert app.ctl.session is None or not app.ctl.session.messages  # nothing reached the model
            assert box.text == "/summarize"  # a mistyped command stays in the input

    run(go())
