"""The messages: editing, branches, copying, search, attachments and slash commands."""

from __future__ import annotations


import pytest

pytest.importorskip("textual")
pytest.importorskip("torch")

from app_pilot import make_app, ready, run, say  # noqa: E402


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


def test_titles_come_from_the_question_and_a_continued_chat_moves_to_the_top(tiny_ckpt, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file whose text is no title at all\n" * 3)

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            app.attach_files([str(notes)])
            await say(app, pilot, "What is in it?")
            first = app.ctl.conv_id
            await pilot.press("ctrl+n")
            await say(app, pilot, "another chat")
            assert [c.title for c in app.ctl.store.conversations()] == ["another chat", "What is in it?"]
            app.open_conversation(first)
            await pilot.pause()
            await say(app, pilot, "and more?")
            await app.workers.wait_for_complete()
            await pilot.pause()
            items = app.query("ConversationItem")
            assert items.first().conv_id == first  # the list follows without a relaunch

    run(go())


def test_pending_attachments_can_be_removed_do_not_carry_to_a_new_chat_and_too_long_is_said(tiny_ckpt, tmp_path):
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("a few words\n")
    big.write_text("word " * 20000)

    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            app.attach_files([str(small), str(big)])
            await pilot.pause()
            assert any("do not fit the context window" in n.message for n in app._notifications)
            box = app.query_one("#input")
            box.load_text("/detach big.txt")
            await pilot.press("enter")
            await pilot.pause()
            assert [a.name for a in app.attachments] == ["small.txt"]
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert app.attachments == [] and not app.query_one("#attached").display

    run(go())
