"""What the app runs with, typed and built once from the command line (``AppOptions.from_args``).

The chat UI, its controller and one-shot mode read these fields; nothing in the app goes back to
the argparse ``Namespace`` or imports ``cli``. ``settings`` are the ones a conversation keeps
and the user changes in the app (``SETTING_KEYS``); ``generation()`` turns them into the
engine's ``GenerationSettings``, which validates them (``SettingsError``) the same way whether
they came from the command line or from the app. ``save_defaults``/``load_defaults`` keep the
settings a user saves in the app (F8) for the next launches, as the command line's defaults.
"""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETTING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "lookahead")


@dataclass
class AppOptions:
    model: str | None = None
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    base: str | None = None
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=lambda: {
        "max_tokens": 512, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "lookahead": 0})
    seed: int | None = None
    hyper_margin: float | None = None
    hyper_batch: int = 1

    @classmethod
    def from_args(cls, a: Namespace) -> AppOptions:
        return cls(a.model, a.backend, a.device, a.dtype, a.base, a.system,
                   {k: getattr(a, k) for k in SETTING_KEYS}, a.seed, a.hyper_margin, a.hyper_batch)

    def generation(self, settings: dict[str, Any] | None = None) -> Any:
        """``GenerationSettings`` from ``settings`` (default: these options' own)."""
        from backends.engine import GenerationSettings
        from backends.sampling import SamplingSettings

        s = self.settings if settings is None else settings
        return GenerationSettings(s["max_tokens"], SamplingSettings(
            temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
            repetition_penalty=s["repetition_penalty"], seed=self.seed), s["lookahead"],
            hyper_margin=self.hyper_margin, hyper_batch=self.hyper_batch)


def defaults_path() -> Path:
    from .store import default_path

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
    return {k: v for k, v in saved.items() if k in SETTING_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def save_defaults(settings: dict[str, Any]) -> Path:
    path = defaults_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: settings[k] for k in SETTING_KEYS}, indent=2), encoding="utf-8")
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
