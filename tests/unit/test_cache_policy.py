"""The L1 policy with a controllable clock: TTLs, hot keys, both bounds, scan resistance."""

from cache.policy import FrequencySketch, TinyLfuCache
from tests.clock import Clock


def test_expired_entries_are_never_returned():
    clock = Clock(1000.0)
    cache = TinyLfuCache(100, timer=clock)
    cache.set("k", "v", ttl_s=10)
    clock.now += 9.9
    assert cache.get("k") == "v"
    clock.now += 0.2
    assert cache.get("k") is None
    assert "k" not in cache and cache.expirations == 1 and len(cache) == 0


def test_hot_keys_live_longer():
    clock = Clock(1000.0)
    cache = TinyLfuCache(100, hot_after_hits=10, hot_ttl_factor=5, timer=clock)
    cache.set("hot", 1, ttl_s=10)
    cache.set("cold", 2, ttl_s=10)
    for _ in range(10):
        assert cache.get("hot") == 1
    clock.now += 30  # past the plain TTL, inside 5 x 10 s
    assert cache.get("cold") is None
    assert cache.get("hot") == 1
    clock.now += 21  # past 50 s from creation
    assert cache.get("hot") is None


def test_byte_bound_evicts_until_under_it():
    cache = TinyLfuCache(1000, max_bytes=1000, timer=Clock(1000.0))
    for i in range(30):
        cache.set(i, b"x", ttl_s=60, size=100)
        assert cache.bytes <= 1000
    assert len(cache) == 10 and cache.evictions == 20


def test_entry_bound():
    cache = TinyLfuCache(50, timer=Clock(1000.0))
    for i in range(500):
        cache.set(i, i, ttl_s=60)
    assert len(cache) <= 50


def test_replacing_a_key_keeps_one_copy_and_the_byte_count():
    cache = TinyLfuCache(10, timer=Clock(1000.0))
    cache.set("k", "a", ttl_s=60, size=5)
    cache.set("k", "b", ttl_s=60, size=7)
    assert cache.get("k") == "b" and len(cache) == 1 and cache.bytes == 7
    assert cache.delete("k") and cache.bytes == 0 and not cache.delete("k")


def test_a_scan_of_one_off_keys_does_not_flush_hot_keys():
    """Frequency counts: LRU would lose every hot key to a long scan; W-TinyLFU keeps them."""
    cache = TinyLfuCache(100, timer=Clock(1000.0))
    hot = [f"hot{i}" for i in range(50)]
    for _ in range(5):
        for key in hot:
            if cache.get(key) is None:
                cache.set(key, key, ttl_s=1e9)
    for i in range(10_000):
        key = f"scan{i}"
        if cache.get(key) is None:
            cache.set(key, key, ttl_s=1e9)
    assert sum(cache.get(key) is not None for key in hot) >= 45


def test_recency_counts_too_new_keys_get_a_window():
    cache = TinyLfuCache(100, timer=Clock(1000.0))
    cache.set("fresh", 1, ttl_s=60)
    assert cache.get("fresh") == 1  # just-inserted keys are served before they prove themselves


def test_frequency_sketch_counts_and_ages():
    sketch = FrequencySketch(sample_size=1000)
    for _ in range(7):
        sketch.increment("a")
    sketch.increment("b")
    assert sketch.frequency("a") >= 7 and sketch.frequency("b") >= 1
    assert sketch.frequency("a") > sketch.frequency("b")
    for i in range(1000):  # a full sample of other keys halves every counter
        sketch.increment(("other", i))
    assert sketch.frequency("a") <= 4
