"""Scores of candidate (user, item) pairs from a market's served model.

    python -m clients.score --model DIR --candidates pairs.tsv --out scored.tsv

The candidate file has a header with ``userId`` and ``itemId`` (tab- or
space-separated; .csv and .parquet work too; other columns are kept). The
output is the same table plus a ``score`` column, higher meaning more likely
bought. A user the model does not know is scored by the market's
history-free model (or their --history); an item the catalog does not list
scores NaN. One line sums up pairs, unknown users and items, seconds and pairs
scored per second.

The candidates are read, scored and written --chunk-pairs at a time, so ten
million pairs take the model plus one chunk; a progress bar with ETA shows on
stderr when it is a terminal.

A rerank directory (with rerank.json) scores each user's pairs as one list:
the retriever scores them, the market's ranker orders them from features that
depend on the whole list (a candidate's rank and gap to the best). A rerank
score is therefore comparable only among one user's pairs: a user's pairs must
all lie within one chunk (refused otherwise; sort the file by user or raise
--chunk-pairs). An item the market does not sell scores NaN.
"""

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clients.recommend import load_model, model_options, progress_bar, run_cli
from common.data.catalog import Catalog
from common.rerank.query import RerankServer
from common.runtime.command import ArgumentParser, add_verbose
from common.serving.streaming import count_rows, write_table_chunks
from common.serving.tables import CHUNK_ROWS, read_history, read_table_chunks

DISTINCT_CAP = 1_000_000  # distinct unknown users (and items) counted exactly; beyond, the summary says "at least"


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
        help="output TSV: the candidates plus a score column; a rerank model's scores compare only among one "
        "user's pairs (required)",
    )
    parser.add_argument(
        "--chunk-pairs",
        type=int,
        default=CHUNK_ROWS,
        metavar="N",
        help="pairs read, scored and written at once; for a rerank model, each user's pairs must lie within one "
        "chunk (default: %(default)s)",
    )
    add_verbose(parser)
    args = parser.parse_args(argv)
    if args.chunk_pairs < 1:
        parser.error(f"--chunk-pairs must be at least 1, got {args.chunk_pairs}")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Write the scored candidates a chunk at a time; returns the one-line summary."""
    args = parse_args(argv)
    started = time.perf_counter()
    catalog = Catalog.load(args.catalog) if args.catalog else None
    served = load_model(args.model, catalog)
    history = served.recent_history(read_history(args.history)) if args.history else None
    # A rerank score is one of its user's list: a user's pairs in two chunks would be two lists.
    listed_before: set[str] | None = set() if isinstance(served, RerankServer) else None
    # Distinct users and unknown items over all chunks: a flag per known user, the unknown ones by
    # name up to DISTINCT_CAP each (memory stays bounded; beyond it the summary says "at least").
    seen_known = np.zeros(len(served.user_ids), dtype=bool)
    unknown_users: set[str] = set()
    unknown_items: set[str] = set()
    totals = {"pairs": 0, "nan": 0}

    def scored_chunks(bar: Any) -> Iterator[pd.DataFrame]:
        for pairs in read_table_chunks(args.candidates, ["userId", "itemId"], rows=args.chunk_pairs):
            scored = served.score(pairs, extra_history=history)
            users = pd.unique(scored["userId"])
            if listed_before is not None:
                split = listed_before.intersection(users)
                if split:
                    raise ValueError(
                        f"User {sorted(split)[0]}'s pairs are in two chunks of {args.chunk_pairs} pairs: a rerank "
                        "model scores each user's pairs as one list; sort the candidates by user or raise "
                        "--chunk-pairs."
                    )
                listed_before.update(users)
            index = served.user_index(users)
            seen_known[index[index >= 0]] = True
            if len(unknown_users) < DISTINCT_CAP:
                unknown_users.update(users[index < 0][: DISTINCT_CAP - len(unknown_users)])
            items = pd.unique(scored["itemId"])
            if len(unknown_items) < DISTINCT_CAP:
                unknown_items.update(items[~served.known_items(items)][: DISTINCT_CAP - len(unknown_items)])
            totals["pairs"] += len(pairs)
            totals["nan"] += int(scored["score"].isna().sum())
            bar.update(len(pairs))
            yield pairs.assign(score=scored["score"].to_numpy())

    scoring = time.perf_counter()
    total = count_rows(args.candidates) if sys.stderr.isatty() else None  # a second read only for a bar shown
    with progress_bar(total, f"{served.market}: score", "pair") as bar:
        write_table_chunks(scored_chunks(bar), args.out)
    rate = totals["pairs"] / max(time.perf_counter() - scoring, 1e-9)

    def many(found: set[str]) -> str:
        return f"at least {len(found)}" if len(found) >= DISTINCT_CAP else str(len(found))

    return (
        f"{served.market}: {totals['pairs']} pairs of {int(seen_known.sum()) + len(unknown_users)} users, "
        f"{many(unknown_users)} unknown users, {many(unknown_items)} unknown items "
        f"({totals['nan']} pairs scored NaN) in {time.perf_counter() - started:.2f} s; "
        f"{rate:,.0f} pairs/s read, scored and written -> {args.out}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
