"""Scores of candidate (user, item) pairs from a market's served model.

    python -m clients.score --model DIR --candidates pairs.tsv --out scored.tsv

The candidate file has a header with ``userId`` and ``itemId`` (tab- or
space-separated; .csv and .parquet work too; other columns are kept). The
output is the same table plus a ``score`` column, higher meaning more likely
bought. A user the model does not know is scored by the market's
history-free model (or their --history); an item the catalog does not list
scores NaN. One line sums up pairs, unknown users and items, and seconds.
"""

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clients.recommend import model_options, run_cli
from common.data.catalog import Catalog
from common.runtime.command import ArgumentParser
from common.serving.query import load_served_model
from common.serving.tables import read_history, read_pairs, write_table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m clients.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_options(parser)
    parser.add_argument(
        "--candidates", type=Path, required=True, metavar="FILE", help="pairs to score: header userId itemId (required)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="output TSV: the candidates plus a score column (required)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Write the scored candidates; returns the one-line summary."""
    args = parse_args(argv)
    started = time.perf_counter()
    catalog = Catalog.load(args.catalog) if args.catalog else None
    served = load_served_model(args.model, catalog)
    history = read_history(args.history) if args.history else None
    pairs = read_pairs(args.candidates)
    scored = served.score(pairs, extra_history=history)
    write_table(pairs.assign(score=scored["score"].to_numpy()), args.out)
    return (
        f"{served.market}: {len(pairs)} pairs of {pairs['userId'].nunique()} users, "
        f"{scored.attrs['unknown_users']} unknown users, {scored.attrs['unknown_items']} unknown items "
        f"({int(scored['score'].isna().sum())} pairs scored NaN) in {time.perf_counter() - started:.2f} s -> {args.out}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
