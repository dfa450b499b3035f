"""The catalog command: a company's product list or market files to the catalog regions name."""

from pathlib import Path

from common.data.catalog import Catalog
from deploy import catalog as command

XMARKET_HEADER = "userId itemId rate date\n"


def test_a_csv_product_list_becomes_a_sorted_catalog_that_loads(tmp_path, capsys):
    # Prepare: a product list with a blank ID and surrounding spaces.
    products = tmp_path / "products.csv"
    products.write_text("sku,name\n B2 ,lamp\nA1,desk\n,unknown\n", encoding="utf-8")

    # Execute
    code = command.main(["--products", str(products), "--column", "sku", "--out", str(tmp_path / "catalog.txt")])

    # Assert
    assert code == 0
    catalog = Catalog.load(tmp_path / "catalog.txt")
    assert catalog.item_ids == ("A1", "B2") and catalog.overflow_rows == 64
    assert "2 products" in capsys.readouterr().out


def test_a_txt_product_list_with_a_header_line_does_not_take_it_for_a_product(tmp_path, capsys):
    # Prepare: one ID a line, the first line naming the column, as exports often have.
    products = tmp_path / "products.txt"
    products.write_text("itemId\nB2\nA1\n", encoding="utf-8")

    # Execute
    code = command.main(["--products", str(products), "--out", str(tmp_path / "catalog.txt")])

    # Assert: the header is no product, and the summary shows what was taken.
    assert code == 0
    assert Catalog.load(tmp_path / "catalog.txt").item_ids == ("A1", "B2")
    assert "2 products ('A1' to 'B2' in catalog order)" in capsys.readouterr().out


def test_market_files_give_the_union_of_their_items(tmp_path):
    # Prepare: two XMarket-format markets sharing item i2.
    files = []
    for market, items in {"de": ["i1", "i2"], "fr": ["i2", "i3"]}.items():
        path = tmp_path / f"{market}.txt"
        path.write_text(XMARKET_HEADER + "".join(f"u{n} {item} 5.0 2020-01-0{n + 1}\n" for n, item in enumerate(items)))
        files.append(str(path))

    # Execute
    code = command.main(
        ["--market-files", ",".join(files), "--out", str(tmp_path / "catalog.txt"), "--overflow-rows", "8"]
    )

    # Assert
    assert code == 0
    catalog = Catalog.load(tmp_path / "catalog.txt")
    assert catalog.item_ids == ("i1", "i2", "i3") and catalog.overflow_rows == 8


def test_an_existing_catalog_is_not_replaced_without_force(tmp_path, capsys):
    # Prepare: a catalog in use.
    out = tmp_path / "catalog.txt"
    Catalog.from_items(["old"]).save(out)
    products = tmp_path / "products.txt"
    products.write_text("new\n", encoding="utf-8")

    # Execute
    refused = command.main(["--products", str(products), "--out", str(out)])
    kept = Catalog.load(out).item_ids
    forced = command.main(["--products", str(products), "--out", str(out), "--force"])

    # Assert: one line on stderr and exit 2; --force replaces it.
    assert refused == 2 and kept == ("old",)
    assert capsys.readouterr().err.count("\n") == 1
    assert forced == 0 and Catalog.load(out).item_ids == ("new",)


def test_a_missing_column_or_file_is_one_line_and_exit_2(tmp_path, capsys):
    # Prepare
    products = tmp_path / "products.csv"
    products.write_text("sku\nA1\n", encoding="utf-8")

    # Execute
    wrong_column = command.main(["--products", str(products), "--out", str(tmp_path / "a.txt")])
    wrong_column_err = capsys.readouterr().err
    missing = command.main(["--products", str(Path(tmp_path / "absent.txt")), "--out", str(tmp_path / "b.txt")])
    missing_err = capsys.readouterr().err

    # Assert
    assert wrong_column == 2 and "no column 'itemId'" in wrong_column_err and wrong_column_err.count("\n") == 1
    assert missing == 2 and "cannot be read" in missing_err and missing_err.count("\n") == 1
    assert not (tmp_path / "a.txt").exists() and not (tmp_path / "b.txt").exists()
