"""What the app runs with, typed and built once from the command line (``AppOptions.from_args``),
and the command lines' shared flags.

The generation settings are the table in ``backends/engine/settings.py``: ``add_setting_args``
makes one flag per row (its type, bounds, default and help), ``add_model_args`` the flags that
pick a model (the same in ``z2z-chat``, ``z2z-chat serve`` and ``z2z-bench``). ``settings`` are
the rows a conversation keeps and the user changes in the app (F8); ``launch`` the others (the
decoding policy). ``generation()`` turns them into the engine's ``GenerationSettings``.
``save_defaults``/``load_defaults`` keep the settings a user saves in the app (F8) for the next
launches, as the command line's defaults.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from z2z_chat.backends.engine.settings import CHAT_KEYS, SETTINGS, TABLE, Value, defaults
from z2z_chat.backends.errors import SettingsError

BACKEND_CHOICES = ("auto", "torch", "mlx", "llamacpp")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line (what was wrong, and where to read more), not the
    whole usage block first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --base, --backend, --device, --dtype: which model runs, and where."""
    p.add_argument("--model", help="zip2zip checkpoint: a directory, a Hugging Face repo id or an MLX or GGUF "
                                   "conversion (default: the embedded zip2zip SmolLM2-135M-Instruct)")
    p.add_argument("--base", help="override the checkpoint's base model (HF dir, repo id or .gguf)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)


def _flag_type(name: str):
    def parse(text: str) -> Value:
        try:
            return TABLE[name].parse(text)
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def add_setting_args(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One flag per generation setting (all of them, or ``names``), from the settings table."""
    for s in SETTINGS:
        if names is None or s.name in names:
            metavar = ("N" if s.kind is int else "X") + ("|off" if s.can_be_off else "")
            p.add_argument(s.flag, type=_flag_type(s.name), default=s.default, metavar=metavar,
                           help=f"{s.help} ({s.range_text()}; default {'off' if s.default is None else s.default})")


@dataclass
class AppOptions:
    model: str | None = None
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    base: str | None = None
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=lambda: {k: v for k, v in defaults().items() if k in CHAT_KEYS})
    launch: dict[str, Any] = field(default_factory=lambda: {k: v for k, v in defaults().items()
                                                            if k not in CHAT_KEYS})

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> AppOptions:
        values = {s.name: getattr(a, s.name) for s in SETTINGS}
        return cls(a.model, a.backend, a.device, a.dtype, a.base, a.system,
                   {k: v for k, v in values.items() if k in CHAT_KEYS},
                   {k: v for k, v in values.items() if k not in CHAT_KEYS})

    def generation(self, settings: dict[str, Any] | None = None) -> Any:
        """``GenerationSettings`` from ``settings`` (default: these options' own)."""
        from z2z_chat.backends.engine.events import GenerationSettings

        return GenerationSettings.from_values(self.launch | (self.settings if settings is None else settings))


def defaults_path() -> Path:
    from z2z_chat.app.store import default_path

    return default_path().parent / "settings.json"


def load_defaults() -> dict[str, Any]:
    """Settings saved as defaults in the app (F8): the command line's defaults, so a flag typed
    there still wins. A damaged file is ignored (the built-in defaults apply)."""
    try:
        saved = json.loads(defaults_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    good = {}
    for k in set(CHAT_KEYS) & saved.keys():
        try:
            good[k] = TABLE[k].check(saved[k])
        except SettingsError:
            continue  # a bad value costs that value only: the table's default applies
    return good


def save_defaults(settings: dict[str, Any]) -> Path:
    path = defaults_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: settings[k] for k in CHAT_KEYS}, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


def recent_models() -> list[str]:
    """Models opened before (newest first; "" is the embedded default), for F9's list."""
    try:
        saved = json.loads((defaults_path().parent / "recent-models.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [m for m in saved if isinstance(m, str)][:10] if isinstance(saved, list) else []


def remember_model(model: str | None) -> None:
    path = defaults_path().parent / "recent-models.json"
    models = [model or ""] + [m for m in recent_models() if m != (model or "")]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(models[:10]), encoding="utf-8")
    except OSError:  # a list of conveniences: not worth an error when the disk refuses it
        pass
