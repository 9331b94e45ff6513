"""TemplateCache: byte-bounded LRU in memory, spill to disk (also bounded), prefetch, counters."""

from __future__ import annotations

import torch

from stepfleet.serving.edits.cache import TemplateCache, entry_bytes


def entry(seed: int, n: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.c": torch.randn(2, n, generator=g), "a.k": torch.randn(2, n, generator=g)}


SIZE = entry_bytes(entry(0))  # 4 KiB per entry


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_only_cache_evicts_lru_and_never_exceeds_its_bound():
    with TemplateCache(max_bytes=3 * SIZE, prefetch=False) as c:
        for s in range(3):
            assert c.put("t", s, entry(s))
        c.get("t", 0)  # touch step 0: step 1 is now least recently used
        assert c.put("t", 3, entry(3))
        assert c.bytes_memory == 3 * SIZE
        assert c.get("t", 1) is None and same(c.get("t", 0), entry(0))
        assert c.stats.evictions == 1 and not c.complete("t", 4)
        assert c.stats.hits >= 1 and c.stats.misses == 1
        # Larger than the whole bound, and no disk: refused, nothing grows.
        assert not c.put("big", 0, entry(9, n=4096))
        assert c.stats.refused == 1 and c.bytes_memory <= 3 * SIZE


def test_spill_to_disk_and_back(tmp_path):
    with TemplateCache(
        max_bytes=2 * SIZE, disk_bytes=3 * SIZE + 3000, disk_dir=tmp_path, prefetch=False
    ) as c:
        for s in range(4):
            c.put("t", s, entry(s))
        assert c.bytes_memory == 2 * SIZE
        assert c.stats.spills == 2 and 0 < c.bytes_disk <= c.disk_bytes
        assert len(list(tmp_path.glob("*.safetensors"))) == 2
        assert c.complete("t", 4) and c.steps("t") == {0, 1, 2, 3}
        got = c.get("t", 0)  # a miss: read back from disk, now in memory again
        assert same(got, entry(0)) and c.stats.misses == 1 and c.stats.disk_loads == 1
        assert c.stats.load_seconds > 0 and c.bytes_memory <= 2 * SIZE
        assert c.get("t", 0) is not None and c.stats.hits == 1


def test_disk_is_bounded_too_oldest_goes_first(tmp_path):
    with TemplateCache(
        max_bytes=SIZE, disk_bytes=2 * SIZE + 2000, disk_dir=tmp_path, prefetch=False
    ) as c:
        for s in range(5):
            c.put("t", s, entry(s))
        assert c.bytes_disk <= c.disk_bytes and c.bytes_memory <= SIZE
        assert c.steps("t") == {2, 3, 4}  # 4 in memory, 2 and 3 on disk; 0 and 1 evicted from both
        assert c.stats.evictions == 2 and not c.complete("t", 5)
        assert len(list(tmp_path.glob("*.safetensors"))) == 2
        # An entry too big for memory goes straight to disk, and is still served.
        big = entry(7, n=512)
        assert c.put("u", 0, big) and same(c.get("u", 0), big)
        assert c.bytes_memory <= SIZE and c.bytes_disk <= c.disk_bytes
        assert c.drop("u") == 1 and "u" not in c.templates()


def test_prefetch_loads_the_next_step_in_the_background(tmp_path):
    with TemplateCache(max_bytes=2 * SIZE, disk_bytes=10 * SIZE, disk_dir=tmp_path) as c:
        for s in range(4):
            c.put("t", s, entry(s))
        fut = c.prefetch("t", 0)
        assert fut is not None
        fut.result(timeout=10)
        assert c.stats.prefetches == 1 and c.stats.disk_loads == 1
        assert c.prefetch("t", 0) is None  # already in memory
        assert same(c.get("t", 0), entry(0)) and c.stats.hits == 1 and c.stats.misses == 0
        # An edit walking the steps with prefetch of the next one never misses after the first.
        for s in range(4):
            c.prefetch("t", s + 1)
            assert same(c.get("t", s), entry(s))
        assert c.stats.misses <= 1
        assert c.prefetch("absent", 0) is None


def test_own_spill_directory_is_removed_on_close():
    c = TemplateCache(max_bytes=SIZE, disk_bytes=4 * SIZE)
    c.put("t", 0, entry(0))
    c.put("t", 1, entry(1))
    d = c.disk_dir
    assert d is not None and any(d.iterdir())
    c.close()
    assert not d.exists() and c.bytes_disk == 0
