"""Privacy-budget experiment: federated quality against each market's epsilon.

    python -m simulations.privacy_sweep --dp-epsilons inf,8,4,2,1 --data-dir DIR --out OUT

For every epsilon the federated method runs with DP-SGD (``inf`` runs it
without DP: the non-private reference), and each market's item popularity
is released with the same budget (``popular``: the simplest private
recommender, which DP-SGD has to beat), beside the local-only baseline on the
same splits. Writes ``OUT/results.json``, one CSV per epsilon
(``OUT/eps-<e>/results.csv``), ``OUT/sweep.csv`` and ``OUT/privacy.png``:
test NDCG@10 against epsilon per market and macro, with the non-private
federated and the local-only results as reference lines.

DP results move with the seed (the noise, the sampled users), so ``--num-seeds
3`` repeats the whole sweep for three seeds and reports means with their
standard deviations (``ndcg@10 std`` beside ``ndcg@10``, error bars in the
plot); ``epsilon`` is then the most any seed spent. A progress bar with ETA
counts the runs (on a terminal).
"""

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator
import pandas as pd

from common.command import ArgumentParser, add_alias, add_verbose, run_command
from common.methods import METHODS
from simulations import run as harness
from simulations.flower_runtime import exit_cleanly_on_sigterm
from simulations.progress import bar, say
from simulations.results import mean_and_std

METRICS = ("ndcg@10", "hr@10")


def parse_epsilons(text: str) -> list[float]:
    """``"inf,8,4"`` -> ``[inf, 8.0, 4.0]``; every value must be positive."""
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(not value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"epsilons must be positive numbers or inf, got '{text}'")
    return values


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep for every seed; with several, report their means and standard deviations."""
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    # Per seed: local once, then one run per epsilon.
    with bar(len(seeds) * (1 + len(args.dp_epsilons)), "privacy sweep", "run") as runs:
        per_seed = {
            seed: sweep_seed(args, seed, args.out if len(seeds) == 1 else args.out / f"seed-{seed}", runs)
            for seed in seeds
        }
    labels = list(per_seed[seeds[0]]["runs"])
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "local": mean_over_seeds([run["local"] for run in per_seed.values()]),
        **{
            key: {label: mean_over_seeds([run[key][label] for run in per_seed.values()]) for label in labels}
            for key in ("runs", "popular")
        },
        "seeds": per_seed,
    }
    frame = pd.concat([sweep_frame(report["runs"]).assign(method=args.method),
                       sweep_frame(report["popular"]).assign(method="popular")])
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "sweep.csv", index=False)
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    plot(report, args.out / "privacy.png")
    table = frame.pivot(index=["method", "market"], columns="budget", values="ndcg@10")[labels]
    print(f"test NDCG@10{f', mean of {len(seeds)} seeds' if len(seeds) > 1 else ''}:")
    print(table.to_string(float_format="%.4f"))
    return report


def sweep_seed(args: argparse.Namespace, seed: int, out: Path, progress: Any) -> dict[str, Any]:
    """Local once, then the federated method and ``popular`` at every epsilon, for one seed.

    ``progress`` (a :func:`simulations.progress.bar`) advances by one per run.
    """
    common = ["--data-dir", args.data_dir, "--synthetic-markets", str(args.synthetic_markets), "--seed", str(seed)]
    if args.num_server_rounds is not None:
        common += ["--num-server-rounds", str(args.num_server_rounds)]
    if args.verbose:
        common.append("--verbose")
    say(f"== seed {seed}: local reference ==")
    local = harness.main([*common, "--methods", "local", "--out", str(out / "local")])["methods"]["local"]
    progress.update(1)
    runs, popular = {}, {}
    for epsilon in args.dp_epsilons:
        label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
        say(f"== seed {seed}: {args.method} at epsilon {label} ==")
        argv = [*common, "--methods", f"popular,{args.method}", "--out", str(out / f"eps-{label}"),
                "--dp-epsilon", "0" if math.isinf(epsilon) else str(epsilon)]
        methods = harness.main(argv)["methods"]
        runs[label], popular[label] = methods[args.method], methods["popular"]
        progress.update(1)
    return {"local": local, "runs": runs, "popular": popular}


def mean_over_seeds(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One method summary whose NDCG@10 and HR@10 are the seeds' means.

    Their standard deviations sit beside them (``ndcg@10 std``, 0 for one
    seed), and ``epsilon`` is the most any seed spent (``delta`` the largest
    it was spent at), so a budget check on the summary holds for every seed.
    """
    def mean_std(metrics: list[dict[str, Any]]) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        for metric in METRICS:
            spread = mean_and_std([m[metric] for m in metrics])
            entry[metric], entry[f"{metric} std"] = spread["mean"], spread["std"]
        return entry

    markets = summaries[0]["per_market"]
    per_market = {}
    for market in markets:
        metrics = [summary["per_market"][market] for summary in summaries]
        worst = {
            key: max((m[key] for m in metrics if m.get(key) is not None), default=None) for key in ("epsilon", "delta")
        }
        per_market[market] = {**mean_std(metrics), **worst}
    return {"per_market": per_market, "macro": mean_std([summary["macro"] for summary in summaries])}


