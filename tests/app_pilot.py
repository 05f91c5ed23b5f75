"""What the app tests share: an app on a tiny model, waiting for it, typing into it, a real terminal."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from z2z_chat.app.cli import build_parser
from z2z_chat.app.options import AppOptions
from z2z_chat.app.tui import Z2ZChat


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
