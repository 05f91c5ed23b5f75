"""The dialogs and the chat list: settings (F8), models (F9), export and import, rename and delete."""

from __future__ import annotations


import pytest

pytest.importorskip("textual")
pytest.importorskip("torch")

from z2z_chat.app.cli import build_parser  # noqa: E402
from app_pilot import make_app, ready, run, say  # noqa: E402


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


def test_settings_form_checks_each_field_keeps_the_dialog_open_and_saves_defaults(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path / "data"))  # the defaults it saves are not the next tests'

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


def test_a_chat_list_date_reads_as_a_time_today_and_a_day_before():
    import time as t

    from z2z_chat.app.widgets import when

    now = t.mktime((2026, 12, 2, 15, 0, 0, 0, 0, -1))
    assert when(now - 3600, now) == "14:00"
    assert when(now - 86400 * 3, now) == "29 Nov"
    assert when(t.mktime((2025, 3, 4, 9, 0, 0, 0, 0, -1)), now) == "4 Mar 2025"
    assert when(0, now) == ""


def test_f9_arrow_keys_reach_the_list_of_models(tiny_ckpt, tmp_path):
    async def go():
        app = make_app(tiny_ckpt, tmp_path / "h.db")
        async with app.run_test(size=(110, 32), notifications=True) as pilot:
            await ready(app, pilot)
            await pilot.press("f9")
            await pilot.pause()
            models = app.screen.query_one("#models")
            await pilot.press("down")
            await pilot.pause()
            assert models.has_focus and models.highlighted == 0
            await pilot.press("escape")

    run(go())
