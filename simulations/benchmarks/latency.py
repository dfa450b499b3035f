"""Seconds per federated round in a real deployment, before and after trimming what is not training.

    python -m simulations.benchmark latency --num-regions 3 --num-server-rounds 4 --out OUT

Both settings run in the same invocation, each on a fresh loopback federation
(a TLS SuperLink with node authentication and one SuperNode per region):

* ``flower-defaults``: what Flower's own loop does: the ServerApp checks for
  replies every 3 s, every round sends a separate evaluation message, and
  SuperExec checks for tasks every second.
* ``tuned``: this project's defaults: replies are checked every 0.1 s, the
  evaluation of each round's model travels inside the next round's training
  message, and SuperExec checks for tasks every 0.1 s.

What is left is mostly one ClientApp process per message (Flower starts a
fresh one for each) and the SuperNode's own 3-second polling, which Flower
does not let a deployment change.
"""

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from common.data.interactions import discover_market_files
from common.data.markets import MarketSource
from common.data.synthetic import SyntheticConfig, write_markets
from common.runtime.command import add_alias
from deploy.loopback import LoopbackFederation
from server.paths import SERVER_ROOT_ENV

SETTINGS: dict[str, dict[str, Any]] = {
    "flower-defaults": {
        "run_config": {"poll-interval": 3.0, "fold-evaluation": "false", "serve-refit": "false"},
        "environment": {},
    },
    "tuned": {
        "run_config": {"poll-interval": 0.1, "fold-evaluation": "true", "serve-refit": "false"},
        "environment": {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"},
    },
}


def _regions(out: Path, count: int, data_dir: str, seed: int) -> tuple[dict[str, dict[str, str]], Path]:
    """Node config per region and the catalog: the first ``count`` markets of ``data_dir``, or generated ones."""
    data = out / "data"
    if data_dir:
        source = MarketSource(data_dir, 0, seed)
        paths = {market: discover_market_files(data_dir)[market] for market in source.markets[:count]}
    else:
        paths = write_markets(SyntheticConfig(markets=count, seed=seed), data)
        source = MarketSource("", count, seed)
    catalog = data / "catalog.txt"
    data.mkdir(parents=True, exist_ok=True)
    source.catalog().save(catalog)
    regions = {market: {"data-path": str(path), "catalog-path": str(catalog)} for market, path in paths.items()}
    return regions, catalog


def measure(name: str, regions: dict[str, dict[str, str]], catalog: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One setting on a fresh federation: seconds per round and the training inside them."""
    setting = SETTINGS[name]
    root = args.out / name
    out_dir = root / "out"
    shutil.rmtree(out_dir, ignore_errors=True)  # this benchmark's own training; the server refuses to overwrite one
    run_config = {
        "min-nodes": len(regions),
        "num-server-rounds": args.num_server_rounds,
        "embedding-dim": args.embedding_dim,
        "seed": args.seed,
        "catalog-path": f"'{catalog}'",
        "out-dir": f"'{out_dir}'",
        **setting["run_config"],
    }
    print(f"{name}: {len(regions)} regions, {args.num_server_rounds} rounds ...", flush=True)
    # The runs' paths (out-dir under this setting's folder, the catalog beside both) lie inside --out.
    environment = {SERVER_ROOT_ENV: str(args.out.resolve()), **setting["environment"]}
    with LoopbackFederation(root, regions, environment) as federation:
        federation.start_all()
        federation.run(" ".join(f"{key}={value}" for key, value in run_config.items()), timeout=3600)
    history = json.loads((out_dir / "history.json").read_text())
    rounds = [entry for entry in history["rounds"] if entry["round"] >= 1]
    seconds = [entry["seconds"] for entry in rounds]
    # A round waits for its slowest market.
    training = [max(m["local/train-seconds"] for m in entry["per_market"].values()) for entry in rounds]
    report = {
        "seconds_per_round": seconds,
        "slowest_market_training_seconds": training,
        "mean_seconds_per_round": statistics.fmean(seconds),
        "mean_seconds_not_training": statistics.fmean(s - t for s, t in zip(seconds, training, strict=True)),
    }
    print(
        f"{name}: {report['mean_seconds_per_round']:.1f} s per round, "
        f"{report['mean_seconds_not_training']:.1f} s of it not training",
        flush=True,
    )
    return report


def latency(args: argparse.Namespace) -> dict[str, Any]:
    """Run both settings, write ``OUT/latency.json`` and print the comparison."""
    args.out.mkdir(parents=True, exist_ok=True)
    regions, catalog = _regions(args.out, args.num_regions, args.data_dir, args.seed)
    results = {name: measure(name, regions, catalog, args) for name in SETTINGS}
    before, after = results["flower-defaults"], results["tuned"]
    report = {
        "config": {key: str(value) for key, value in vars(args).items() if key != "func"},
        "settings": results,
        "ratio_seconds_per_round": after["mean_seconds_per_round"] / before["mean_seconds_per_round"],
        "ratio_seconds_not_training": after["mean_seconds_not_training"] / before["mean_seconds_not_training"],
    }
    (args.out / "latency.json").write_text(json.dumps(report, indent=1))
    print("| setting | s/round | s/round not training |\n|---|---:|---:|")
    for name, result in results.items():
        print(f"| {name} | {result['mean_seconds_per_round']:.2f} | {result['mean_seconds_not_training']:.2f} |")
    print(
        f"tuned / flower-defaults: {report['ratio_seconds_per_round']:.2f} per round, "
        f"{report['ratio_seconds_not_training']:.2f} of the time not training"
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``latency`` sub-command's options."""
    parser.add_argument("--num-regions", type=int, default=3, help="regions, one SuperNode each (default: %(default)s)")
    parser.add_argument(
        "--num-server-rounds", type=int, default=4, help="federated rounds per setting (default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir", default="", help="take the first --num-regions markets from here (default: generated markets)"
    )
    parser.add_argument("--embedding-dim", type=int, default=32, help="model width (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/latency"), help="output directory (default: %(default)s)"
    )
    add_alias(parser, "--regions", "--num-regions")
    add_alias(parser, "--rounds", "--num-server-rounds")
