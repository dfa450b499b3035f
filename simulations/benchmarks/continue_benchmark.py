"""Continue on new data: a training that starts from the saved model against one from scratch.

    python -m simulations.benchmarks.continue_benchmark --data-dir DIR --method fedrep --out OUT
    python -m simulations.benchmark continue --data-dir DIR --out OUT      (the same)

A region's file has grown. Instead of training again from scratch, a new
training continues from the saved model: the shared part the last training
published and each market's head (the app config's ``init-from``; see
:mod:`clients.continued`). This measures what that costs in quality and saves
in rounds, through the same harness and Flower apps as ``simulations.run``:

1. ``OUT/data-before/``: each market's file as it was before it grew. Of its
   interactions (as :func:`common.data.read_interactions` reads them) it
   drops the last ``--holdout`` share by date (stable sort by date, file order
   breaking ties) and every interaction the split of the full file
   (:func:`common.split.split_market`, as every run splits it) holds out for
   validation or test. So nothing evaluated at the end, by scratch or
   continue, was ever trained on, not even in the training continued from.
   Written as XMarket text (``userId itemId rate [date]``, space-separated,
   with a header), one ``<market>.txt`` each.
2. before: ``--num-server-rounds`` rounds on ``OUT/data-before`` (``OUT/before``).
3. scratch: ``--num-server-rounds`` rounds on the full data (``OUT/scratch``).
4. continue: ``--continue-rounds`` rounds on the full data with
   ``init-from=OUT/before/models/<method>`` (``OUT/continue``).

Every run uses one catalog of all markets' full data (``OUT/catalog.txt``,
``catalog-path``), so the shapes match between the phases. Without
``--data-dir`` generated markets are written to ``OUT/data-full`` first.

Reported (``OUT/continue.json``, ``OUT/continue.md``, printed): each market's
and the macro test NDCG@10 (at its best validation round, as results.json
reports it) of scratch and continue and their difference, continue's starting
point (round 0: the published shared part and the restored heads, before any
training on the grown data), the rounds of each, and from the per-round macro
test NDCG@10 the first round at which scratch reached its own final macro
within the tolerance, and the first at which continue reached it. Acceptance:
continue's macro is at least scratch's minus 0.005, with at most a third of
scratch's rounds.
"""

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd

from common.data.catalog import Catalog
from common.data.interactions import discover_market_files, read_interactions
from common.data.split import split_market
from common.data.synthetic import SyntheticConfig, generate_markets
from common.methods import METHODS
from common.runtime.command import ArgumentParser, OptionError, add_alias, add_verbose, run_command
from simulations import run as harness
from simulations.flower_runtime import exit_cleanly_on_sigterm
from simulations.results import Curve, federated_curves

TOLERANCE = 0.005  # macro test NDCG@10 continue may lose against scratch
ROUND_SHARE = 3  # continue may use at most 1 / ROUND_SHARE of scratch's rounds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    defaults = harness.app_defaults()
    parser.add_argument(
        "--data-dir",
        default="",
        help="one interaction file per market, the grown (full) data (default: generated markets)",
    )
    parser.add_argument(
        "--synthetic-markets",
        type=int,
        default=defaults["synthetic-markets"],
        help="generated markets without --data-dir (default: %(default)s)",
    )
    parser.add_argument(
        "--method",
        default="fedrep",
        choices=sorted(METHODS),
        help="federated method of every run (default: %(default)s)",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="share of each market's interactions, the latest by date, that arrive later (default: %(default)s)",
    )
    parser.add_argument(
        "--num-server-rounds",
        type=int,
        default=defaults["num-server-rounds"],
        help="rounds of the training before the data grew and of scratch (default: %(default)s)",
    )
    parser.add_argument(
        "--continue-rounds",
        type=int,
        default=None,
        help="rounds of continue (default: a third of --num-server-rounds, rounded down, at least 1)",
    )
    parser.add_argument(
        "--embedding-dim",
        type=int,
        default=defaults["embedding-dim"],
        help="width of item and user vectors (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="app_config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another app config key for every run, as simulations.run --set; repeatable (default: none)",
    )
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="seed (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/continue"), help="output directory (default: %(default)s)"
    )
    add_verbose(parser, "every run's per-market lines")
    add_alias(parser, "--rounds", "--num-server-rounds")


