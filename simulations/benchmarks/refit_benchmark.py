"""Refit before serving: does fedals trained on all of each market's data serve its users' next item better?

    python -m simulations.benchmarks.refit_benchmark --data-dir DIR --num-server-rounds 15 --out OUT
    python -m simulations.benchmark refit --data-dir DIR --out OUT      (the same)

A served model never trains on each user's last two interactions: every run's
split (:func:`common.data.split.split_market`) holds them out for validation
and test. With the run-config key ``serve-refit`` the federation trains again,
after the evaluated training, on all of each market's interactions, and the
served model is that refit. This measures whether the refit serves a user's
next interaction better, on interactions neither phase ever saw:

1. ``OUT/data/``: each market's file without each user's last interaction
   (by date, stable sort, file order breaking ties: the order the split uses).
   That removed interaction is the user's future; the files are XMarket text
   (:func:`simulations.benchmarks.continue_benchmark.write_market_file`).
2. no-refit: fedals for ``--num-server-rounds`` rounds on ``OUT/data``
   (``OUT/no-refit``). refit: the same run with ``--set serve-refit=true``
   (``OUT/refit``). Same seed, same rounds, one catalog of all markets' full
   data (``OUT/catalog.txt``, ``catalog-path``), so every future item is a
   row of the item table.
3. Each phase's served model (``OUT/<phase>/models/fedals/<market>``) ranks
   each user's future item among 99 negatives and the test NDCG@10 is taken
   (:mod:`common.data.metrics`). The negatives are drawn once, before any
   model is loaded, with a fixed seed (``--seed`` and the market's name), from
   the items of the market's ``OUT/data`` file (what both phases' served
   models sell) the user never interacted with in the full data: the same
   candidates for both phases. A user the served model does not know (all
   their interactions were the future) or whose future item the market's
   served assortment does not hold is counted, per phase, not ranked.

Reported (``OUT/refit.json``, ``OUT/refit.md``, printed): per market and macro
(the mean over markets) NDCG@10 of both phases and their difference, the
users ranked and those counted apart, each run's seconds, and the served
manifests' ``refit`` entries. A phase that fails (the harness refusing
``serve-refit`` before the key exists, say) is reported in one line with its
error, and the other phase's numbers are still written.

Hand-written here rather than taken from the harness: the harness evaluates
on its own split of the files it is given, so it cannot rank interactions
removed from them; and the negatives are drawn by this module rather than by
the split's sampler, whose draws depend on the data it splits (which differs
from the full data by the future).
"""

import argparse
import contextlib
import io
import json
import re
import statistics
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.interactions import read_interactions
from common.data.metrics import hit_rate_at_k, ndcg_at_k, rank_of_positive
from common.data.split import NUM_NEGATIVES
from common.runtime.command import ArgumentParser, OptionError, add_alias, add_verbose, one_line, run_command
from common.serving.query import load_served_model
from simulations import run as harness
from simulations.benchmarks.continue_benchmark import full_market_files, write_market_file
from simulations.flower_runtime import exit_cleanly_on_sigterm

METHOD = "fedals"
PHASES = {"no-refit": (), "refit": ("--set", "serve-refit=true")}  # harness options of each phase
K = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    defaults = harness.app_defaults()
    parser.add_argument(
        "--data-dir",
        default="",
        help="one interaction file per market, the full data (default: generated markets)",
    )
    parser.add_argument(
        "--synthetic-markets",
        type=int,
        default=defaults["synthetic-markets"],
        help="generated markets without --data-dir (default: %(default)s)",
    )
    parser.add_argument(
        "--num-server-rounds",
        type=int,
        default=defaults["num-server-rounds"],
        help="rounds of both phases (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="app_config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another app config key for both phases, as simulations.run --set; repeatable (default: none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults["seed"],
        help="seed of both runs and of the negatives (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/refit"), help="output directory (default: %(default)s)"
    )
    add_verbose(parser, "every run's per-market lines and a failed phase's traceback")
    add_alias(parser, "--rounds", "--num-server-rounds")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse options the benchmark cannot run with, before anything is written.

    Raises
    ------
    OptionError
        If the rounds or generated markets are below 1, or ``--set`` names ``serve-refit``
        (each phase sets it itself).
    """
    if args.num_server_rounds < 1:
        raise OptionError(f"--num-server-rounds must be at least 1, got {args.num_server_rounds}.")
    if not args.data_dir and args.synthetic_markets < 1:
        raise OptionError(f"--synthetic-markets must be at least 1, got {args.synthetic_markets}.")
    if any(assignment.partition("=")[0] == "serve-refit" for assignment in args.app_config):
        raise OptionError("--set serve-refit is not an option of this benchmark: its refit phase sets it itself.")


def split_future(interactions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's last interaction (their future) and the interactions before it.

    Parameters
    ----------
    interactions : pandas.DataFrame
        A market as :func:`common.data.read_interactions` returns it: columns
        ``user``, ``item``, ``date`` and ``position``, each (user, item) pair once.

    Returns
    -------
    tuple[pandas.DataFrame, pandas.DataFrame]
        The kept interactions in file order, and one row per user (sorted by
        user ID): the user's latest interaction by date, undated first, the
        later file position breaking ties, as :func:`common.data.split.split_market`
        orders them.
    """
    by_date = interactions.sort_values(["date", "position"], kind="stable", na_position="first")
    last = by_date.drop_duplicates("user", keep="last")
    kept = interactions.drop(index=last.index)
    future = last.sort_values("user", kind="stable").reset_index(drop=True)
    return kept, future


