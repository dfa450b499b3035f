"""Benchmarks that take longer than a test.

    python -m simulations.benchmark scale --markets 100 --rounds 3 --out OUT

``scale`` runs the harness on many generated markets while sampling the
memory of this process and every process under it (SuperLink, simulation
engine, Ray workers), and reports seconds per federated round and the peak
resident memory of the whole tree, beside the time of the same local training
done in this process without Flower (the orchestration overhead, as a ratio).
"""

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from simulations import run as harness


class TreeMemorySampler:
    """Samples the summed RSS of this process and its descendants in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_bytes = 0
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
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue  # exited between listing and reading
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval)


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Run local and one federated method on ``args.markets`` generated markets."""
    argv = [
        "--synthetic-markets", str(args.markets),
        "--rounds", str(args.rounds),
        "--methods", f"local,{args.method}",
        "--out", str(args.out),
        "--seed", str(args.seed),
    ]
    with TreeMemorySampler() as sampler:
        results = harness.main(argv)
    rounds = [entry["seconds"] for entry in results["rounds"]]
    local_seconds_per_round = results["methods"]["local"]["seconds"] / args.rounds
    report = {
        "markets": args.markets,
        "rounds": args.rounds,
        "method": args.method,
        "seconds_per_round": rounds,
        "mean_seconds_per_round": sum(rounds) / len(rounds),
        "local_training_seconds_per_round_without_flower": local_seconds_per_round,
        "overhead_ratio": (sum(rounds) / len(rounds)) / local_seconds_per_round,
        "peak_tree_rss_mib": sampler.peak_bytes / 2**20,
        "macro_ndcg@10": {m: s["macro"]["ndcg@10"] for m, s in results["methods"].items()},
    }
    (args.out / "scale.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    """Parse the benchmark's sub-command and run it."""
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    scale_parser = commands.add_parser("scale", help="many generated markets: seconds per round and peak memory")
    scale_parser.add_argument("--markets", type=int, default=100, help="generated markets (default: %(default)s)")
    scale_parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default: %(default)s)")
    scale_parser.add_argument("--method", default="fedper", help="federated method (default: %(default)s)")
    scale_parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    scale_parser.add_argument("--out", type=Path, default=Path("outputs/scale"), help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    scale(args)


if __name__ == "__main__":
    main()
