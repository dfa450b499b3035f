"""Write the company catalog every region and the server name with ``catalog-path``.

    python -m deploy.catalog --products products.csv --out catalog.txt
    python -m deploy.catalog --market-files de.txt,fr.txt,uk.txt --out catalog.txt

The catalog is the company's product list, not personal data: row ``r`` of the shared item
table means the same product in every market. Build it from the product list (one ID per
line in a ``.txt`` file, whose first line is skipped when it is the ``--column`` name, a
header; or a column of a ``.csv`` or ``.parquet`` file), or, where the
company has no list at hand, from market interaction files on one machine that may read
them all (the item IDs only). Products a region sells after the catalog was written land
in the catalog's overflow rows and still train.

An existing catalog is never replaced without ``--force``: a server and regions that name
different catalogs refuse to train together, and a model trained on one catalog does not
load with another.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from common.data.catalog import MAX_OVERFLOW_ROWS, Catalog
from common.data.interactions import read_interactions
from common.runtime.command import ArgumentParser


def product_ids(path: Path, column: str) -> list[str]:
    """The product IDs a product list holds, in file order; a ``.txt`` file's first line ``column`` is a header.

    Raises
    ------
    ValueError
        If the file cannot be read, has no column ``column`` (CSV, Parquet), or lists no product.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            ids = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
            ids = ids[1:] if ids and ids[0] == column else ids  # a header line naming the ID column is no product
        elif suffix in (".csv", ".parquet"):
            table = pd.read_csv(path, dtype=str) if suffix == ".csv" else pd.read_parquet(path)
            if column not in table.columns:
                raise ValueError(f"The product list {path} has no column '{column}'; it has {list(table.columns)}.")
            ids = table[column].dropna().astype(str).str.strip().tolist()
        else:
            raise ValueError(f"The product list {path} is not .txt, .csv or .parquet.")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise ValueError(f"The product list {path} cannot be read ({error}).") from error
    ids = [item for item in ids if item]
    if not ids:
        raise ValueError(f"The product list {path} lists no product.")
    return ids


def build_catalog(products: Path | None, market_files: list[Path], column: str, overflow_rows: int) -> Catalog:
    """The catalog of the product list, or of the items in the market files.

    Raises
    ------
    ValueError
        If both or neither source is given, or a source cannot be read.
    """
    if (products is None) == (not market_files):
        raise ValueError("Give either --products or --market-files.")
    if products is not None:
        items = product_ids(products, column)
    else:
        items = [item for path in market_files for item in read_interactions(path)["item"]]
    return Catalog.from_items(items, overflow_rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = ArgumentParser(
        prog="python -m deploy.catalog", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--products",
        type=Path,
        default=None,
        help="the company's product list: .txt (one ID per line), .csv or .parquet (default: none)",
    )
    parser.add_argument(
        "--column", default="itemId", help="the product list's ID column, for .csv and .parquet (default: %(default)s)"
    )
    parser.add_argument(
        "--market-files",
        default="",
        help="comma-separated market interaction files whose item IDs form the catalog (default: none)",
    )
    parser.add_argument(
        "--overflow-rows",
        type=int,
        default=64,
        help=f"rows shared by products not in the catalog, 1 to {MAX_OVERFLOW_ROWS:,} (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the catalog file to write (required)")
    parser.add_argument("--force", action="store_true", help="replace an existing catalog file (default: off)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the catalog; 0 on success, 2 with one line on stderr for a user error."""
    args = parse_args(argv)
    if args.out.exists() and not args.force:
        print(
            f"error: {args.out} exists; a catalog in use must not change under the regions (--force replaces it)",
            file=sys.stderr,
        )
        return 2
    market_files = [Path(name.strip()) for name in args.market_files.split(",") if name.strip()]
    try:
        catalog = build_catalog(args.products, market_files, args.column, args.overflow_rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        catalog.save(args.out)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    first, last = catalog.item_ids[0], catalog.item_ids[-1]
    print(
        f"Wrote {args.out}: {len(catalog.item_ids):,} products ('{first}' to '{last}' in catalog order) and "
        f"{catalog.overflow_rows} overflow rows ({catalog.fingerprint()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