@dataclass(frozen=True)
class FutureCandidates:
    """A market's users with a future item, each with the future item and its negatives."""

    users: np.ndarray  # (n,) user IDs, sorted
    items: np.ndarray  # (n, 1 + NUM_NEGATIVES) item IDs: the future item, then the negatives
    too_few_items: int  # users left out: fewer than NUM_NEGATIVES items of the market they never had


def draw_candidates(
    market: str, future: pd.DataFrame, full: pd.DataFrame, market_items: Any, seed: int
) -> FutureCandidates:
    """Each future item and NUM_NEGATIVES negatives, drawn without replacement.

    Parameters
    ----------
    market : str
        The market's name: it seeds the draws beside ``seed``, so markets draw independently.
    future : pandas.DataFrame
        One row per user, columns ``user`` and ``item`` (:func:`split_future`).
    full : pandas.DataFrame
        The market's full data, columns ``user`` and ``item``: a negative is
        never an item the user has here, the future included.
    market_items : iterable of str
        The items negatives are drawn from.
    seed : int
        Seed of the draws; the users draw in the order of their IDs.

    Returns
    -------
    FutureCandidates
        Every user of ``future`` with enough items they never had, in ID order.
    """
    items = np.asarray(sorted(set(map(str, market_items))), dtype=object)
    columns = pd.Index(items)
    had = full.groupby("user", sort=False)["item"].agg(list).to_dict()
    rng = np.random.default_rng([seed, zlib.crc32(market.encode("utf-8"))])
    users, rows, too_few = [], [], 0
    for user, item in sorted(zip(future["user"].astype(str), future["item"].astype(str), strict=True)):
        seen = columns.get_indexer(pd.Index(had.get(user, []) + [item], dtype=object))
        unseen = np.setdiff1d(np.arange(len(items)), seen[seen >= 0])
        if len(unseen) < NUM_NEGATIVES:
            too_few += 1
            continue
        users.append(user)
        rows.append([item, *items[rng.choice(unseen, size=NUM_NEGATIVES, replace=False)]])
    return FutureCandidates(
        users=np.asarray(users, dtype=object),
        items=np.asarray(rows, dtype=object).reshape(len(rows), 1 + NUM_NEGATIVES),
        too_few_items=too_few,
    )


class Scorer(Protocol):
    """What :func:`evaluate` asks of a served model (:class:`common.serving.query.ServedModel`)."""

    assortment: list[str]

    def known_users(self, user_ids: Any) -> np.ndarray: ...

    def score(self, pairs: pd.DataFrame) -> pd.DataFrame: ...


