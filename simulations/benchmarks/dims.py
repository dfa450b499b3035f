"""fedals at several factor dimensions: quality, seconds and bytes per interaction.

    xmfl benchmark dims --data-dir DIR --dims 64,128,256,512 --out OUT

Each d is one ordinary fedals run of the harness (``xmfl simulate --methods fedals --set
als-factors=d``) on the same markets, seed and split, so the rows differ in d alone. Reported
per d: macro validation and test NDCG@10 (each market at its best round on validation), the
run's seconds and seconds per round, and the bytes a market sends per round per training
interaction (mean over markets and rounds of upload bytes over the market's training
interactions) and receives per round. The other settings are the app's defaults, which were
tuned at d = 128; ``xmfl tune`` searches d together with them. Writes ``OUT/dims.json``
(``{"dims": {"<d>": {...}}, "settings": {...}}``) and ``OUT/dims.md``.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.data.markets import MarketSource, load_split
from common.runtime.command import add_verbose, comma_list
from simulations import run as harness
from simulations.progress import say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dims`` sub-command's options."""
    parser.add_argument("--data-dir", default="", help="one file per market (default: none, generated markets)")
    parser.add_argument(
        "--synthetic-markets", type=int, default=6, help="generated markets without --data-dir (default: %(default)s)"
    )
    parser.add_argument("--dims", default="64,128,256,512", help="factor dimensions d (default: %(default)s)")
    parser.add_argument("--num-server-rounds", type=int, default=15, help="rounds of each run (default: %(default)s)")
    harness.add_min_buyers(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs/dims"), help="output dir (default: %(default)s)")
    add_verbose(parser, "every run's per-market lines")


def traffic_per_interaction(rounds: list[dict[str, Any]], interactions: dict[str, int]) -> dict[str, float]:
    """Mean over markets and trained rounds of bytes up per training interaction, and mean bytes down."""
    up, down = [], []
    for entry in rounds:
        for market, metrics in entry["per_market"].items():
            if "upload-bytes" in metrics and interactions.get(market):
                up.append(metrics["upload-bytes"] / interactions[market])
                down.append(metrics["download-bytes"])
    return {
        "upload-bytes-per-interaction": float(np.mean(up)) if up else float("nan"),
        "download-bytes-per-round": float(np.mean(down)) if down else float("nan"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run fedals at every d of ``args.dims``; returns dims.json's content."""
    dims = [int(d) for d in comma_list(args.dims)]
    if not dims or min(dims) < 1:
        raise ValueError(f"--dims takes positive whole numbers, got '{args.dims}'.")
    source = MarketSource(args.data_dir, args.synthetic_markets, args.seed)
    catalog = source.catalog()
    interactions = {m: len(load_split(source, m, catalog).train_users) for m in source.markets}
    report: dict[str, Any] = {
        "settings": {"num-server-rounds": args.num_server_rounds, "seed": args.seed, "min-buyers": args.als_min_buyers},
        "dims": {},
    }
    for d in dims:
        say(f"== fedals at d = {d} ==")
        argv = [
            *harness.data_options(args),
            "--methods",
            "fedals",
            "--seed",
            str(args.seed),
            "--num-server-rounds",
            str(args.num_server_rounds),
            "--out",
            str(args.out / f"d{d}"),
            "--set",
            f"als-factors={d}",
            *(["--verbose"] if args.verbose else []),
        ]
        results = harness.main(argv)
        method = results["methods"]["fedals"]
        per_market = method["per_market"]
        report["dims"][str(d)] = {
            "val-ndcg@10": float(np.mean([m["val-ndcg@10"] for m in per_market.values()])),
            "test-ndcg@10": method["macro"]["ndcg@10"],
            "seconds": method["seconds"],
            "seconds-per-round": method["seconds"] / args.num_server_rounds,
            **traffic_per_interaction(results["rounds"], interactions),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dims.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = dims_table(report)
    (args.out / "dims.md").write_text(table + "\n", encoding="utf-8")
    say("\n" + table + f"\n\nWrote {args.out / 'dims.json'} and dims.md")
    return report


def dims_table(report: dict[str, Any]) -> str:
    """Markdown: one row per d."""
    lines = [
        "| d | macro val NDCG@10 | macro test NDCG@10 | s/round | up B/interaction | down MB/round |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d, row in report["dims"].items():
        lines.append(
            f"| {d} | {row['val-ndcg@10']:.4f} | {row['test-ndcg@10']:.4f} | {row['seconds-per-round']:.1f} | "
            f"{row['upload-bytes-per-interaction']:.0f} | {row['download-bytes-per-round'] / 1e6:.2f} |"
        )
    return "\n".join(lines)
