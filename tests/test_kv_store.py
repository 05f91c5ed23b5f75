"""``backends/engine/kv_store.py``: conversations' KV caches on disk are checked before use and kept to a budget."""

from __future__ import annotations

import os

from z2z_chat.backends.engine.kv_store import KVStore, SavedKV, codes_digest


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


# --- faults: a cache is an optimisation, every failure means "read the conversation again" ------

def test_a_directory_where_the_file_should_be_is_refused_not_raised(tmp_path):
    s = KVStore(tmp_path, "m")
    s.path("c").mkdir(parents=True)
    assert s.load("c") is None
    assert s.save("c", snap(3)) is not None  # cannot replace a directory: a reason, no exception


def test_a_symlink_to_a_device_is_never_read(tmp_path):
    s = KVStore(tmp_path, "m")
    tmp_path.mkdir(exist_ok=True)
    s.path("c").symlink_to("/dev/zero")  # an unbounded read would fill the memory
    assert s.load("c") is None


def test_a_header_without_an_end_is_refused_without_reading_it_all(tmp_path):
    s = KVStore(tmp_path, "m", budget=1 << 20)
    s.path("c").parent.mkdir(parents=True, exist_ok=True)
    s.path("c").write_bytes(b"{" + b" " * (2 << 20))
    assert s.load("c") is None


def test_saves_of_several_writers_do_not_share_a_temporary_file(tmp_path):
    import threading

    s = KVStore(tmp_path, "m")
    errors = []

    def write(i: int) -> None:
        for _ in range(20):
            why = s.save("same", snap(i + 1, size=20_000))
            if why:
                errors.append(why)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.load("same") is not None
    assert not list(tmp_path.glob("*.tmp"))


def test_a_file_removed_by_another_process_while_loading_is_not_an_error(tmp_path, monkeypatch):
    s = KVStore(tmp_path, "m")
    s.save("c", snap(3))
    real = os.utime

    def gone(path, *a, **k):
        os.unlink(path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "utime", gone)
    assert s.load("c") is not None


def test_temporary_files_a_crash_left_are_removed_by_the_next_save(tmp_path):
    s = KVStore(tmp_path, "m")
    stale = tmp_path / "abc.123.tmp"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (1000, 1000))
    s.save("c", snap(3))
    assert not stale.exists()


def test_meta_and_entries_come_back(tmp_path):
    s = KVStore(tmp_path, "m")
    kv = SavedKV(b"abc", 1, codes_digest([5]), {"messages": [{"role": "user", "content": "hi"}]})
    assert s.save("conv-1", kv) is None
    assert s.load("conv-1").meta == kv.meta
    assert dict(s.entries()) == {"conv-1": kv.meta}
    assert list(KVStore(tmp_path, "other model").entries()) == []