def sweep_frame(runs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per budget and market (macro included).

    NDCG@10 and HR@10 (mean and std over seeds), the epsilon spent and its delta.
    """
    columns = [key for metric in METRICS for key in (metric, f"{metric} std")]
    rows = [
        {"budget": label, "market": market, **{key: metrics[key] for key in columns},
         "epsilon_spent": metrics["epsilon"], "delta": metrics["delta"]}
        for label, summary in runs.items()
        for market, metrics in summary["per_market"].items()
    ]
    rows += [{"budget": label, "market": "macro", **summary["macro"]} for label, summary in runs.items()]
    return pd.DataFrame(rows)


def budget_positions(labels: list[str]) -> dict[str, float]:
    """Where each budget sits on the log-2 epsilon axis; ``inf`` (no DP) one doubling past the largest."""
    finite = sorted(float(label) for label in labels if label != "inf")
    positions = {label: float(label) for label in labels if label != "inf"}
    if "inf" in labels:
        positions["inf"] = 2 * finite[-1] if finite else 1.0
    return positions


def privacy_figure(report: dict[str, Any]) -> plt.Figure:
    """NDCG@10 against epsilon, one panel per market plus macro.

    Every panel shares one y-axis, so the drop under DP compares across
    markets. The epsilon ticks are the budgets themselves, written as plain
    numbers, with ``inf`` (the run without DP) at the right end. The legend
    sits in a free panel, or below the panels when there is none.
    """
    runs, local, popular = report["runs"], report["local"], report["popular"]
    positions = budget_positions(list(runs))
    labels = sorted(positions, key=positions.get)
    markets = [*local["per_market"], "macro"]
    columns = min(4, len(markets))
    rows = math.ceil(len(markets) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows + 0.6), squeeze=False,
                                sharey=True)
    for axis, market in zip(axes.flat, markets, strict=False):
        def score(summary: dict[str, Any], key: str = "ndcg@10") -> float:
            return summary["macro"][key] if market == "macro" else summary["per_market"][market][key]

        for summary, marker, color, label in ((runs, "o", "tab:blue", "federated, DP (inf: no DP)"),
                                              (popular, "x", "tab:orange", "popularity, DP (inf: exact)")):
            # Error bars: one standard deviation over seeds (none for one seed).
            axis.errorbar([positions[b] for b in labels], [score(summary[b]) for b in labels],
                          yerr=[score(summary[b], "ndcg@10 std") for b in labels],
                          marker=marker, color=color, capsize=3, label=label)
        if "inf" in runs:
            axis.axhline(score(runs["inf"]), linestyle="--", color="tab:green", label="federated, no DP")
        axis.axhline(score(local), linestyle=":", color="tab:gray", label="local only")
        axis.set_xscale("log", base=2)
        axis.set_xticks([positions[b] for b in labels], labels=labels)
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_title(market)
        axis.set_xlabel("epsilon")
        axis.grid(alpha=0.3)
    for axis in axes[:, 0]:
        axis.set_ylabel("test NDCG@10")
    handles, names = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(markets):]
    for axis in spare:
        axis.axis("off")
    if spare:
        spare[0].legend(handles, names, loc="center", fontsize="small")
        figure.tight_layout()
    else:
        figure.legend(handles, names, loc="lower center", ncol=len(names), fontsize="small")
        figure.tight_layout(rect=(0, 0.08, 1, 1))
    return figure


def plot(report: dict[str, Any], path: Path) -> None:
    """Write :func:`privacy_figure` to ``path``."""
    figure = privacy_figure(report)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options and run the sweep."""
    parser = ArgumentParser(prog="python -m simulations.privacy_sweep", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp-epsilons", type=parse_epsilons, default=parse_epsilons("inf,8,4,2,1"),
                        help="comma-separated per-market budgets, inf for no DP (default: inf,8,4,2,1)")
    parser.add_argument("--data-dir", default="", help="one interaction file per market (default: generated markets)")
    parser.add_argument("--synthetic-markets", type=int, default=6, help="generated markets without --data-dir (default: %(default)s)")
    parser.add_argument("--method", default="fedper", choices=sorted(METHODS), help="federated method (default: %(default)s)")
    parser.add_argument("--num-server-rounds", type=int, default=None,
                        help=f"federated rounds (default: {harness.app_defaults()['num-server-rounds']}, "
                             "num-server-rounds of the app config)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    parser.add_argument("--num-seeds", type=int, default=1,
                        help="seeds from --seed on; with more than one, every number is the mean over them, with its "
                             "standard deviation beside it and as error bars, and each seed's runs go to OUT/seed-<s> "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs/privacy"), help="output directory (default: %(default)s)")
    add_verbose(parser, "every run's per-market lines")
    for old, new in {"--epsilons": "--dp-epsilons", "--rounds": "--num-server-rounds", "--seeds": "--num-seeds"}.items():
        add_alias(parser, old, new)
    args = parser.parse_args(argv)
    if args.num_seeds < 1:
        parser.error(f"--num-seeds must be at least 1, got {args.num_seeds}")
    return sweep(args)


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    run_command(main)
