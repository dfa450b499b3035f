"""How much a market joining late gains from the federation, by how much data it has.

    python -m simulations.benchmark join --data-dir DIR --fractions 0.1,0.25,0.5,1 --out OUT

For each market in turn: a federated training (``--method``, fedrep by
default) on the other markets, through the same harness and Flower apps as
``simulations.run``; then the held-out market joins it
(:func:`clients.join.join_market`: a head of its own on the published
shared part, then the whole model fine-tuned) using only a fraction of its users' training interactions,
against ``local`` (a whole model trained on that market alone) on the same
users. Validation and test users stay the whole market's, and both sides keep
their best validation point (test NDCG@10 there), so the two columns differ
only in where the shared part comes from.

Every run uses one company catalog of all markets' items
(``OUT/catalog.txt``): the held-out market's items have rows in the shared
part, trained where the other markets sell them and untouched otherwise, as
for a real market entering with a catalog the company already has.

Writes ``OUT/join.json``::

    {"markets": {market: {fraction: {"join": ndcg, "local": ndcg}}},
     "macro": {fraction: {"join": ndcg, "local": ndcg}}, ...}

``OUT/join.md`` (the table) and ``OUT/join.png`` (NDCG@10 against the
fraction: macro, and every market's join minus local).
"""

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from clients.join import join_market, load_published, subsample_training_users  # noqa: E402
from common.data.catalog import Catalog  # noqa: E402
from common.data.interactions import discover_market_files, read_interactions  # noqa: E402
from common.data.markets import market_seed  # noqa: E402
from common.data.split import MarketSplit, split_market  # noqa: E402
from common.data.synthetic import SyntheticConfig, write_markets  # noqa: E402
from common.methods import METHODS  # noqa: E402
from common.neural.model import ModelConfig, SplitRecommender  # noqa: E402
from common.neural.train import MarketTensors, TrainConfig, evaluate, train_epochs  # noqa: E402
from common.runtime.command import ArgumentParser, OptionError, add_alias, add_verbose, run_command  # noqa: E402
from common.selection import improves  # noqa: E402
from simulations import run as harness  # noqa: E402

PUBLISHED = "published.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``join`` sub-command's options."""
    defaults = harness.app_defaults()
    parser.add_argument("--data-dir", default="", help="one interaction file per market (default: generated markets)")
    parser.add_argument(
        "--synthetic-markets", type=int, default=4, help="generated markets without --data-dir (default: %(default)s)"
    )
    parser.add_argument(
        "--fractions",
        default="0.1,0.25,0.5,1",
        help="comma-separated shares of the joining market's users to train on (default: %(default)s)",
    )
    parser.add_argument(
        "--method",
        default="fedrep",
        choices=sorted(METHODS),
        help="federated method the other markets train (default: %(default)s)",
    )
    parser.add_argument(
        "--markets", default="", help="comma-separated markets to hold out in turn (default: every market)"
    )
    parser.add_argument(
        "--num-server-rounds",
        type=int,
        default=defaults["num-server-rounds"],
        help="federated rounds, and local's evaluation points (default: %(default)s)",
    )
    parser.add_argument(
        "--join-epochs",
        type=int,
        default=10,
        help="epochs of head training when joining, the encoder frozen (default: %(default)s)",
    )
    parser.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=15,
        help="then epochs of training the whole joined model; the best epoch on validation is "
        "kept (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="seed (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/join"), help="output directory (default: %(default)s)"
    )
    add_verbose(parser, "every training's per-market lines")
    add_alias(parser, "--rounds", "--num-server-rounds")


def parse_fractions(text: str) -> list[float]:
    """``"0.1,0.25,1"`` as fractions in (0, 1], in the given order.

    Raises
    ------
    ValueError
        If an entry is not a number in (0, 1] or the list is empty.
    """
    fractions = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        try:
            fraction = float(entry)
        except ValueError:
            raise OptionError(f"--fractions takes numbers in (0, 1], got '{entry}'.") from None
        if not 0 < fraction <= 1:
            raise OptionError(f"--fractions takes numbers in (0, 1], got {fraction}.")
        fractions.append(fraction)
    if not fractions:
        raise OptionError("--fractions needs at least one fraction.")
    return fractions


def local_on_fraction(
    split: MarketSplit,
    catalog: Catalog,
    fraction: float,
    rounds: int,
    train: TrainConfig,
    seed: int,
    embedding_dim: int,
    history_length: int,
    user_embeddings: bool,
) -> dict[str, float]:
    """``local`` trained on ``fraction`` of the market's users: val and test NDCG@10 at its best validation round.

    The same model, seeds and epochs per evaluation point as
    :func:`simulations.baselines.run_local`; the training interactions are those
    of the users :func:`clients.join.subsample_training_users` draws for the
    joining market, so both sides see the same data. Only the sampled
    validation NDCG@10 is computed every round (the full-ranking metrics of
    ``run_local`` choose nothing and cost most of the time on a large market).
    """
    local_seed = market_seed(split.market, seed)
    data = MarketTensors.from_split(split, history_length)
    train_split = subsample_training_users(split, fraction, local_seed)
    train_data = data if train_split is split else MarketTensors.from_split(train_split, history_length)
    torch.manual_seed(local_seed)
    model = SplitRecommender(ModelConfig(catalog.size, split.num_users, embedding_dim, history_length, user_embeddings))
    best_round, best_ndcg, best_state = 0, None, None
    for server_round in range(1, rounds + 1):
        train_epochs(model, [train_data], train, local_seed + server_round)
        ndcg = evaluate(model, data, full=False).ndcg
        if improves(ndcg, best_ndcg):  # the first best round, as simulations.results.select_on_validation
            best_round, best_ndcg = server_round, ndcg
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {
        "round": best_round,
        "val-ndcg": best_ndcg,
        "test-ndcg": evaluate(model, data, on_test=True, full=False).ndcg,
    }


