"""The wheel installs one top-level package, ``z2z_chat``, holding every module of the four folders
and the default model's files; nothing named ``app``, ``backends``, ``convert`` or ``train`` lands
at the top of site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("app", "backends", "convert", "train")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("z2z_chat-*.whl")
    return zipfile.ZipFile(whl)


def test_the_wheel_has_one_top_level_package_with_every_module(wheel):
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"z2z_chat"}, tops
    missing = [p.relative_to(ROOT).as_posix() for f in FOLDERS for p in (ROOT / f).rglob("*.py")
               if "recipes" not in p.parts and f"z2z_chat/{p.relative_to(ROOT).as_posix()}" not in names]
    assert not missing, f"modules the wheel lacks (add their package to pyproject.toml): {missing}"
    for data in ("backends/default_model/zip2zip_encoders.safetensors", "backends/default_model/eval/prompts.jsonl",
                 "app/tui/z2z.tcss"):
        assert f"z2z_chat/{data}" in names


def test_the_wheel_installs_the_four_commands(wheel):
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    scripts = wheel.read(meta).decode()
    for cmd in ("z2z-chat = z2z_chat.app.cli:main", "z2z-bench = z2z_chat.app.bench.cli:main",
                "z2z-train = z2z_chat.train.__main__:main", "z2z-convert = z2z_chat.convert.__main__:main"):
        assert cmd in scripts
