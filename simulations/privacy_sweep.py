"""Privacy-budget experiment: federated quality against each market's epsilon.

    python -m simulations.privacy_sweep --epsilons inf,8,4,2,1 --data-dir DIR --out OUT

For every epsilon the federated method runs with DP-SGD (``inf`` runs it
without DP: the non-private reference), and each market's item popularity
is released with the same budget (``popular``: the simplest private
recommender, which DP-SGD has to beat), beside the local-only baseline on the
same splits. Writes ``OUT/results.json``, one CSV per epsilon
(``OUT/eps-<e>/results.csv``), ``OUT/sweep.csv`` and ``OUT/privacy.png``:
test NDCG@10 against epsilon per market and macro, with the non-private
federated and the local-only results as reference lines.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from common.methods import METHODS
from simulations import run as harness
from simulations.flower_runtime import exit_cleanly_on_sigterm


def parse_epsilons(text: str) -> list[float]:
    """``"inf,8,4"`` -> ``[inf, 8.0, 4.0]``; every value must be positive."""
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(not value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"epsilons must be positive numbers or inf, got '{text}'")
    return values


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Run the federated method once per epsilon, and local once."""
    common = ["--data-dir", args.data_dir, "--synthetic-markets", str(args.synthetic_markets),
              "--seed", str(args.seed)]
    if args.rounds is not None:
        common += ["--rounds", str(args.rounds)]
    print("== local reference ==", flush=True)
    local = harness.main([*common, "--methods", "local", "--out", str(args.out / "local")])["methods"]["local"]
    runs, popular = {}, {}
    for epsilon in args.epsilons:
        label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
        print(f"== {args.method} at epsilon {label} ==", flush=True)
        argv = [*common, "--methods", f"popular,{args.method}", "--out", str(args.out / f"eps-{label}"),
                "--dp-epsilon", "0" if math.isinf(epsilon) else str(epsilon)]
        methods = harness.main(argv)["methods"]
        runs[label], popular[label] = methods[args.method], methods["popular"]
    frame = pd.concat([sweep_frame(runs).assign(method=args.method), sweep_frame(popular).assign(method="popular")])
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "sweep.csv", index=False)
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "local": local, "runs": runs, "popular": popular}
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    plot(report, args.out / "privacy.png")
    table = frame.pivot(index=["method", "market"], columns="budget", values="ndcg@10")[list(runs)]
    print(table.to_string(float_format="%.4f"))
    return report


def sweep_frame(runs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per budget and market (macro included): NDCG@10, HR@10 and the epsilon actually spent."""
    rows = [
        {"budget": label, "market": market, "ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"],
         "epsilon_spent": metrics["epsilon"]}
        for label, summary in runs.items()
        for market, metrics in summary["per_market"].items()
    ]
    rows += [{"budget": label, "market": "macro", **summary["macro"]} for label, summary in runs.items()]
    return pd.DataFrame(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """NDCG@10 against epsilon, one panel per market plus macro, reference lines dashed."""
    runs, local, popular = report["runs"], report["local"], report["popular"]
    finite = [label for label in runs if label != "inf"]
    markets = [*local["per_market"], "macro"]
    columns = min(4, len(markets))
    rows = math.ceil(len(markets) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for axis, market in zip(axes.flat, markets, strict=False):
        def score(summary: dict[str, Any]) -> float:
            return summary["macro"]["ndcg@10"] if market == "macro" else summary["per_market"][market]["ndcg@10"]

        axis.plot([float(label) for label in finite], [score(runs[label]) for label in finite], marker="o",
                  label="federated, DP")
        axis.plot([float(label) for label in finite], [score(popular[label]) for label in finite], marker="x",
                  color="tab:orange", label="popularity, DP")
        if "inf" in runs:
            axis.axhline(score(runs["inf"]), linestyle="--", color="tab:green", label="federated, no DP")
        axis.axhline(score(local), linestyle=":", color="tab:gray", label="local only")
        axis.set_xscale("log", base=2)
        axis.set_title(market)
        axis.set_xlabel("epsilon")
        axis.set_ylabel("test NDCG@10")
    for axis in list(axes.flat)[len(markets):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options and run the sweep."""
    parser = argparse.ArgumentParser(prog="python -m simulations.privacy_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=parse_epsilons, default=parse_epsilons("inf,8,4,2,1"),
                        help="comma-separated per-market budgets, inf for no DP (default: inf,8,4,2,1)")
    parser.add_argument("--data-dir", default="", help="one interaction file per market (default: generated markets)")
    parser.add_argument("--synthetic-markets", type=int, default=6, help="generated markets without --data-dir (default: %(default)s)")
    parser.add_argument("--method", default="fedper", choices=sorted(METHODS), help="federated method (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the app's)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs/privacy"), help="output directory (default: %(default)s)")
    return sweep(parser.parse_args(argv))


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    main()
