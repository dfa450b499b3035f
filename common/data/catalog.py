"""The shared item catalog: item IDs mapped to rows of the shared item table.

The catalog is the company's product list, not personal data. Every market
maps its item IDs through the same catalog so that row ``r`` of the shared
item embedding means the same product everywhere. Items outside the catalog
(new products a region sells before the catalog is refreshed) land in a small
hashed overflow range instead of failing.
"""

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Every region allocates one embedding row per overflow row. A million rows is far
# more than new products between two catalog refreshes, and still a bounded table
# (512 MB at the default 128 float32 dimensions); more is a typo, not a catalog.
MAX_OVERFLOW_ROWS = 1_000_000

# The first line save() writes; only a first line starting like this is not an item.
_HEADER = "# overflow-rows"


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
        if not 1 <= self.overflow_rows <= MAX_OVERFLOW_ROWS:
            raise ValueError(f"The catalog needs 1 to {MAX_OVERFLOW_ROWS:,} overflow rows, got {self.overflow_rows:,}.")
        row_of = {item: row for row, item in enumerate(self.item_ids)}
        if len(row_of) != len(self.item_ids):
            raise ValueError("The catalog lists the same item ID more than once.")
        object.__setattr__(self, "_row_of", row_of)

    @property
    def size(self) -> int:
        """Rows of the shared item table, overflow included."""
        return len(self.item_ids) + self.overflow_rows

    def fingerprint(self) -> str:
        """Its size and a hash of its item IDs in order: equal iff row ``r`` means the same item.

        The same string server checkpoints have always stored for the catalog, so a
        checkpoint written before this method existed still resumes.
        """
        digest = hashlib.sha256()
        for item in self.item_ids:
            digest.update(item.encode("utf-8") + b"\n")
        return f"{len(self.item_ids)} items + {self.overflow_rows} overflow rows, sha256 {digest.hexdigest()[:16]}"

    def rows(self, item_ids: Iterable[str]) -> np.ndarray:
        """Table rows of ``item_ids``; unknown items hash into the overflow range."""
        known = len(self.item_ids)
        return np.fromiter(
            (self._row_of.get(item, known + self._overflow_slot(item)) for item in item_ids),
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
        """Write the header ``# overflow-rows N``, then one item ID per line."""
        Path(path).write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        """The file :meth:`save` writes, as bytes."""
        lines = [f"{_HEADER} {self.overflow_rows}", *self.item_ids]
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Catalog":
        """Read a catalog written by :meth:`save` (or a plain list of item IDs).

        Only a first line starting with ``# overflow-rows`` is a header; every other
        non-blank line is an item ID, even one starting with ``#``. Without a
        header the catalog has 64 overflow rows. A UTF-8 byte-order mark is ignored.

        Raises
        ------
        FileNotFoundError
            If the file cannot be read.
        ValueError
            If it is not UTF-8, its header is malformed or asks for fewer than 1 or
            more than ``MAX_OVERFLOW_ROWS`` overflow rows, or it lists no item or
            one item twice. Every message names the file.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"The catalog {path} cannot be read ({err.strerror or err}).") from err
        try:
            # utf-8-sig: a byte-order mark would otherwise stick to the first line.
            lines = data.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"The catalog {path} is not UTF-8 text (bad byte at offset {err.start}).") from err
        overflow_rows = 64
        first_item_line = 1
        if lines and lines[0].strip().startswith(_HEADER):
            overflow_rows = _parse_header(path, lines[0].strip())
            first_item_line = 2
        line_of: dict[str, int] = {}  # item ID -> 1-based line, in file order
        for number, line in enumerate(lines[first_item_line - 1 :], start=first_item_line):
            if not (item := line.strip()):
                continue
            if item in line_of:
                raise ValueError(
                    f"The catalog {path} lists item ID {item!r} more than once (lines {line_of[item]} and {number})."
                )
            line_of[item] = number
        if not line_of:
            raise ValueError(f"The catalog {path} lists no items.")
        return cls(tuple(line_of), overflow_rows)


def _parse_header(path: Path, header: str) -> int:
    """Overflow rows from the header line ``# overflow-rows N`` of the catalog at ``path``."""
    count = header.removeprefix(_HEADER).strip()
    if not header.startswith(f"{_HEADER} ") or not count.isascii() or not count.isdigit():
        raise ValueError(
            f"The catalog {path} has the malformed header {header!r} on line 1; "
            f"expected '{_HEADER} N' with N a whole number."
        )
    overflow_rows = int(count)
    if not 1 <= overflow_rows <= MAX_OVERFLOW_ROWS:
        raise ValueError(
            f"The catalog {path} asks for {overflow_rows:,} overflow rows; it may have 1 to {MAX_OVERFLOW_ROWS:,}."
        )
    return overflow_rows
