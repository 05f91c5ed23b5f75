"""The app in a real terminal (tmux): what the Pilot cannot show."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("textual")
pytest.importorskip("torch")

from z2z_chat.app.store import open_store  # noqa: E402
from app_pilot import in_tmux  # noqa: E402


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


def gone(pids: list[int], within: float) -> bool:
    """Every process of ``pids`` has ended within ``within`` seconds."""
    deadline = time.time() + within
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                continue
        if not alive:
            return True
        time.sleep(0.2)
    return False


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
        apps = subprocess.run(["pgrep", "-f", f"z2z_chat.app.cli --model {tiny_ckpt} --max-tokens"],
                              capture_output=True, text=True).stdout.split()
        subprocess.run([*tmux, "kill-server"], capture_output=True)  # the terminal closes: SIGHUP
        assert gone([int(p) for p in apps], 10), "the app outlived its terminal"


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGHUP, 129), (signal.SIGTERM, 143)])
def test_a_signal_while_the_model_loads_ends_the_app_within_seconds(tiny_ckpt, tmp_path, sig, code):
    """A worker thread inside the model (here: a load that takes minutes) kept the app alive after
    the terminal closed; now the process ends within its grace period whatever it is doing."""
    import shutil

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    status, script = tmp_path / "status", tmp_path / "slow.py"
    script.write_text(
        "import sys, time\nimport z2z_chat.backends.runtime as r\n"
        "def slow(*a, **k):\n    time.sleep(600)\n"
        "r.open_runtime = slow\nfrom z2z_chat.app.cli import main\n"
        f"sys.exit(main(['--model', {str(tiny_ckpt)!r}]))\n")
    env = {**os.environ, "Z2Z_DATA_DIR": str(tmp_path), "TERM": "xterm-256color"}
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    subprocess.run([*tmux, "new-session", "-d", "-x", "110", "-y", "30",
                    f"{sys.executable} {script}; echo $? > {status}"], env=env, check=True)
    try:
        deadline = time.time() + 30
        pid = []
        while not pid and time.time() < deadline:
            time.sleep(0.5)
            pid = subprocess.run(["pgrep", "-f", f"^{sys.executable} {script}"], capture_output=True,
                                 text=True).stdout.split()
        assert pid, "the app did not start"
        time.sleep(3.0)  # on screen, loading
        t = time.time()
        os.kill(int(pid[0]), sig)
        while not status.exists() and time.time() - t < 20:
            time.sleep(0.2)
        assert status.exists() and time.time() - t < 10, "the app outlived the signal"
        assert status.read_text().strip() == str(code)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
