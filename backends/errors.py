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


class CheckpointError(Z2ZError, RuntimeError):
    """A checkpoint or its base model cannot be opened; the message names the file."""


class ConvertError(Z2ZError, RuntimeError):
    """A checkpoint cannot be converted (to GGUF or MLX); the message says why."""


# which extra of z2z-chat installs a module an entry point may find missing
EXTRA_OF = {"torch": "torch", "transformers": "torch", "peft": "torch", "safetensors": "torch",
            "huggingface_hub": "torch", "mlx": "mlx", "mlx_lm": "mlx", "accelerate": "train",
            "datasets": "train", "yaml": "train", "gguf": "llamacpp", "llama_cpp": "llamacpp",
            "textual": "app", "starlette": "serve", "uvicorn": "serve"}


def needs_extra(e: ModuleNotFoundError, what: str, extras: str) -> Z2ZError:
    """The one-line error for a missing optional package (or ``e`` itself, re-raised by the caller,
    when the module is not one of ours to install: that is a bug, not a setup step)."""
    top = (e.name or "").partition(".")[0]
    if top not in EXTRA_OF:
        raise e
    torch_note = (" (on a machine without a GPU, pip install torch==2.13.0 first for a CPU build)"
                  if "torch" in extras or "train" in extras else "")
    return Z2ZError(f"{what} needs {top}, which is not installed: pip install \"z2z-chat[{extras}]\" "
                    f"(from a checkout: pip install -e \".[{extras}]\"){torch_note}")