def market_files(args: argparse.Namespace) -> dict[str, Path]:
    """The markets' files: ``--data-dir``'s, or generated markets written to ``OUT/data``."""
    if args.data_dir:
        return discover_market_files(args.data_dir)
    return write_markets(SyntheticConfig(markets=args.synthetic_markets, seed=args.seed), args.out / "data")


def federate_without(
    held_out: str, files: dict[str, Path], catalog_path: Path, args: argparse.Namespace, out: Path
) -> Path:
    """A federated training of every market but ``held_out``; the published shared part it wrote.

    A training this benchmark finished before in ``out`` with the same method,
    rounds and seed is reused, so that an interrupted benchmark resumes.
    """
    published = out / "models" / args.method / PUBLISHED
    results = out / "results.json"
    if published.exists() and results.exists():
        config = json.loads(results.read_text(encoding="utf-8"))["config"]
        rounds = config.get(
            "num_server_rounds", config.get("rounds")
        )  # "rounds" in results written before the option was renamed
        if (config["methods"], rounds, config["seed"]) == ([args.method], args.num_server_rounds, args.seed):
            harness.say(f"reusing the training without {held_out} in {out}")
            return published
    with tempfile.TemporaryDirectory(prefix=f"without-{held_out}-") as directory:
        for market, path in files.items():
            if market != held_out:
                (Path(directory) / path.name).symlink_to(path.resolve())
        harness.main(
            [
                "--data-dir",
                directory,
                "--methods",
                args.method,
                "--num-server-rounds",
                str(args.num_server_rounds),
                "--seed",
                str(args.seed),
                "--set",
                f"catalog-path={catalog_path.resolve()}",
                "--out",
                str(out),
                *(["--verbose"] if args.verbose else []),
            ]
        )
    return published


def market_config(args: argparse.Namespace, fractions: list[float]) -> dict[str, Any]:
    """What one market's scores depend on: a market done before with these settings is reused."""
    return {
        "method": args.method,
        "rounds": args.num_server_rounds,
        "seed": args.seed,
        "join_epochs": args.join_epochs,
        "fine_tune_epochs": args.fine_tune_epochs,
        "fractions": fractions,
    }


