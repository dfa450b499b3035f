"""The shared item catalog: item IDs mapped to rows of the shared item table.

The catalog is the company's product list, not personal data. Every market
maps its item IDs through the same catalog so that row ``r`` of the shared
item embedding means the same product everywhere. Items outside the catalog
(new products a region sells before the catalog is refreshed) land in a small
hashed overflow range instead of failing.
"""

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Catalog:
    """Item IDs in a fixed order plus a hashed overflow range.

    Parameters
    ----------
    item_ids : tuple[str, ...]
        Known items; item ``item_ids[r]`` is row ``r`` of the shared item table.
    overflow_rows : int
        Rows after the known items shared by unknown items through a stable hash.
    """

    item_ids: tuple[str, ...]
    overflow_rows: int = 64
    _row_of: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.overflow_rows < 1:
            raise ValueError(
                f"The catalog needs at least one overflow row, got {self.overflow_rows}."
            )
        row_of = {item: row for row, item in enumerate(self.item_ids)}
        if len(row_of) != len(self.item_ids):
            raise ValueError("The catalog lists the same item ID more than once.")
        object.__setattr__(self, "_row_of", row_of)

    @property
    def size(self) -> int:
        """Rows of the shared item table, overflow included."""
        return len(self.item_ids) + self.overflow_rows

    def rows(self, item_ids: Iterable[str]) -> np.ndarray:
        """Table rows of ``item_ids``; unknown items hash into the overflow range."""
        known = len(self.item_ids)
        return np.fromiter(
            (
                self._row_of.get(item, known + self._overflow_slot(item))
                for item in item_ids
            ),
            dtype=np.int64,
        )

    def _overflow_slot(self, item: str) -> int:
        # crc32, unlike hash(), is the same in every process and every region.
        return zlib.crc32(item.encode("utf-8")) % self.overflow_rows

    @classmethod
    def from_items(cls, items: Iterable[str], overflow_rows: int = 64) -> "Catalog":
        """Catalog of the distinct ``items`` in sorted order."""
        return cls(tuple(sorted(set(items))), overflow_rows)

    def save(self, path: str | Path) -> None:
        """Write one item ID per line, the overflow size in a header comment."""
        lines = [f"# overflow-rows {self.overflow_rows}", *self.item_ids]
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Catalog":
        """Read a catalog written by :meth:`save` (or a plain list of item IDs)."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise FileNotFoundError(f"{path}: cannot read the catalog ({err}).") from err
        overflow_rows = 64
        items: list[str] = []
        for line in lines:
            line = line.strip()
            if line.startswith("# overflow-rows"):
                overflow_rows = int(line.split()[-1])
            elif line and not line.startswith("#"):
                items.append(line)
        if not items:
            raise ValueError(f"{path}: the catalog lists no items.")
        return cls(tuple(items), overflow_rows)
