"""The README's layout table names every module of the core, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_layout_lists_every_core_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Layout"):readme.index("## Training")]
    named = set(re.findall(r"`([\w/.]+)`", table))
    listed_dirs = {n.rstrip("/") for n in named if n.endswith("/")}
    missing = []
    for pkg in ("backends", "app", "convert", "train"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if f.name in ("__init__.py", "__main__.py") or rel in named:
                continue
            if any(rel.startswith(d + "/") for d in listed_dirs):
                continue
            missing.append(rel)
    assert not missing, f"README layout table does not name {missing}"
    gone = [n for n in named if "/" in n and not n.startswith("tests") and not (ROOT / n.rstrip("/")).exists()]
    assert not gone, f"README layout table names paths that do not exist: {gone}"
