"""``backends/engine/kv_store.py``: conversations' KV caches on disk are checked before use and kept to a budget."""

from __future__ import annotations

import os

from z2z_chat.backends.engine.kv_store import SavedKV, codes_digest
from z2z_chat.backends.engine.kv_store import KVStore


def snap(n: int, size: int = 1000) -> SavedKV:
    return SavedKV(bytes(range(256)) * (size // 256) + b"x" * (size % 256), n, codes_digest(range(n)))


def test_a_saved_cache_comes_back_for_the_same_model_only(tmp_path):
    s = KVStore(tmp_path, "llamacpp|abc|8192")
    s.save("conv-1", snap(7))
    assert s.load("conv-1") == snap(7)
    assert s.load("conv-2") is None
    assert KVStore(tmp_path, "llamacpp|other|8192").load("conv-1") is None
    assert not s.path("conv-1").exists()  # a file for another model is removed, not kept forever


def test_a_damaged_cache_file_is_dropped(tmp_path):
    s = KVStore(tmp_path, "m")
    for damage in (lambda b: b[:-10], lambda b: b[:20], lambda b: b"not json\n" + b[40:],
                   lambda b: b.replace(b"\x10\x11\x12", b"\x00\x00\x00", 1)):
        s.save("c", snap(3))
        p = s.path("c")
        p.write_bytes(damage(p.read_bytes()))
        assert s.load("c") is None and not p.exists()


def test_the_directory_keeps_to_its_budget_dropping_the_least_recently_used(tmp_path):
    s = KVStore(tmp_path, "m", budget=4000)
    for i in range(3):
        s.save(f"c{i}", snap(i + 1))
        os.utime(s.path(f"c{i}"), (1000 + i, 1000 + i))
    assert s.load("c0") is not None  # used now: c1 becomes the least recently used
    s.save("c3", snap(4))
    assert [s.path(f"c{i}").exists() for i in range(4)] == [True, False, True, True]
    s.save("big", snap(1, size=10_000))  # larger than the whole budget: not kept
    assert not s.path("big").exists()
