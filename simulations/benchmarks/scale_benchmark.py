"""Scale: many generated markets over a large catalog, through the real harness.

    python -m simulations.benchmark scale --synthetic-markets 20 --items 1000000 --methods fedals,fedper --out OUT

The federation is generated (:mod:`common.data.synthetic`, popularity-drawn candidates when the
catalog is large) and written as one file per market plus the company catalog of every
product, sold or not, so that the shared item table has ``--items`` rows while each market
touches only the products its users bought. Each federated method then runs alone through
:func:`simulations.run.main` (real SuperLink and simulation engine) while a thread samples the
resident memory of this process and every process under it (:mod:`simulations.benchmarks.memory`).

The report gives, per method, the seconds of each round, the peak memory of the process tree,
and per market the bytes of its training message (down) and of its reply (up) beside the
items it touches, so that whether traffic grows with the catalog or with what a market sells
can be read off (``bytes per touched item`` constant across markets, or not). ``--local``
adds, for the orchestration overhead, the same work in one process without Flower
(:data:`IN_PROCESS`): for fedals ``pooled-ials``, the same ALS iterations with the same
per-market evaluation after each; for the SGD methods the local baseline.
A method that fails (out of memory, a message too large) is reported with its error instead
of stopping the others.

Quality and speed against a reference: after the federated methods, ``implicit-pooled`` (the
``implicit`` library's ALS on all markets pooled, :func:`simulations.baselines.fit_implicit`, at
its tuned settings) runs in this process on the same market files and seed, so on the same
split and evaluation candidates, with as many threads as the federation had workers training
at once (:func:`federation_workers`: Ray's CPUs, one per ClientApp, at most one per market).
It is called directly rather than through the harness so that its threads are passed, not
read from ``OMP_NUM_THREADS``, and its fit is timed apart from loading and evaluation. Its
catalog is every product the markets sell (what the harness's own ``implicit-pooled`` uses):
the company catalog lists the same products in the same sorted order, so every split and
candidate is the same item for item, while implicit does not solve for the unsold products'
factors. ``--no-reference`` skips it.

What is timed on each side, both in this run:

- a federated method's ``mean-seconds-per-round`` is the harness's round time: from the
  ServerApp sending a round's training messages until it has aggregated the replies (and,
  in the last round or without folded evaluation, evaluated the result), so it holds the
  markets' local work, their evaluation of the previous round's model folded into training,
  Flower's transport and the server's aggregation; the last round also writes the served models.
- implicit's ``seconds-per-iteration`` is the wall time of its ALS iterations (the user and
  item half-steps, as implicit's fit callback measures them) over their number: building the
  interaction matrix, implicit's transpose and initialisation, and evaluation are left out.

Per federated method the report adds ``ndcg-ratio-to-implicit`` (its macro test NDCG@10 over
implicit-pooled's) and ``round-to-iteration-ratio`` (its mean seconds per round over
implicit-pooled's seconds per iteration).
"""

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.data.catalog import Catalog
from common.data.markets import MarketSource
from common.data.synthetic import SyntheticConfig, item_names, write_markets
from common.neural.train import TrainConfig
from common.runtime.command import UserError, add_alias, add_verbose
from simulations import run as harness
from simulations.baselines import BaselineSettings, fit_implicit, implicit_missing
from simulations.benchmarks.memory import TreeMemorySampler
from simulations.flower_runtime import SimulationSuperLink
from simulations.progress import say
from simulations.results import method_summary

