"""The one base class of the errors z2z-chat raises on purpose.

Every ``Z2ZError`` carries a message that says what went wrong, with which file or setting, and
what to do next. Entry points (``z2z-chat``, ``z2z-bench``, ``z2z-train``, the app) catch
``Z2ZError`` and print that one line; any other exception is a bug and keeps its traceback.
Subclasses also derive from the builtin they used to be (``ValueError``, ``RuntimeError``) so
callers that catch those keep working.
"""

from __future__ import annotations


class Z2ZError(Exception):
    """An expected failure with a message for the user."""


class SettingsError(Z2ZError, ValueError):
    """A generation or sampling setting is out of range (NaN, negative, ...)."""


class BackendError(Z2ZError, RuntimeError):
    """A backend was asked for something that cannot exist (a code without an entry, a slot id out
    of range) or failed at run time."""