def reusable(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether scores saved with ``saved`` settings answer ``wanted``: the same settings, at least its fractions."""
    same = {key: value for key, value in saved.items() if key != "fractions"} == {
        key: value for key, value in wanted.items() if key != "fractions"
    }
    return same and set(wanted["fractions"]) <= set(saved["fractions"])


def macro(markets: dict[str, dict[float, dict[str, float]]], fractions: list[float]) -> dict[float, dict[str, float]]:
    """Mean over markets of each side's NDCG@10, per fraction."""
    return {
        fraction: {
            side: statistics.fmean(scores[fraction][side] for scores in markets.values()) for side in ("join", "local")
        }
        for fraction in fractions
    }


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per market and the macro, join | local | gain for each fraction."""
    fractions = report["fractions"]
    header = "| market | " + " | ".join(f"join {f:g} | local {f:g} | gain {f:g}" for f in fractions) + " |"
    lines = [header, "|---|" + "---:|" * (3 * len(fractions))]
    rows = [*report["markets"].items(), ("**macro**", report["macro"])]
    for name, scores in rows:
        cells = []
        for fraction in fractions:
            entry = scores[str(fraction)]
            cells.append(f"{entry['join']:.4f} | {entry['local']:.4f} | {entry['join'] - entry['local']:+.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| fraction | markets where join > local | macro join > local |")
    lines.append("|---:|---:|---|")
    for fraction in fractions:
        wins = report["wins"][str(fraction)]
        lines.append(f"| {fraction:g} | {wins['markets']} of {len(report['markets'])} | {wins['macro']} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Macro NDCG@10 of both sides against the fraction, and every market's join minus local."""
    fractions = report["fractions"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for side, style in (("join", "o-"), ("local", "s--")):
        left.plot(fractions, [report["macro"][str(f)][side] for f in fractions], style, label=side)
    left.set_title("macro test NDCG@10 of the joining market")
    left.set_xlabel("share of the market's users trained on")
    left.set_ylabel("test NDCG@10 (best validation point)")
    left.legend(loc="lower right")
    for market, scores in report["markets"].items():
        right.plot(fractions, [scores[str(f)]["join"] - scores[str(f)]["local"] for f in fractions], "o-", label=market)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_title("join minus local, per market")
    right.set_xlabel("share of the market's users trained on")
    right.set_ylabel("test NDCG@10 difference")
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xticks(fractions, [f"{f:g}" for f in fractions])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def join(args: argparse.Namespace) -> dict[str, Any]:
    """Hold out each market in turn, federate the others, join it at every fraction; write the report."""
    fractions = parse_fractions(args.fractions)
    args.out.mkdir(parents=True, exist_ok=True)
    files = market_files(args)
    held_out = [m.strip() for m in args.markets.split(",") if m.strip()] or list(files)
    unknown = sorted(set(held_out) - set(files))
    if unknown:
        raise OptionError(f"--markets names {unknown}, which have no file; the markets are {sorted(files)}.")
    tables = {market: read_interactions(path) for market, path in files.items()}
    catalog = Catalog.from_items(item for frame in tables.values() for item in frame["item"])
    catalog_path = args.out / "catalog.txt"
    catalog.save(catalog_path)
    defaults = harness.app_defaults()
    train = TrainConfig(
        epochs=defaults["local-epochs"],
        batch_size=defaults["batch-size"],
        learning_rate=defaults["learning-rate"],
        negatives=defaults["negatives"],
        score_penalty=defaults["score-penalty"],
    )
    markets: dict[str, dict[float, dict[str, float]]] = {}
    seconds: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for position, market in enumerate(held_out):
        harness.say(
            f"=== {market} joins ({position + 1} of {len(held_out)}), {time.perf_counter() - started:.0f} s so far ==="
        )
        done = args.out / f"without-{market}" / "join-scores.json"
        if done.exists():
            saved = json.loads(done.read_text(encoding="utf-8"))
            if reusable(saved["config"], market_config(args, fractions)):
                markets[market] = {float(f): v for f, v in saved["scores"].items() if float(f) in fractions}
                seconds[market] = saved["seconds"]
                harness.say(f"reusing the scores of {market} in {done}")
                continue
        clock = time.perf_counter()
        published = load_published(federate_without(market, files, catalog_path, args, args.out / f"without-{market}"))
        federated_seconds = time.perf_counter() - clock
        split = split_market(market, tables[market], catalog, args.seed)
        markets[market] = {}
        for fraction in fractions:
            clock = time.perf_counter()
            joined = join_market(
                published, split, catalog, args.join_epochs, args.seed, fraction, train, args.fine_tune_epochs
            )
            join_seconds = time.perf_counter() - clock
            clock = time.perf_counter()
            local = local_on_fraction(
                split,
                catalog,
                fraction,
                args.num_server_rounds,
                train,
                args.seed,
                published.embedding_dim,
                published.history_length,
                published.user_embeddings,
            )
            local_seconds = time.perf_counter() - clock
            markets[market][fraction] = {
                "join": joined.test.ndcg,
                "local": local["test-ndcg"],
                "join-val": joined.valid.ndcg,
                "local-val": local["val-ndcg"],
                "train-users": joined.train_users,
            }
            seconds.setdefault(market, {})[f"{fraction:g}"] = {"join": join_seconds, "local": local_seconds}
            harness.say(
                f"{market} at {fraction:g} ({joined.train_users} users): join {joined.test.ndcg:.4f} "
                f"(epoch {joined.best_epoch}, {join_seconds:.1f} s), local {local['test-ndcg']:.4f} "
                f"(round {local['round']}, {local_seconds:.1f} s)"
            )
        seconds[market]["federated-training"] = federated_seconds
        done.write_text(
            json.dumps(
                {"config": market_config(args, fractions), "scores": markets[market], "seconds": seconds[market]}
            ),
            encoding="utf-8",
        )
    summary = macro(markets, fractions)
    report = {
        "config": {
            "data_dir": args.data_dir,
            "method": args.method,
            "rounds": args.num_server_rounds,
            "join_epochs": args.join_epochs,
            "fine_tune_epochs": args.fine_tune_epochs,
            "seed": args.seed,
            "fractions": fractions,
        },
        "fractions": fractions,
        # JSON keys are strings: "0.1", "1.0".
        "markets": {m: {str(f): v for f, v in by_fraction.items()} for m, by_fraction in markets.items()},
        "macro": {str(f): v for f, v in summary.items()},
        "wins": {
            str(f): {
                "markets": sum(markets[m][f]["join"] > markets[m][f]["local"] for m in markets),
                "macro": summary[f]["join"] > summary[f]["local"],
            }
            for f in fractions
        },
        "seconds": seconds,
    }
    (args.out / "join.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = table(report)
    (args.out / "join.md").write_text(text + "\n", encoding="utf-8")
    plot(report, args.out / "join.png")
    harness.say("\n" + text)
    harness.say(
        f"\nWrote {args.out / 'join.json'}, join.md and join.png in {math.ceil(time.perf_counter() - started)} s"
    )
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m simulations.benchmarks.join_benchmark``: the same as ``python -m simulations.benchmark join``."""
    parser = ArgumentParser(
        prog="python -m simulations.benchmark join",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return join(parser.parse_args(argv))


if __name__ == "__main__":
    run_command(main)
