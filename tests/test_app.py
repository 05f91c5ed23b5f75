"""The Textual app against the real engine and torch backend on a tiny random model."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("torch")

from app.cli import build_parser  # noqa: E402
from app.store import open_store  # noqa: E402
from app.tui import ReplyView, Z2ZChat  # noqa: E402


def make_app(ckpt, db: Path, *extra: str) -> Z2ZChat:
    args = build_parser().parse_args(["--model", str(ckpt), "--max-tokens", "12", "--device", "cpu", *extra])
    return Z2ZChat(args, store_path=db)


async def ready(app, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.runtime is not None, "model did not load"


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
            app.open_conversation(int(items[0].id.removeprefix("conv-")))
            await pilot.pause()
            assert app.query(ReplyView).last().text == text
            assert app.session.messages and app.session.messages[-1]["content"] == text  # engine resumed
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
            msgs = app.store.messages(app.conv_id)
            assert msgs[-1].role == "assistant" and msgs[-1].stopped
            assert 0 < len(app.reply.units) < 3000
            await say(app, pilot, "next")
            assert len(app.query(ReplyView)) == 2 and app.store.messages(app.conv_id)[-1].role == "assistant"

    run(go())


def test_new_chat_regenerate_toggle_and_export(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

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
            assert [m.role for m in app.store.messages(app.conv_id)] == ["user", "assistant"]
            view = app.query(ReplyView).last()
            before = view.query_one(".units").display
            await pilot.press("ctrl+t")
            assert view.query_one(".units").display != before and view.coloured
            assert any(s for _, s in view.units if s >= 2) or view.units  # units carry spans
            await pilot.press("f4")
            await pilot.pause()
            assert list(tmp_path.glob("z2z-chat-*.md"))
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert not app.query(ReplyView) and app.conv_id is None and len(app.session.codec) == 0

    run(go())


def test_failing_model_shows_error_and_keeps_history(tiny_ckpt, tmp_path):
    db = tmp_path / "h.db"
    store = open_store(db)
    from app.store import Message

    cid = store.create("old chat", "m", None, {})
    store.add_message(cid, Message("user", "hello"))
    store.close()

    async def go():
        app = make_app(tmp_path / "no-such-model", db)
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.runtime is None
            assert any("Could not load the model" in n.message for n in app._notifications)
            assert len(app.query_one("#history").children) == 1  # the history is still there
            app.query_one("#input").insert("hi")
            await pilot.press("enter")
            await pilot.pause()
            assert any("No model is loaded" in n.message for n in app._notifications)

    run(go())


def test_corrupt_or_locked_database_starts_fresh_and_leaves_the_file(tmp_path):
    bad = tmp_path / "history.db"
    bad.write_bytes(b"this is not a database" * 100)
    store = open_store(bad)
    assert store.warning and "left untouched" in store.warning and store.path != bad
    assert bad.read_bytes().startswith(b"this is not a database")
    store.close()
    good = tmp_path / "locked.db"
    open_store(good).close()
    holder = sqlite3.connect(good)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        s2 = open_store(good)
        assert s2.warning and "locked" in s2.warning
        s2.close()
    finally:
        holder.rollback()
        holder.close()


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
        await pilot.press("f3")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(100, 28), run_before=before)


@pytest.mark.slow
def test_real_terminal_with_tmux(tiny_ckpt, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    sock = str(tmp_path / "tmux.sock")
    env = {**os.environ, "Z2Z_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    cmd = f"{sys.executable} -m app.cli --model {tiny_ckpt} --max-tokens 8 --device cpu"
    tmux = ["tmux", "-S", sock]
    subprocess.run([*tmux, "new-session", "-d", "-x", "110", "-y", "30", cmd], env=env, check=True,
                   cwd=Path(__file__).resolve().parents[1])

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout

    try:
        deadline = time.time() + 90
        while "codebook" not in screen() and time.time() < deadline:
            time.sleep(0.5)
        assert "codebook" in screen(), screen()
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