# Above this many catalog items the generator draws candidates instead of scoring every product.
DENSE_GENERATION_LIMIT = 20_000
REFERENCE = "implicit-pooled"  # the reference every federated method is compared with
# A federated method's work done in one process without Flower, for its overhead ratio: fedals' user and
# item steps and per-market evaluation are pooled-ials' iteration; an SGD method's local epochs, the local baseline.
IN_PROCESS = {"fedals": "pooled-ials"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale benchmark's options."""
    parser.add_argument("--synthetic-markets", type=int, default=20, help="generated markets (default: %(default)s)")
    parser.add_argument(
        "--items", type=int, default=1_000_000, help="products in the company catalog (default: %(default)s)"
    )
    parser.add_argument(
        "--largest-market-users",
        type=int,
        default=20_000,
        help="users of the biggest market; sizes decay as a power law (default: %(default)s)",
    )
    parser.add_argument("--num-server-rounds", type=int, default=3, help="federated rounds (default: %(default)s)")
    parser.add_argument(
        "--methods", default="fedals,fedper", help="comma-separated federated methods (default: %(default)s)"
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help=(
            "also run the same work in one process without Flower (fedals: pooled-ials; others: local), "
            "for the overhead ratio (default: off)"
        ),
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help=f"skip the {REFERENCE} reference and the ratios to it (default: it runs, after the federated methods)",
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=16.0,
        help="stop a method whose process tree exceeds this resident memory (default: %(default)s)",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=3600.0,
        help="seconds a round waits for the markets: a million-user market takes minutes (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/scale"), help="output directory (default: %(default)s)"
    )
    add_verbose(parser, "every run's per-market lines")
    add_alias(parser, "--markets", "--synthetic-markets")
    add_alias(parser, "--rounds", "--num-server-rounds")