def continue_rounds(args: argparse.Namespace) -> int:
    """``--continue-rounds``, or a third of ``--num-server-rounds`` rounded down, at least 1.

    Raises
    ------
    ValueError
        If a number of rounds is below 1 or the holdout is not in (0, 1).
    """
    if args.num_server_rounds < 1 or (args.continue_rounds is not None and args.continue_rounds < 1):
        raise OptionError(
            f"--num-server-rounds and --continue-rounds must be at least 1, got {args.num_server_rounds} and "
            f"{args.continue_rounds}."
        )
    if not 0 < args.holdout < 1:
        raise OptionError(f"--holdout must lie in (0, 1), got {args.holdout}.")
    return args.continue_rounds if args.continue_rounds is not None else max(1, args.num_server_rounds // ROUND_SHARE)


def write_market_file(interactions: pd.DataFrame, path: Path) -> None:
    """Write interactions (as :func:`common.data.read_interactions` returns them) as XMarket text.

    The header is ``userId itemId rate date`` (no ``date`` when the table has
    no dates); dates are written as days, or with their time if any has one.

    Raises
    ------
    ValueError
        If an ID holds whitespace: the space-separated format could not hold it.
    """
    if interactions["user"].str.contains(r"\s").any() or interactions["item"].str.contains(r"\s").any():
        raise ValueError(f"Cannot write {path}: a user or item ID holds whitespace, which XMarket text cannot hold.")
    frame = pd.DataFrame(
        {"userId": interactions["user"], "itemId": interactions["item"], "rate": interactions["rating"]}
    )
    dates = interactions["date"]
    if dates.notna().all():
        days = (dates == dates.dt.normalize()).all()
        frame["date"] = dates.dt.strftime("%Y-%m-%d" if days else "%Y-%m-%dT%H:%M:%S.%f")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep=" ", index=False)


def full_market_files(args: argparse.Namespace) -> dict[str, Path]:
    """The grown data's files: ``--data-dir``'s, or generated markets written to ``OUT/data-full``."""
    if args.data_dir:
        return discover_market_files(args.data_dir)
    files = {}
    for market, frame in generate_markets(SyntheticConfig(markets=args.synthetic_markets, seed=args.seed)).items():
        interactions = pd.DataFrame(
            {
                "user": frame["userId"],
                "item": frame["itemId"],
                "rating": frame["rating"].astype("float64"),
                "date": frame["date"],
            }
        )
        files[market] = args.out / "data-full" / f"{market}.txt"
        write_market_file(interactions, files[market])
    return files


