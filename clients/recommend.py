"""Top-K recommendations from a market's served model, written as TSV.

    python -m clients.recommend --model DIR --all --out recs.tsv
    python -m clients.recommend --model DIR --users users.tsv --k 20 --history recent.txt --out recs.tsv

The model directory is one a training wrote (simulation: OUT/models/<method>/<market>/).
Each user gets the K best items of the market's assortment that they have not
bought; a user the model does not know gets the market's history-free ranking,
or one shaped by their interactions in --history. The output has the header
``userId rank itemId score``; one line sums up users, unknown users and seconds.
"""

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common.data.catalog import Catalog
from common.runtime.command import ArgumentParser, run_command
from common.serving.query import load_served_model
from common.serving.tables import read_history, read_user_list, write_table


def run_cli(main: Callable[[Sequence[str] | None], str], argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and print its summary; a bad model, file or value ends in one line on stderr and status 2."""
    run_command(lambda arguments: print(main(arguments), flush=True), argv, also=(ValueError, OSError))
    return 0


def model_options(parser: argparse.ArgumentParser) -> None:
    """Options every serving command shares."""
    parser.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="served-model directory with manifest.json (required)"
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        metavar="FILE",
        help="the company catalog to check the model against (default: trust the model's own copy)",
    )
    parser.add_argument(
        "--history",
        type=Path,
        metavar="FILE",
        help="recent interactions of unknown or returning users, like a market file: "
        "userId itemId [rating] [date] (default: none)",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m clients.recommend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_options(parser)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--users",
        type=Path,
        metavar="FILE",
        help="users to recommend to: header userId, one user ID per line (required: this or --all)",
    )
    who.add_argument(
        "--all",
        action="store_true",
        help="every user the model knows, and every user of --history (default: off; this or --users is required)",
    )
    parser.add_argument("--k", type=int, default=10, help="recommendations per user (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="output TSV: userId rank itemId score (required)"
    )
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Write the recommendations; returns the one-line summary."""
    args = parse_args(argv)
    started = time.perf_counter()
    catalog = Catalog.load(args.catalog) if args.catalog else None
    served = load_served_model(args.model, catalog)
    history = read_history(args.history) if args.history else None
    if args.all:
        users = served.user_ids + (list(history["userId"]) if history is not None else [])
    else:
        users = read_user_list(args.users)
    recommendations = served.recommend(users, args.k, extra_history=history)
    write_table(recommendations, args.out)
    count = recommendations["userId"].nunique() if len(recommendations) else 0
    return (
        f"{served.market}: {len(set(users))} users, of which {recommendations.attrs['unknown_users']} unknown; "
        f"{len(recommendations)} recommendations ({count} users with any) in "
        f"{time.perf_counter() - started:.2f} s -> {args.out}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