def evaluate(model: Scorer, candidates: FutureCandidates) -> dict[str, Any]:
    """NDCG@10 and HR@10 of a served model on the future items, and the users it could not rank.

    Returns
    -------
    dict
        ``ndcg@10`` and ``hr@10`` (None when no user was ranked), ``users``
        (ranked), ``unknown_users`` (the model does not know them) and
        ``outside_assortment`` (known, but the future item is not sold by the
        model's market).
    """
    known = np.asarray(model.known_users(candidates.users), dtype=bool)
    sold = pd.Index(model.assortment, dtype=object).get_indexer(pd.Index(candidates.items[:, 0], dtype=object)) >= 0
    ranked = known & sold
    result: dict[str, Any] = {
        "ndcg@10": None,
        "hr@10": None,
        "users": int(ranked.sum()),
        "unknown_users": int((~known).sum()),
        "outside_assortment": int((known & ~sold).sum()),
    }
    if ranked.any():
        items = candidates.items[ranked]
        pairs = pd.DataFrame({"userId": np.repeat(candidates.users[ranked], items.shape[1]), "itemId": items.ravel()})
        scores = model.score(pairs)["score"].to_numpy(dtype=np.float64).reshape(items.shape)
        ranks = rank_of_positive(scores)
        result["ndcg@10"], result["hr@10"] = ndcg_at_k(ranks, K), hit_rate_at_k(ranks, K)
    return result


def phase_argv(args: argparse.Namespace, data_dir: Path, out: Path, extra: tuple[str, ...]) -> list[str]:
    """The harness options of one phase."""
    return [
        "--data-dir",
        str(data_dir),
        "--methods",
        METHOD,
        "--num-server-rounds",
        str(args.num_server_rounds),
        "--seed",
        str(args.seed),
        "--set",
        f"catalog-path={(args.out / 'catalog.txt').resolve()}",
        *(f"--set={assignment}" for assignment in args.app_config),
        *extra,
        *(["--verbose"] if args.verbose else []),
        "--out",
        str(out),
    ]


def run_phase(argv: list[str], verbose: bool) -> tuple[dict[str, Any] | None, str | None]:
    """One harness run: its results.json, or None and the error in one line.

    The options are parsed first with the harness's errors caught, so that a
    refused option (it ends the parser with its message on stderr) is that message.
    """
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            harness.parse_args(argv)
    except SystemExit:
        message = re.sub(r"\s*\(see [^()]* --help\)$", "", one_line(refused.getvalue()).removeprefix("error: "))
        return None, message or "the harness refused its options"
    try:
        return harness.main(argv), None
    except Exception as err:  # a failed phase is reported, and the other phase still is
        if verbose:
            traceback.print_exc()
        return None, one_line(err) or type(err).__name__


def macro(markets: dict[str, dict[str, Any]], phase: str) -> float | None:
    """Mean over markets of a phase's NDCG@10; None if a market has none."""
    values = [entry[phase] for entry in markets.values()]
    return None if not values or any(value is None for value in values) else statistics.fmean(values)


def build_report(
    evaluations: dict[str, dict[str, dict[str, Any]]],
    errors: dict[str, str],
    future_users: dict[str, int],
    too_few_items: dict[str, int],
) -> dict[str, Any]:
    """``markets`` and ``macro`` of refit.json from each phase's per-market :func:`evaluate` results.

    Parameters
    ----------
    evaluations : dict
        Phase -> market -> :func:`evaluate`'s result; a failed phase is absent.
    errors : dict
        Phase -> its error in one line, for each failed phase.
    future_users : dict
        Market -> users with a future interaction.
    too_few_items : dict
        Market -> users not ranked: too few items they never had for the negatives.
    """
    markets: dict[str, dict[str, Any]] = {}
    for market in sorted(future_users):
        got = {phase: evaluations.get(phase, {}).get(market) for phase in PHASES}
        ranked = next((entry["users"] for entry in got.values() if entry is not None), 0)
        entry: dict[str, Any] = {phase: None if got[phase] is None else got[phase]["ndcg@10"] for phase in PHASES}
        both = entry["refit"] is not None and entry["no-refit"] is not None
        entry["difference"] = entry["refit"] - entry["no-refit"] if both else None
        entry.update(
            {
                "users": ranked,
                "future_users": future_users[market],
                "too_few_items": too_few_items[market],
                **{
                    f"{what}_by_phase": {phase: got[phase][what] for phase in PHASES if got[phase] is not None}
                    for what in ("users", "unknown_users", "outside_assortment", "hr@10")
                },
            }
        )
        markets[market] = entry
    result = {phase: macro(markets, phase) for phase in PHASES}
    both = result["refit"] is not None and result["no-refit"] is not None
    result["difference"] = result["refit"] - result["no-refit"] if both else None
    return {"macro": result, "markets": markets, "errors": dict(errors)}


