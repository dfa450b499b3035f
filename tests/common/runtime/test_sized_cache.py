"""The size-bounded process cache."""

import pytest

from common.runtime.sized_cache import SizedCache


def test_the_least_recently_used_go_until_the_others_fit_the_budget():
    # Prepare: a budget of 10 besides the latest entry
    cache = SizedCache[str](10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 5)
    assert cache.get("a") == "A"  # a is now more recent than b

    # Execute: c (size 3) leaves a budget of 10 for a (4) and b (5): both stay; d (size 20) then
    # leaves 10 for c (3), a (4), b (5) = 12: b, the least recently used, goes
    cache.put("c", "C", 3)
    kept_after_c = len(cache)
    cache.put("d", "D", 20)

    # Assert
    assert kept_after_c == 3
    assert cache.get("b") is None
    assert [cache.get(key) for key in ("a", "c", "d")] == ["A", "C", "D"]


def test_the_latest_entry_stays_however_large():
    # Prepare
    cache = SizedCache[int](0)
    cache.put("small", 1, 1)

    # Execute
    cache.put("huge", 2, 10**9)

    # Assert
    assert len(cache) == 1 and cache.get("huge") == 2 and cache.get("small") is None


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="at least 0"):
        SizedCache(-1)
