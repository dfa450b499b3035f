"""A process cache bounded by the size of what it holds, least recently used out first.

A simulation's Ray worker trains whichever market the engine hands it; a cache of every market
it has prepared grows towards the whole federation in every worker. This one keeps the most
recently used entries while their sizes (a market's training interactions) stay within a budget,
and always the entry just put, however large. ``functools.lru_cache`` bounds the number of
entries, not their size, and does not allow the identity check the callers make (an entry is
rebuilt when its split object changed), hence these few lines.
"""

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class SizedCache(Generic[Value]):
    """Entries under keys, at most ``budget`` in total size apart from the latest entry.

    Parameters
    ----------
    budget : int
        The total size the entries other than the latest may hold (in the caller's unit).
    """

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"A cache's budget is a size of at least 0, not {budget}.")
        self.budget = budget
        self._entries: OrderedDict[Hashable, tuple[Value, int]] = OrderedDict()

    def get(self, key: Hashable) -> Value | None:
        """The entry under ``key`` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, key: Hashable, value: Value, size: int) -> Value:
        """Keep ``value`` under ``key``; the least recently used others go until the rest fit the budget."""
        self._entries.pop(key, None)
        self._entries[key] = (value, size)
        total = sum(size for _, size in self._entries.values())
        while len(self._entries) > 1 and total > self.budget + size:
            _, (_, dropped) = self._entries.popitem(last=False)
            total -= dropped
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