def data_before(
    market: str, interactions: pd.DataFrame, catalog: Catalog, holdout: float, seed: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The market's interactions before its file grew, and how many were left out for what.

    Parameters
    ----------
    market : str
        The market's name: it seeds the split's negatives, as in every run.
    interactions : pandas.DataFrame
        The full file as :func:`common.data.read_interactions` returns it.
    catalog : Catalog
        The runs' catalog.
    holdout : float
        Share of the interactions, the latest by date, that arrive later.
    seed : int
        The runs' seed.

    Returns
    -------
    tuple[pandas.DataFrame, dict[str, int]]
        The kept interactions in file order, and the counts ``full``,
        ``latest`` (the last share by date), ``evaluated`` (validation or test
        interactions of the full split not among the latest) and ``before``.
    """
    split = split_market(market, interactions, catalog, seed)
    users = pd.Series(split.user_ids)
    held_out = pd.DataFrame(
        {
            "user": pd.concat([users.iloc[split.valid.users], users.iloc[split.test.users]], ignore_index=True),
            "item": [
                catalog.item_ids[row] for rows in (split.valid.candidates, split.test.candidates) for row in rows[:, 0]
            ],
        }
    )
    evaluated = interactions.merge(held_out, on=["user", "item"], how="left", indicator=True)["_merge"].eq("both")
    evaluated = evaluated.to_numpy()
    by_date = interactions.sort_values(["date", "position"], kind="stable", na_position="first")
    latest_count = round(holdout * len(interactions))
    latest = interactions.index.isin(by_date.index[len(by_date) - latest_count :])
    kept = interactions[~latest & ~evaluated]
    counts = {
        "full": len(interactions),
        "latest": int(latest.sum()),
        "evaluated": int((evaluated & ~latest).sum()),
        "before": len(kept),
    }
    return kept, counts


def run_harness(data_dir: Path, rounds: int, out: Path, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """One harness run of ``args.method`` over the markets in ``data_dir``; its results.json."""
    settings = [f"--set={assignment}" for assignment in args.app_config]
    return harness.main(
        [
            "--data-dir",
            str(data_dir),
            "--methods",
            args.method,
            "--num-server-rounds",
            str(rounds),
            "--embedding-dim",
            str(args.embedding_dim),
            "--seed",
            str(args.seed),
            "--set",
            f"catalog-path={(args.out / 'catalog.txt').resolve()}",
            *settings,
            *extra,
            *(["--verbose"] if args.verbose else []),
            "--out",
            str(out),
        ]
    )


def market_curves(out: Path, method: str) -> dict[str, Curve]:
    """Each market's metrics per round (round 0: the starting point) from a run's ``history.json``."""
    return federated_curves(json.loads((out / method / "history.json").read_text(encoding="utf-8")))


def macro_curve(curves: dict[str, Curve]) -> dict[int, float]:
    """Macro test NDCG@10 of every round all markets evaluated."""
    rounds = sorted(set.intersection(*({point["round"] for point in curve} for curve in curves.values())))
    return {
        r: statistics.fmean(p["test-ndcg"] for curve in curves.values() for p in curve if p["round"] == r)
        for r in rounds
    }


def first_round_reaching(curve: dict[int, float], target: float) -> int | None:
    """The first round whose macro is at least ``target``, or None if none is."""
    return next((r for r, value in sorted(curve.items()) if value >= target), None)


def table(report: dict[str, Any]) -> str:
    """Markdown: a row per market and the macro; scratch, continue, their difference and continue's start."""
    rounds = report["rounds"]
    lines = [
        f"| test NDCG@10 | scratch ({rounds['scratch']} rounds) | continue ({rounds['continue']} rounds) "
        "| continue - scratch | continue at round 0 |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [*report["markets"].items(), ("**macro**", report["macro"])]
    for name, scores in rows:
        lines.append(
            f"| {name} | {scores['scratch']:.4f} | {scores['continue']:.4f} | "
            f"{scores['difference']:+.4f} | {scores['start']:.4f} |"
        )
    reached = [
        f"{name} reached it at round {r} of {rounds[name]}"
        if r is not None
        else f"{name} did not reach it in its {rounds[name]} round(s)"
        for name, r in report["reached"].items()
    ]
    lines += [
        "",
        f"Per-round macro test NDCG@10 against scratch's final macro minus {TOLERANCE} "
        f"({report['macro']['scratch'] - TOLERANCE:.4f}): {'; '.join(reached)} (round 0 is the starting point).",
        f"Acceptance (continue's macro at least scratch's - {TOLERANCE}, with at most 1/{ROUND_SHARE} of its "
        f"rounds): {'passed' if report['acceptance']['passed'] else 'FAILED'}.",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write the data before it grew, run before, scratch and continue, and report; returns continue.json's content."""
    started = time.perf_counter()
    rounds = {"before": args.num_server_rounds, "scratch": args.num_server_rounds, "continue": continue_rounds(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    files = full_market_files(args)
    full = {market: read_interactions(path) for market, path in files.items()}
    catalog = Catalog.from_items(item for interactions in full.values() for item in interactions["item"])
    catalog.save(args.out / "catalog.txt")
    before_dir = args.out / "data-before"
    counts = {}
    for market, interactions in full.items():
        kept, counts[market] = data_before(market, interactions, catalog, args.holdout, args.seed)
        write_market_file(kept, before_dir / f"{market}.txt")
    full_dir = Path(args.data_dir) if args.data_dir else args.out / "data-full"
    init_from = (args.out / "before" / "models" / args.method).resolve()
    plans = {
        "before": (before_dir, ()),
        "scratch": (full_dir, ()),
        "continue": (full_dir, ("--set", f"init-from={init_from}")),
    }
    seconds, results = {}, {}
    for name, (data_dir, extra) in plans.items():
        run_started = time.perf_counter()
        results[name] = run_harness(data_dir, rounds[name], args.out / name, args, *extra)
        seconds[name] = time.perf_counter() - run_started
    scratch, resumed = (results[name]["methods"][args.method] for name in ("scratch", "continue"))
    per_market = {name: market_curves(args.out / name, args.method) for name in ("scratch", "continue")}
    curves = {name: macro_curve(by_market) for name, by_market in per_market.items()}
    markets = {
        market: {
            "scratch": scratch["per_market"][market]["ndcg@10"],
            "continue": resumed["per_market"][market]["ndcg@10"],
            "difference": resumed["per_market"][market]["ndcg@10"] - scratch["per_market"][market]["ndcg@10"],
            "start": next(p["test-ndcg"] for p in per_market["continue"][market] if p["round"] == 0),
        }
        for market in sorted(scratch["per_market"])
    }
    macro = {
        "scratch": scratch["macro"]["ndcg@10"],
        "continue": resumed["macro"]["ndcg@10"],
        "difference": resumed["macro"]["ndcg@10"] - scratch["macro"]["ndcg@10"],
        "start": curves["continue"][0],
    }
    target = macro["scratch"] - TOLERANCE
    within, few_rounds = macro["continue"] >= target, ROUND_SHARE * rounds["continue"] <= rounds["scratch"]
    report = {
        "config": {
            "data_dir": str(full_dir),
            "method": args.method,
            "holdout": args.holdout,
            "embedding_dim": args.embedding_dim,
            "app_config": list(args.app_config),
            "seed": args.seed,
            "out": str(args.out),
        },
        "rounds": rounds,
        "markets": markets,
        "macro": macro,
        "macro_per_round": {name: {str(r): value for r, value in curve.items()} for name, curve in curves.items()},
        "reached": {name: first_round_reaching(curve, target) for name, curve in curves.items()},
        "acceptance": {
            "tolerance": TOLERANCE,
            "within_tolerance": within,
            "at_most_a_third_of_the_rounds": few_rounds,
            "passed": within and few_rounds,
        },
        "interactions": counts,
        "seconds": {**seconds, "total": time.perf_counter() - started},
    }
    text = table(report)
    (args.out / "continue.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (args.out / "continue.md").write_text(text + "\n", encoding="utf-8")
    print("\n" + text, flush=True)
    print(f"\nWrote {args.out / 'continue.json'} and continue.md", flush=True)
    return report


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    parser = ArgumentParser(
        prog="python -m simulations.benchmarks.continue_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    run_command(lambda argv: run(parser.parse_args(argv)))