def table(report: dict[str, Any]) -> str:
    """Markdown: a row per market and the macro, both phases and their difference; a line per failed phase."""

    def cell(value: float | None, signed: bool = False) -> str:
        return "n/a" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"

    def apart(entry: dict[str, Any], what: str) -> str:
        counts = sorted(set(entry[f"{what}_by_phase"].values()))
        return "/".join(map(str, counts)) or "n/a"

    lines = [
        f"| future NDCG@{K} ({report['rounds']} rounds) | users | no-refit | refit | refit - no-refit "
        "| unknown users | future item not sold |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for market, entry in report["markets"].items():
        lines.append(
            f"| {market} | {entry['users']} | {cell(entry['no-refit'])} | {cell(entry['refit'])} "
            f"| {cell(entry['difference'], True)} | {apart(entry, 'unknown_users')} "
            f"| {apart(entry, 'outside_assortment')} |"
        )
    total = sum(entry["users"] for entry in report["markets"].values())
    scores = report["macro"]
    lines.append(
        f"| **macro** | {total} | {cell(scores['no-refit'])} | {cell(scores['refit'])} "
        f"| {cell(scores['difference'], True)} | | |"
    )
    lines += [f"\n{phase} failed: {error}" for phase, error in report["errors"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write the data without the future, run both phases, rank the future items; returns refit.json's content."""
    check_arguments(args)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    full = {market: read_interactions(path) for market, path in full_market_files(args).items()}
    catalog = Catalog.from_items(item for interactions in full.values() for item in interactions["item"])
    catalog.save(args.out / "catalog.txt")
    data_dir = args.out / "data"
    candidates, counts = {}, {}
    for market, interactions in full.items():
        kept, future = split_future(interactions)
        if kept.empty:
            raise OptionError(f"Market '{market}' has no interactions left once each user's last is removed.")
        write_market_file(kept, data_dir / f"{market}.txt")
        candidates[market] = draw_candidates(market, future, interactions, kept["item"], args.seed)
        counts[market] = {"full": len(interactions), "data": len(kept), "future": len(future)}
    evaluations: dict[str, dict[str, dict[str, Any]]] = {}
    errors, seconds, manifests, harness_macro = {}, {}, {}, {}
    for phase, extra in PHASES.items():
        phase_started = time.perf_counter()
        results, error = run_phase(phase_argv(args, data_dir, args.out / phase, extra), args.verbose)
        try:
            if results is not None:
                harness_macro[phase] = results["methods"][METHOD]["macro"]["ndcg@10"]
                models = {
                    market: load_served_model(args.out / phase / "models" / METHOD / market, catalog) for market in full
                }
                evaluations[phase] = {market: evaluate(model, candidates[market]) for market, model in models.items()}
                manifests[phase] = {market: model.manifest.get("refit") for market, model in models.items()}
                unrefit = sorted(market for market, entry in manifests[phase].items() if entry is None)
                if phase == "refit" and unrefit:
                    raise ValueError(f"the served models of {', '.join(unrefit)} hold no 'refit' entry: not a refit")
        except Exception as err:  # a served model that cannot be read or ranked fails its phase only
            if args.verbose:
                traceback.print_exc()
            error = one_line(err) or type(err).__name__
            evaluations.pop(phase, None)
        if error is not None:
            errors[phase] = error
            print(f"{phase} failed: {error}", flush=True)
        seconds[phase] = time.perf_counter() - phase_started
    report = {
        **build_report(
            evaluations,
            errors,
            {market: len(c.users) + c.too_few_items for market, c in candidates.items()},
            {market: c.too_few_items for market, c in candidates.items()},
        ),
        "rounds": args.num_server_rounds,
        "seed": args.seed,
        "method": METHOD,
        "negatives": NUM_NEGATIVES,
        "config": {
            "data_dir": args.data_dir or str(args.out / "data-full"),
            "app_config": list(args.app_config),
            "phases": {phase: list(extra) for phase, extra in PHASES.items()},
            "out": str(args.out),
        },
        "interactions": counts,
        "refit_manifests": manifests,
        "harness_macro_test_ndcg@10": harness_macro,
        "seconds": {**seconds, "total": time.perf_counter() - started},
    }
    text = table(report)
    (args.out / "refit.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (args.out / "refit.md").write_text(text + "\n", encoding="utf-8")
    print("\n" + text, flush=True)
    print(f"\nWrote {args.out / 'refit.json'} and refit.md", flush=True)
    return report


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    parser = ArgumentParser(
        prog="python -m simulations.benchmarks.refit_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    run_command(lambda argv: run(parser.parse_args(argv)))
