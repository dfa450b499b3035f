"""Scale: many generated markets over a large catalog, through the real harness.

    python -m simulations.benchmark scale --synthetic-markets 20 --items 1000000 --methods fedals,fedper --out OUT

The federation is generated (:mod:`common.data.synthetic`, popularity-drawn candidates when the
catalog is large) and written as one file per market plus the company catalog of every
product, sold or not, so that the shared item table has ``--items`` rows while each market
touches only the products its users bought. Each federated method then runs alone through
:func:`simulations.run.main` (real SuperLink and simulation engine) while a thread samples the
resident memory of this process and every process under it.

The report gives, per method, the seconds of each round, the peak memory of the process tree,
and per market the bytes of its training message (down) and of its reply (up) beside the
items it touches, so that whether traffic grows with the catalog or with what a market sells
can be read off (``bytes per touched item`` constant across markets, or not). ``--local``
adds the local baseline, the same training without Flower, for the orchestration overhead.
A method that fails (out of memory, a message too large) is reported with its error instead
of stopping the others.
"""

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from common.data.catalog import Catalog
from common.data.synthetic import SyntheticConfig, item_names, write_markets
from common.runtime.command import add_alias, add_verbose
from simulations import run as harness

# Above this many catalog items the generator draws candidates instead of scoring every product.
DENSE_GENERATION_LIMIT = 20_000


class TreeMemorySampler:
    """Samples the memory of this process and its descendants in a thread.

    The sum of resident sets (RSS) counts a page shared by several processes (the torch and
    Ray libraries every worker maps, Ray's object store) once per process; the sum of
    proportional sets (PSS, Linux) shares each such page among its users and so adds up to the
    memory the tree really takes. Both peaks are kept; the limit and the breakdown use PSS
    where the system provides it.

    Parameters
    ----------
    interval : float
        Seconds between samples (a sample itself takes ~0.5 s for a dozen large processes).
    limit_bytes : int, optional
        Above this sum the descendants are killed (the run then fails) and ``exceeded`` is set,
        so that a method that cannot fit stops before the machine's out-of-memory killer picks
        a process of its own.
    """

    def __init__(self, interval: float = 0.25, limit_bytes: int | None = None) -> None:
        self.interval = interval
        self.limit_bytes = limit_bytes
        self.exceeded = False
        self.peak_bytes = 0  # summed RSS
        self.peak_pss_bytes = 0  # summed PSS (RSS where PSS cannot be read)
        self.at_peak: dict[str, float] = {}  # PSS MiB per kind of process when the PSS sum peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            resident, proportional, by_kind = 0, 0, {}
            for process in [me, *me.children(recursive=True)]:
                try:
                    rss = process.memory_info().rss
                    pss = _pss(process.pid, rss)
                    kind = _kind(process)
                except psutil.Error:
                    continue  # exited between listing and reading
                resident += rss
                proportional += pss
                by_kind[kind] = by_kind.get(kind, 0.0) + pss / 2**20
            self.peak_bytes = max(self.peak_bytes, resident)
            if proportional > self.peak_pss_bytes:
                self.peak_pss_bytes, self.at_peak = proportional, by_kind
            if self.limit_bytes is not None and proportional > self.limit_bytes and not self.exceeded:
                self.exceeded = True
                for child in me.children(recursive=True):
                    try:
                        child.kill()
                    except psutil.Error:
                        continue
            self._stop.wait(self.interval)