def write_federation(args: argparse.Namespace, directory: Path) -> tuple[Path, dict[str, int], dict[str, int]]:
    """Generate the markets into ``directory``: the catalog's path, each market's touched items and interactions.

    A federation generated before with the same settings (``directory/federation.json``, written
    last, after every file) is read back instead: a million-user federation takes 13 minutes
    to generate, and a benchmark run again with other methods or rounds needs the same one.
    """
    config = SyntheticConfig(
        markets=args.synthetic_markets,
        items=args.items,
        largest_market_users=args.largest_market_users,
        smallest_market_users=min(200, args.largest_market_users),
        candidates=0 if args.items <= DENSE_GENERATION_LIMIT else 512,
        seed=args.seed,
    )
    # Every setting of the generator, derived ones included: a stamp of other settings is stale.
    settings = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    stamp, markets = directory / "federation.json", directory / "markets"
    try:
        shape = json.loads(stamp.read_text(encoding="utf-8"))
        files = {path.stem for path in markets.glob("*.csv")}
        if shape["settings"] == settings and files == set(shape["interactions"]) == set(shape["touched-items"]):
            say(f"reusing the federation generated in {directory} with the same settings")
            return directory / "catalog.txt", shape["touched-items"], shape["interactions"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no stamp, or not one this code wrote: generate
    stamp.unlink(missing_ok=True)
    shutil.rmtree(markets, ignore_errors=True)  # no market of an earlier federation stays beside the new ones
    started = time.perf_counter()

    def written(market: str, rows: int) -> None:
        say(f"generated market {market}: {rows:,} interactions ({time.perf_counter() - started:.0f} s so far)")

    paths = write_markets(config, directory / "markets", written)
    catalog_path = directory / "catalog.txt"
    Catalog.from_items(item_names(args.items).tolist()).save(catalog_path)
    touched, interactions = {}, {}
    for market, path in paths.items():  # one pass over each written file for both counts
        with open(path, encoding="utf-8") as file:
            next(file)
            items = [line.split(",", 2)[1] for line in file]
        touched[market], interactions[market] = len(set(items)), len(items)
    shape = {"settings": settings, "touched-items": touched, "interactions": interactions}
    stamp.write_text(json.dumps(shape, indent=1), encoding="utf-8")
    return catalog_path, touched, interactions


def method_traffic(
    rounds: list[dict[str, Any]], touched: dict[str, int], interactions: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Per market: touched items, interactions, and mean bytes down and up per round, also per touched item."""
    traffic = {}
    for market, items in touched.items():
        down = [entry["per_market"][market]["download-bytes"] for entry in rounds if market in entry["per_market"]]
        up = [entry["per_market"][market]["upload-bytes"] for entry in rounds if market in entry["per_market"]]
        if not up:
            continue
        traffic[market] = {
            "touched-items": items,
            "interactions": interactions[market],
            "download-bytes": float(np.mean(down)),
            "upload-bytes": float(np.mean(up)),
            "download-bytes-per-touched-item": float(np.mean(down)) / items,
            "upload-bytes-per-touched-item": float(np.mean(up)) / items,
        }
    return traffic


def proportionality(
    traffic: dict[str, dict[str, float]], direction: str, basis: str = "touched-items"
) -> dict[str, float]:
    """How bytes follow ``basis`` (touched items, or interactions) across markets.

    ``r2`` of bytes against ``basis`` through the origin (1: bytes ∝ basis) and the ratio of
    the largest to the smallest bytes per unit (1: the same cost per item in every market; a
    catalog-sized payload makes it as large as the spread of market sizes).
    """
    units = np.array([entry[basis] for entry in traffic.values()], dtype=np.float64)
    sent = np.array([entry[f"{direction}-bytes"] for entry in traffic.values()], dtype=np.float64)
    slope = float(units @ sent / (units @ units))
    residual = sent - slope * units
    r2 = 1.0 - float(residual @ residual) / float(((sent - sent.mean()) ** 2).sum() or 1.0)
    per_unit = sent / units
    return {
        f"bytes-per-{basis.removesuffix('s')}": slope,
        "r2": r2,
        f"max-over-min-bytes-per-{basis.removesuffix('s')}": float(per_unit.max() / per_unit.min()),
    }


def run_method(
    args: argparse.Namespace,
    method: str,
    data_dir: Path,
    catalog_path: Path,
    touched: dict[str, int],
    interactions: dict[str, int],
) -> dict[str, Any]:
    """One federated method through the harness: rounds, traffic and the process tree's peak memory."""
    in_process = IN_PROCESS.get(method, "local")
    methods = f"{in_process},{method}" if args.local else method
    argv = [
        "--data-dir",
        str(data_dir),
        "--num-server-rounds",
        str(args.num_server_rounds),
        "--methods",
        methods,
        "--out",
        str(args.out / method),
        "--seed",
        str(args.seed),
        "--set",
        f"catalog-path={catalog_path}",
        "--set",
        f"round-timeout={args.round_timeout}",
        *(["--verbose"] if args.verbose else []),
    ]
    started = time.perf_counter()
    with TreeMemorySampler(limit_bytes=int(args.memory_limit_gib * 2**30)) as sampler:
        try:
            results = harness.main(argv)
        except Exception as error:  # noqa: BLE001 - reported, and the next method still runs
            reason = f"{type(error).__name__}: {error}"
            if sampler.exceeded:
                reason = f"stopped above the memory limit of {args.memory_limit_gib} GiB ({reason})"
            return {
                "error": reason,
                "peak-tree-rss-mib": sampler.peak_bytes / 2**20,
                "peak-tree-pss-mib": sampler.peak_pss_bytes / 2**20,
                "seconds": time.perf_counter() - started,
            }
    rounds = [entry for entry in results["rounds"] if entry["method"] == method]
    seconds = [entry["seconds"] for entry in rounds]
    traffic = method_traffic(rounds, touched, interactions)
    report = {
        "seconds-per-round": seconds,
        "mean-seconds-per-round": float(np.mean(seconds)),
        "peak-tree-rss-mib": sampler.peak_bytes / 2**20,
        "peak-tree-pss-mib": sampler.peak_pss_bytes / 2**20,
        "pss-mib-at-peak-by-process": dict(sorted(sampler.at_peak.items(), key=lambda item: -item[1])),
        "macro-ndcg@10": results["methods"][method]["macro"]["ndcg@10"],
        "traffic": traffic,
        "upload": proportionality(traffic, "upload"),
        "download": proportionality(traffic, "download"),
        "upload-by-interactions": proportionality(traffic, "upload", "interactions"),
    }
    if args.local:
        baseline = results["methods"][in_process]
        # pooled-ials times its iterations apart from reading the markets; local, its whole run
        timed = baseline.get("iteration-seconds") or [baseline["seconds"] / args.num_server_rounds]
        local = float(np.mean(timed))
        report["in-process"] = in_process
        report["local-seconds-per-round-without-flower"] = local
        report["overhead-ratio"] = report["mean-seconds-per-round"] / local
    return report


def federation_workers(markets: int) -> int:
    """Markets the simulation engine trains at once: Ray's CPUs over the CPUs of one ClientApp, at most ``markets``.

    Flower sizes its pool of Ray workers as Ray's CPUs (:func:`ray._private.utils.get_num_cpus`,
    which also reads a container's CPU limit) over the CPUs per ClientApp, the default of
    :class:`SimulationSuperLink` that :mod:`simulations.run` starts it with; with fewer markets
    than workers, only as many as there are markets train at once. Ray is imported here only,
    after the federated runs, so that the memory they report does not hold it.
    """
    try:
        from ray._private.utils import get_num_cpus  # Ray's own count; private, hence the fallback
    except ImportError:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    else:
        cpus = get_num_cpus()
    per_client = inspect.signature(SimulationSuperLink).parameters["cpus_per_client"].default
    return max(1, min(markets, int(cpus // per_client)))


def implicit_reference(data_dir: Path, seed: int, threads: int) -> dict[str, Any]:
    """implicit-pooled on the market files in ``data_dir`` with ``threads`` threads: its quality and its fit's speed.

    The split, negatives and settings are those of the harness (:func:`simulations.run.main`
    with ``--data-dir data_dir --seed seed``): the market files and the seed make the split
    and candidates, the app config's history length the evaluated users' histories.
    """
    defaults = harness.app_defaults()
    source = MarketSource(str(data_dir), seed=seed)
    settings = BaselineSettings(
        rounds=1,  # implicit reports one point, after its tuned iterations
        train=TrainConfig(),  # not used by implicit
        embedding_dim=defaults["embedding-dim"],
        history_length=defaults["history-length"],
        user_embeddings=defaults["user-embeddings"],
        seed=seed,
    )
    started = time.perf_counter()
    fitted = fit_implicit(source, source.catalog(), settings, REFERENCE, say, threads=threads)
    summary = method_summary(fitted.curves, time.perf_counter() - started)
    return {
        "macro-ndcg@10": summary["macro"]["ndcg@10"],
        "seconds-per-iteration": float(np.sum(fitted.iteration_seconds)) / len(fitted.iteration_seconds),
        "threads": fitted.threads,
        "iterations": len(fitted.iteration_seconds),
        "seconds": summary["seconds"],  # loading, fit and evaluation
    }


def add_ratios(report: dict[str, Any]) -> None:
    """Each federated method's ``ndcg-ratio-to-implicit`` and ``round-to-iteration-ratio`` to the reference."""
    reference = report.get("references", {}).get(REFERENCE, {})
    if "error" in reference or not reference:
        return
    for entry in report["methods"].values():
        if "error" not in entry:
            entry["ndcg-ratio-to-implicit"] = entry["macro-ndcg@10"] / reference["macro-ndcg@10"]
            entry["round-to-iteration-ratio"] = entry["mean-seconds-per-round"] / reference["seconds-per-iteration"]


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per method."""
    lines = [
        f"{report['markets']} markets, catalog of {report['items']:,} items, {report['rounds']} rounds; "
        f"markets touch {min(report['touched-items'].values()):,} to {max(report['touched-items'].values()):,} items",
        "",
        "| method | s/round | macro NDCG@10 | NDCG / implicit-pooled | s/round / implicit-pooled s/iteration "
        "| peak tree PSS (GiB) | peak tree RSS (GiB) | up MB/round (largest market) "
        "| up bytes/touched item | up r² vs touched items | up r² vs interactions | down MB/round (largest) "
        "| down bytes/touched item | down r² |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    largest = max(report["touched-items"], key=report["touched-items"].get)
    for method, entry in report["methods"].items():
        if "error" in entry:
            lines.append(
                f"| {method} | failed: {entry['error'][:160]} | | | | {entry['peak-tree-pss-mib'] / 1024:.2f} | "
                f"{entry['peak-tree-rss-mib'] / 1024:.2f} | | | | | | | |"
            )
            continue
        big = entry["traffic"].get(largest, {})
        lines.append(
            f"| {method} | {entry['mean-seconds-per-round']:.1f} | {entry['macro-ndcg@10']:.4f} | "
            f"{_ratio(entry, 'ndcg-ratio-to-implicit')} | {_ratio(entry, 'round-to-iteration-ratio')} | "
            f"{entry['peak-tree-pss-mib'] / 1024:.2f} | "
            f"{entry['peak-tree-rss-mib'] / 1024:.2f} | "
            f"{big.get('upload-bytes', float('nan')) / 1e6:.1f} | {entry['upload']['bytes-per-touched-item']:.0f} | "
            f"{entry['upload']['r2']:.3f} | {entry['upload-by-interactions']['r2']:.3f} | "
            f"{big.get('download-bytes', float('nan')) / 1e6:.1f} | "
            f"{entry['download']['bytes-per-touched-item']:.0f} | "
            f"{entry['download']['r2']:.3f} |"
        )
    lines.extend(["", reference_line(report)] if "references" in report else [])
    return "\n".join(lines)


def _ratio(entry: dict[str, Any], key: str) -> str:
    """A ratio of the table, or a dash without the reference."""
    return f"{entry[key]:.3f}" if key in entry else "–"


def reference_line(report: dict[str, Any]) -> str:
    """The table's line on the reference: its quality, speed and threads, or its error."""
    reference = report["references"][REFERENCE]
    if "error" in reference:
        return f"{REFERENCE} (reference) failed: {reference['error']}"
    return (
        f"{REFERENCE} (reference, same data, split and candidates, {reference['threads']} threads as the "
        f"federation's workers): macro NDCG@10 {reference['macro-ndcg@10']:.4f} after {reference['iterations']} "
        f"iterations, {reference['seconds-per-iteration']:.2f} s per iteration (the ALS iterations alone); "
        "the ratios above divide each method's macro NDCG@10 and mean s/round by these."
    )


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the federation, run each method, write ``scale.json`` and ``scale.md``."""
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    if not methods:
        raise ValueError("The scale benchmark needs at least one method in --methods.")
    if args.reference and (missing := implicit_missing()) is not None:
        raise UserError(f"The {REFERENCE} reference: {missing}; or pass --no-reference.")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    catalog_path, touched, interactions = write_federation(args, args.out / "data")
    print(
        f"{args.synthetic_markets} markets over {args.items:,} items ready "
        f"in {time.perf_counter() - started:.1f} s; "
        f"they touch {min(touched.values()):,} to {max(touched.values()):,} items",
        flush=True,
    )
    report: dict[str, Any] = {
        "markets": args.synthetic_markets,
        "items": args.items,
        "rounds": args.num_server_rounds,
        "touched-items": touched,
        "interactions": interactions,
        "methods": {},
    }
    for method in methods:
        report["methods"][method] = run_method(
            args, method, args.out / "data" / "markets", catalog_path, touched, report["interactions"]
        )
        (args.out / "scale.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    if args.reference:
        threads = federation_workers(args.synthetic_markets)
        say(f"== {REFERENCE} (reference, {threads} threads) ==")
        try:
            reference = implicit_reference(args.out / "data" / "markets", args.seed, threads)
        except Exception as error:  # noqa: BLE001 - reported beside the federated numbers, which stand
            reference = {"error": f"{type(error).__name__}: {error}", "threads": threads}
        report["references"] = {REFERENCE: reference}
        add_ratios(report)
        (args.out / "scale.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = table(report)
    (args.out / "scale.md").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return report
