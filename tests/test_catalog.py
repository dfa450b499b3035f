"""The shared catalog: stable rows, hashed overflow, round trip through a file."""

import pytest

from common.catalog import Catalog


def test_known_items_map_to_their_rows_and_unknown_ones_to_overflow():
    catalog = Catalog(("a", "b", "c"), overflow_rows=4)

    rows = catalog.rows(["c", "a", "new-item", "new-item"])

    assert rows[:2].tolist() == [2, 0]
    assert 3 <= rows[2] < 7
    assert rows[2] == rows[3]
    assert catalog.size == 7


def test_catalog_round_trips_through_its_file(tmp_path):
    catalog = Catalog.from_items(["z", "y", "z", "x"], overflow_rows=8)
    path = tmp_path / "catalog.txt"

    catalog.save(path)
    loaded = Catalog.load(path)

    assert loaded == catalog
    assert loaded.item_ids == ("x", "y", "z")


def test_catalog_refuses_duplicates_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        Catalog(("a", "a"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# overflow-rows 4\n")
    with pytest.raises(ValueError, match="no items"):
        Catalog.load(empty)
