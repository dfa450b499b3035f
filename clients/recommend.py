"""Top-K recommendations from a market's served model, written as TSV.

    python -m clients.recommend --model DIR --all --out recs.tsv
    python -m clients.recommend --model DIR --users users.tsv --k 20 --history recent.txt --out recs.tsv

The model directory is one a training wrote (simulation: OUT/models/<method>/<market>/).
Each user gets the K best items of the market's assortment that they have not
bought; a user the model does not know gets the market's history-free ranking,
or one shaped by their interactions in --history. The output has the header
``userId rank itemId score``; one line sums up users, unknown users, seconds
and users ranked per second.

A rerank directory (OUT/models/rerank/<market>/, with rerank.json) is served in
two stages: its retriever (fedals) gives each user the --retrieve best items
they have not bought, the market's ranker orders them from features of the
market's own data as of serving, and the top K are written with the ranker's
score (the retriever's where the market kept fedals' order).

Users are ranked a batch at a time and each batch is written as it is done: the
scores of a batch take at most --batch-memory (a million-item assortment: 268
users in 1 GiB), so a market of any number of users needs the model plus one
batch. A progress bar with ETA shows on stderr when it is a terminal.
"""

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.data.catalog import Catalog
from common.rerank.query import DEFAULT_RETRIEVE, RerankServer
from common.rerank.served import RerankModel, load_any_model
from common.runtime.command import ArgumentParser, add_verbose, run_command
from common.serving.batching import SCORE_MEMORY, users_per_batch
from common.serving.query import ServedModel
from common.serving.streaming import write_table_chunks
from common.serving.tables import read_history, read_user_list

COLUMNS = ("userId", "rank", "itemId", "score")


def run_cli(main: Callable[[Sequence[str] | None], str], argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and print its summary; a bad model, file or value ends in one line on stderr and status 2."""
    run_command(lambda arguments: print(main(arguments), flush=True), argv, also=(ValueError, OSError))
    return 0


def progress_bar(total: int | None, description: str, unit: str) -> AbstractContextManager[Any]:
    """A tqdm bar with ETA on stderr, off when stderr is not a terminal."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        disable=None,
        leave=False,
        dynamic_ncols=True,
    )


def load_model(directory: Path, catalog: Catalog | None) -> ServedModel | RerankServer:
    """The model a serving command answers with: a rerank directory's (it has rerank.json) or a served model."""
    model = load_any_model(directory, catalog)
    return RerankServer(model) if isinstance(model, RerankModel) else model


def model_options(parser: argparse.ArgumentParser) -> None:
    """Options every serving command shares."""
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="DIR",
        help="served-model directory with manifest.json, or a rerank directory with rerank.json (required)",
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
        "--retrieve",
        type=int,
        metavar="N",
        help=f"rerank models only: candidates the retriever gives each user for the ranker to order, at least --k "
        f"(default: {DEFAULT_RETRIEVE}, or --k if larger)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="output TSV: userId rank itemId score (required)"
    )
    parser.add_argument(
        "--batch-users",
        type=int,
        metavar="N",
        help="users ranked at once (default: as many as --batch-memory holds the scores of, at most 4096)",
    )
    parser.add_argument(
        "--batch-memory",
        type=int,
        default=SCORE_MEMORY // 2**20,
        metavar="MIB",
        help="MiB one batch's scores may take, batch users x assortment items x 4 bytes (default: %(default)s)",
    )
    add_verbose(parser)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    if args.batch_users is not None and args.batch_users < 1:
        parser.error(f"--batch-users must be at least 1, got {args.batch_users}")
    if args.batch_memory < 1:
        parser.error(f"--batch-memory must be at least 1 MiB, got {args.batch_memory}")
    if args.retrieve is not None and args.retrieve < args.k:
        parser.error(f"--retrieve must be at least --k ({args.k}), got {args.retrieve}")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Write the recommendations a batch of users at a time; returns the one-line summary."""
    args = parse_args(argv)
    started = time.perf_counter()
    catalog = Catalog.load(args.catalog) if args.catalog else None
    served = load_model(args.model, catalog)
    if args.retrieve is not None and not isinstance(served, RerankServer):
        raise ValueError(f"--retrieve applies to a rerank model only; {args.model} is a served model.")
    history = read_history(args.history) if args.history else None
    if args.all:
        users = served.user_ids + (list(history["userId"]) if history is not None else [])
    else:
        users = read_user_list(args.users)
    users = list(dict.fromkeys(str(user) for user in users))
    batch = args.batch_users or users_per_batch(len(served.assortment), args.batch_memory * 2**20)
    stage = ""
    if isinstance(served, RerankServer):
        retrieve = args.retrieve if args.retrieve is not None else max(DEFAULT_RETRIEVE, args.k)
        batches = served.recommend_batches(users, args.k, served.recent_history(history), batch, retrieve)
        stage = f" (reranked from the retriever's top {retrieve})"
    else:
        batches = served.recommend_batches(users, args.k, served.recent_history(history), batch)
    totals = {"unknown": 0, "rows": 0, "with_any": 0}

    def counted(bar: Any) -> Iterator[Any]:
        for frame in batches:
            totals["unknown"] += frame.attrs["unknown_users"]
            totals["rows"] += len(frame)
            totals["with_any"] += frame["userId"].nunique()  # a user is in one batch only
            bar.update(frame.attrs["users"])
            yield frame

    ranking = time.perf_counter()
    with progress_bar(len(users), f"{served.market}: recommend", "user") as bar:
        write_table_chunks(counted(bar), args.out, COLUMNS)
    ranking_seconds = time.perf_counter() - ranking
    return (
        f"{served.market}: {len(users)} users, of which {totals['unknown']} unknown; "
        f"{totals['rows']} recommendations{stage} ({totals['with_any']} users with any) in "
        f"{time.perf_counter() - started:.2f} s; {len(users) / max(ranking_seconds, 1e-9):,.0f} users/s ranked "
        f"and written in batches of {batch} -> {args.out}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
