"""The shared catalog: stable rows, hashed overflow, round trip through a file."""

import pytest

from common.data.catalog import MAX_OVERFLOW_ROWS, Catalog


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


def test_byte_order_mark_does_not_stick_to_the_first_item(tmp_path):
    # Prepare: editors on Windows often start UTF-8 files with a byte-order mark;
    # kept in the first ID, that item would silently hash into the overflow range.
    path = tmp_path / "catalog.txt"
    path.write_bytes("\ufeffa\nb\n".encode("utf-8"))

    # Execute
    catalog = Catalog.load(path)

    # Assert
    assert catalog.item_ids == ("a", "b")
    assert catalog.rows(["a"]).tolist() == [0]


def test_byte_order_mark_does_not_hide_the_header(tmp_path):
    # Prepare: with the mark left in, the header would become an item and the
    # overflow size would silently fall back to the default.
    path = tmp_path / "catalog.txt"
    path.write_bytes("\ufeff# overflow-rows 8\na\n".encode("utf-8"))

    # Execute
    catalog = Catalog.load(path)

    # Assert
    assert catalog == Catalog(("a",), overflow_rows=8)


def test_item_ids_starting_with_hash_survive_a_round_trip(tmp_path):
    # Prepare: '#' is a legal character in a product ID; only the header line
    # that save() writes first is special, so such IDs must not be read as comments.
    catalog = Catalog(("#1", "# overflow-rows 5", "a"), overflow_rows=8)
    path = tmp_path / "catalog.txt"

    # Execute
    catalog.save(path)
    loaded = Catalog.load(path)

    # Assert
    assert loaded == catalog


def test_huge_overflow_range_is_refused(tmp_path):
    # Prepare: 2e9 overflow rows would ask every region for about a terabyte of
    # embeddings; such a header is a typo or an attack, not a catalog.
    path = tmp_path / "catalog.txt"
    path.write_text("# overflow-rows 2000000000\na\n", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(ValueError, match="overflow rows") as caught:
        Catalog.load(path)
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match="overflow rows"):
        Catalog(("a",), overflow_rows=MAX_OVERFLOW_ROWS + 1)


@pytest.mark.parametrize(
    ("content", "error", "problem"),
    [
        (None, FileNotFoundError, "cannot be read"),
        (b"a\n\xff\n", ValueError, "not UTF-8"),
        (b"# overflow-rows many\na\n", ValueError, "header"),
        (b"# overflow-rows 0\na\n", ValueError, "overflow rows"),
        (b"# overflow-rows 4\n", ValueError, "no items"),
        (b"a\nb\na\n", ValueError, "more than once"),
    ],
)
def test_every_load_error_names_the_file(tmp_path, content, error, problem):
    # Prepare: a region operator must know which file to fix; None means no file.
    path = tmp_path / "catalog.txt"
    if content is not None:
        path.write_bytes(content)

    # Execute
    with pytest.raises(error) as caught:
        Catalog.load(path)

    # Assert: one full sentence that names the file and the problem.
    message = str(caught.value)
    assert str(path) in message
    assert problem in message
    assert message[0].isupper() and message.endswith(".")
