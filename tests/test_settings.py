"""``backends/engine/settings.py``: one table of the generation settings, read by every place that
takes one. Changing a bound in the table changes the command line, the F8 form's parsing, the saved
defaults and the server's request checks together."""

from __future__ import annotations

import dataclasses
import json

import pytest

from z2z_chat.backends.engine import settings as table
from z2z_chat.backends.errors import SettingsError


@pytest.fixture
def lookahead_up_to_3(monkeypatch):
    """The table with lookahead's upper bound lowered from 8 to 3."""
    new = dataclasses.replace(table.TABLE["lookahead"], hi=3)
    monkeypatch.setitem(table.TABLE, "lookahead", new)
    monkeypatch.setattr(table, "SETTINGS", tuple(new if s.name == "lookahead" else s for s in table.SETTINGS))
    return new


def test_one_bound_changed_in_the_table_is_seen_everywhere(lookahead_up_to_3, tmp_path, monkeypatch):
    from z2z_chat.app.cli import build_parser
    from z2z_chat.app.options import load_defaults
    from z2z_chat.backends.engine.events import GenerationSettings

    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path))
    # the command line
    assert build_parser().parse_args(["--lookahead", "3"]).lookahead == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lookahead", "4"])
    # the F8 form and /settings parse through the table; the engine checks by it
    assert table.TABLE["lookahead"].parse("3") == 3
    with pytest.raises(SettingsError, match=r"lookahead must be an integer in \[0, 3\]"):
        table.TABLE["lookahead"].parse("4")
    with pytest.raises(SettingsError):
        GenerationSettings(lookahead=4)
    # the saved defaults: a value the table no longer allows is dropped
    (tmp_path / "settings.json").write_text(json.dumps({"lookahead": 4, "top_k": 5}))
    assert load_defaults() == {"top_k": 5}
    # the server's request checks
    pytest.importorskip("starlette")
    from z2z_chat.app.server.openai_shapes import APIError, parse_request

    msgs = [{"role": "user", "content": "hi"}]
    assert parse_request({"messages": msgs, "lookahead": 3}, "m").settings == {"lookahead": 3}
    with pytest.raises(APIError, match=r"\[0, 3\]"):
        parse_request({"messages": msgs, "lookahead": 4}, "m")


def test_every_setting_has_a_flag_a_default_in_range_and_help(tmp_path, monkeypatch):
    from z2z_chat.app.cli import build_parser

    monkeypatch.setenv("Z2Z_DATA_DIR", str(tmp_path))  # no defaults saved by other tests
    flags = {a.dest: a for a in build_parser()._actions}
    for s in table.SETTINGS:
        assert s.name in flags and s.help, s.name
        assert s.default is None and s.can_be_off or s.check(s.default) == s.default
        assert flags[s.name].default == s.default
