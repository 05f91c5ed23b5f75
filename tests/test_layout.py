"""The layout's rules: the README's table names every module (or its folder) and nothing that is
gone; no import cycle; the library imports no program; the framework packages import no runtime;
no two classes share a name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_layout_lists_every_core_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Layout"):]
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

    mods = {name(p): p for pkg in ("app", "backends", "convert", "train") for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("z2z_chat.") for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = (node.module or "").removeprefix("z2z_chat.")
                if node.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def test_no_import_cycles_and_the_library_imports_no_program():
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
            bad = graph[m] & {"backends.runtime"}
            assert not bad, f"{m} imports {bad}"
    programs = ("app", "convert", "train")
    bad = sorted(f"{m} -> {d}" for m in graph if m.startswith("backends") for d in graph[m] if d.startswith(programs))
    assert not bad, f"the library imports a program: {bad}"
    assert graph["backends.engine.session"], "the import graph is empty: the parser no longer sees the imports"


def test_no_two_classes_share_a_name():
    import ast

    where: dict[str, list[str]] = {}
    for pkg in ("app", "backends", "convert", "train"):
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    where.setdefault(node.name, []).append(p.relative_to(ROOT).as_posix())
    shared = {k: v for k, v in where.items() if len(v) > 1}
    assert not shared, f"classes that share a name: {shared}"
