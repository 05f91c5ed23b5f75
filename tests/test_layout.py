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


def imports() -> dict[str, set[str]]:
    """Every module of app/ and backends/ -> the modules of app/ and backends/ it imports, anywhere
    in its body (a lazy import inside a function counts: it is a dependency all the same)."""
    import ast

    def name(p: Path) -> str:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name(p): p for pkg in ("app", "backends") for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def test_no_import_cycles_and_backends_import_no_runtime_or_converter():
    graph = imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for d in graph[m] - seen:
                if d == goal:
                    return True
                seen.add(d)
                todo.append(d)
        return False

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"
    for backend in ("backends.torch_backend", "backends.llamacpp_backend", "backends.mlx_backend"):
        for m in (m for m in graph if m.startswith(backend)):
            bad = graph[m] & {"backends.runtime", "backends.gguf_convert", "backends.mlx_convert"}
            assert not bad, f"{m} imports {bad}"
    assert not any(d.startswith("app") for m in graph if m.startswith("backends") for d in graph[m])