def _pss(pid: int, rss: int) -> int:
    """The process's proportional set size in bytes from ``/proc/<pid>/smaps_rollup``; ``rss`` without one."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss


def _kind(process: psutil.Process) -> str:
    """A process's kind for the memory breakdown: its program or Ray role, e.g. ``flwr-simulation``."""
    command = process.cmdline()
    if not command:
        return process.name()
    if command[0].startswith("ray::"):
        return command[0].split()[0]
    named = [
        Path(part).name for part in command[:3] if not part.startswith("-") and not Path(part).name.startswith("python")
    ]
    return named[0] if named else Path(command[0]).name


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
    parser.add_argument("--local", action="store_true", help="also run the local baseline (default: off)")
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=16.0,
        help="stop a method whose process tree exceeds this resident memory (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/scale"), help="output directory (default: %(default)s)"
    )
    add_verbose(parser, "every run's per-market lines")
    add_alias(parser, "--markets", "--synthetic-markets")
    add_alias(parser, "--rounds", "--num-server-rounds")


def write_federation(args: argparse.Namespace, directory: Path) -> tuple[Path, dict[str, int], dict[str, int]]:
    """Generate the markets into ``directory``: the catalog's path, each market's touched items and interactions."""
    config = SyntheticConfig(
        markets=args.synthetic_markets,
        items=args.items,
        largest_market_users=args.largest_market_users,
        smallest_market_users=min(200, args.largest_market_users),
        candidates=0 if args.items <= DENSE_GENERATION_LIMIT else 512,
        seed=args.seed,
    )
    paths = write_markets(config, directory / "markets")
    catalog_path = directory / "catalog.txt"
    Catalog.from_items(item_names(args.items).tolist()).save(catalog_path)
    touched, interactions = {}, {}
    for market, path in paths.items():  # one pass over each written file for both counts
        with open(path, encoding="utf-8") as file:
            next(file)
            items = [line.split(",", 2)[1] for line in file]
        touched[market], interactions[market] = len(set(items)), len(items)
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
    methods = f"local,{method}" if args.local else method
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
        local = results["methods"]["local"]["seconds"] / args.num_server_rounds
        report["local-seconds-per-round-without-flower"] = local
        report["overhead-ratio"] = report["mean-seconds-per-round"] / local
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per method."""
    lines = [
        f"{report['markets']} markets, catalog of {report['items']:,} items, {report['rounds']} rounds; "
        f"markets touch {min(report['touched-items'].values()):,} to {max(report['touched-items'].values()):,} items",
        "",
        "| method | s/round | peak tree PSS (GiB) | peak tree RSS (GiB) | up MB/round (largest market) "
        "| up bytes/touched item | up r² vs touched items | up r² vs interactions | down MB/round (largest) "
        "| down bytes/touched item | down r² |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    largest = max(report["touched-items"], key=report["touched-items"].get)
    for method, entry in report["methods"].items():
        if "error" in entry:
            lines.append(
                f"| {method} | failed: {entry['error'][:160]} | {entry['peak-tree-pss-mib'] / 1024:.2f} | "
                f"{entry['peak-tree-rss-mib'] / 1024:.2f} | | | | | | | |"
            )
            continue
        big = entry["traffic"].get(largest, {})
        lines.append(
            f"| {method} | {entry['mean-seconds-per-round']:.1f} | {entry['peak-tree-pss-mib'] / 1024:.2f} | "
            f"{entry['peak-tree-rss-mib'] / 1024:.2f} | "
            f"{big.get('upload-bytes', float('nan')) / 1e6:.1f} | {entry['upload']['bytes-per-touched-item']:.0f} | "
            f"{entry['upload']['r2']:.3f} | {entry['upload-by-interactions']['r2']:.3f} | "
            f"{big.get('download-bytes', float('nan')) / 1e6:.1f} | "
            f"{entry['download']['bytes-per-touched-item']:.0f} | "
            f"{entry['download']['r2']:.3f} |"
        )
    return "\n".join(lines)


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the federation, run each method, write ``scale.json`` and ``scale.md``."""
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    if not methods:
        raise ValueError("The scale benchmark needs at least one method in --methods.")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    catalog_path, touched, interactions = write_federation(args, args.out / "data")
    print(
        f"generated {args.synthetic_markets} markets over {args.items:,} items "
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
    text = table(report)
    (args.out / "scale.md").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return report
