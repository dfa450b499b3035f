"""Privacy-budget experiment: federated quality against each market's epsilon.

    python -m simulations.benchmarks.privacy_sweep --dp-epsilons inf,8,4,2,1 --data-dir DIR --out OUT

For every epsilon the federated method (``--method``, fedals by default:
federated implicit ALS with DP item-side releases; fedper, fedrep, ... train
with DP-SGD) runs under that budget per market (``inf`` runs it without DP:
the non-private reference), and each market's item popularity is released with
the same budget (``popular``: the simplest private recommender, which the
federation has to beat), beside the local-only baseline on the same splits,
trained once without DP. A method with a private-transfer variant (fedals:
fedals-pt, each market's non-private refit of its own data on the DP shared
part) runs it in the same harness run.

The served model: per market and epsilon, whichever of ``local`` and the
transfer variant (the method itself when it has none) has the higher
validation NDCG@10, ties to ``local``; what a market would deploy, chosen
without looking at its test split. The retention of the federation's gain:
(served at epsilon - local) / (served at inf - local) in test NDCG@10, per
market and macro (macro: of the macro numbers, not the mean of the ratios);
None (``no gain`` in the table) where served at inf is not above local:
there is no gain to retain. Without ``inf`` among the budgets there is no
retention.

Writes ``OUT/results.json`` (``local``; per budget label ``runs``,
``popular``, ``transfer`` (empty for a method without a transfer variant),
``served`` and ``retention``; and each seed's own under ``seeds``), one CSV
per epsilon (``OUT/eps-<e>/results.csv``), ``OUT/sweep.csv`` (one row per
method, budget and market, with ``chosen`` and ``retention`` on the
``served`` rows) and ``OUT/privacy.png``: test NDCG@10 against epsilon per
market and macro, with the served model, the non-private federated and the
local-only results as reference lines, and a panel of the retention. It
prints the NDCG@10 table and the retention table (budgets as columns).

DP results move with the seed (the noise, the sampled users), so ``--num-seeds
3`` repeats the whole sweep for three seeds and reports means with their
standard deviations (``ndcg@10 std`` beside ``ndcg@10``, error bars in the
plot); ``epsilon`` is then the most any seed spent. The served model is chosen
per seed and then averaged; its ``chosen`` joins the seeds' choices in seed
order (``local,fedals-pt,local``). The retention is that of the means. A
progress bar with ETA counts the runs (on a terminal).
"""

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from common.methods import METHODS, transfer_variant
from common.runtime.command import ArgumentParser, add_alias, add_verbose, run_command
from common.selection import improves
from simulations import run as harness
from simulations.benchmarks.privacy_plot import plot
from simulations.flower_runtime import exit_cleanly_on_sigterm
from simulations.progress import bar, say
from simulations.results import mean_and_std

METRICS = ("ndcg@10", "hr@10")
VALIDATION = "val-ndcg@10"
NO_GAIN = "no gain"  # the retention table's entry where served at inf is not above local


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
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "local": mean_over_seeds([run["local"] for run in per_seed.values()]),
        **{
            key: {
                label: mean_over_seeds([run[key][label] for run in per_seed.values()])
                for label in per_seed[seeds[0]][key]
            }
            for key in ("runs", "popular", "transfer", "served")
        },
    }
    if "inf" in labels:
        report["retention"] = retention(report["served"], report["local"])
    report["seeds"] = per_seed
    transfer = transfer_variant(args.method)
    served = sweep_frame(report["served"]).assign(method="served")
    if "retention" in report:
        served = served.merge(retention_frame(report["retention"]), on=["budget", "market"], how="left")
    frame = pd.concat(
        [
            sweep_frame(report["runs"]).assign(method=args.method),
            *([sweep_frame(report["transfer"]).assign(method=transfer)] if transfer else []),
            sweep_frame(report["popular"]).assign(method="popular"),
            served,
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "sweep.csv", index=False)
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    plot(report, args.out / "privacy.png")
    table = frame.pivot(index=["method", "market"], columns="budget", values="ndcg@10")[labels]
    print(
        f"test NDCG@10{f', mean of {len(seeds)} seeds' if len(seeds) > 1 else ''} "
        f"(served: local or {transfer or args.method}, whichever is better on validation):"
    )
    print(table.to_string(float_format="%.4f"))
    if "retention" in report:
        print("\nretention of the federation's gain, (served - local) / (served at inf - local), test NDCG@10:")
        retained = retention_table(report["retention"])
        print(retained.to_string())
        if (retained == NO_GAIN).any(axis=None):
            print(f"({NO_GAIN}: served at inf is not above local, so there is no gain to retain)")
    else:
        print("\nno retention table: it needs the run without DP (inf) among --dp-epsilons")
    return report


def sweep_seed(args: argparse.Namespace, seed: int, out: Path, progress: Any) -> dict[str, Any]:
    """Local once, then the federated method and ``popular`` at every epsilon, for one seed.

    The method's transfer variant, if it has one, runs with it (``transfer``,
    empty otherwise), and ``served`` is this seed's :func:`served_summary` per
    budget. ``progress`` (a :func:`simulations.progress.bar`) advances by one
    per run.
    """
    common = ["--data-dir", args.data_dir, "--synthetic-markets", str(args.synthetic_markets), "--seed", str(seed)]
    if args.num_server_rounds is not None:
        common += ["--num-server-rounds", str(args.num_server_rounds)]
    if args.verbose:
        common.append("--verbose")
    say(f"== seed {seed}: local reference ==")
    local = harness.main([*common, "--methods", "local", "--out", str(out / "local")])["methods"]["local"]
    progress.update(1)
    transfer = transfer_variant(args.method)
    candidate = transfer or args.method
    runs, popular, transferred, served = {}, {}, {}, {}
    for epsilon in args.dp_epsilons:
        label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
        say(f"== seed {seed}: {args.method} at epsilon {label} ==")
        methods = ",".join(["popular", args.method, *([transfer] if transfer else [])])
        argv = [
            *common,
            "--methods",
            methods,
            "--out",
            str(out / f"eps-{label}"),
            "--dp-epsilon",
            "0" if math.isinf(epsilon) else str(epsilon),
        ]
        results = harness.main(argv)["methods"]
        runs[label], popular[label] = results[args.method], results["popular"]
        if transfer:
            transferred[label] = results[transfer]
        served[label] = served_summary(local, results[candidate], candidate)
        progress.update(1)
    return {"local": local, "runs": runs, "popular": popular, "transfer": transferred, "served": served}


def served_summary(local: dict[str, Any], candidate: dict[str, Any], name: str) -> dict[str, Any]:
    """Per market, whichever of ``local`` and ``candidate`` has the higher validation NDCG@10.

    Ties go to ``local``: the federation has to win to be served. Each
    market's entry holds the chosen model's test NDCG@10 and HR@10, its
    validation NDCG@10, its ``epsilon`` and ``delta`` (None for ``local``,
    trained without DP) and ``chosen``: ``"local"`` or ``name``. The macro is
    the mean over markets of the chosen models' numbers.

    Parameters
    ----------
    local, candidate
        Method summaries of the same markets (``per_market`` with ``ndcg@10``,
        ``hr@10`` and ``val-ndcg@10``), e.g. ``results.json``'s
        ``methods.local`` and ``methods.fedals-pt``.
    name
        What ``chosen`` calls the candidate.

    Returns
    -------
    dict
        ``{"per_market": {market: {...}}, "macro": {"ndcg@10": ..., "hr@10": ...}}``.
    """
    markets, others = set(local["per_market"]), set(candidate["per_market"])
    if markets != others:
        raise ValueError(
            f"Local and {name} must report the same markets to choose between them, "
            f"got {sorted(markets)} and {sorted(others)}."
        )
    if not markets:
        raise ValueError("There is no market to choose a served model for.")
    per_market = {}
    for market, own in local["per_market"].items():
        other = candidate["per_market"][market]
        chosen, pick = (name, other) if improves(other[VALIDATION], own[VALIDATION]) else ("local", own)
        per_market[market] = {
            **{key: pick[key] for key in (*METRICS, VALIDATION)},
            "chosen": chosen,
            "epsilon": pick.get("epsilon"),
            "delta": pick.get("delta"),
        }
    macro = {metric: sum(m[metric] for m in per_market.values()) / len(per_market) for metric in METRICS}
    return {"per_market": per_market, "macro": macro}


def retention(served: dict[str, dict[str, Any]], local: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """How much of the federation's gain over local the served model keeps at each budget, in test NDCG@10.

    ``(served at the budget - local) / (served at inf - local)``: 1 keeps the
    whole gain of the model served without DP, 0 none of it (served is no
    better than local), below 0 worse than local. None where served at
    ``inf`` is not above local: there is no gain to retain.

    Parameters
    ----------
    served
        Served summaries (:func:`served_summary`) per budget label, ``"inf"``
        (without DP) among them.
    local
        The local-only summary of the same markets.

    Returns
    -------
    dict
        ``{label: {"per_market": {market: ratio}, "macro": ratio}}``, the
        macro from the macro numbers (not the mean of the markets' ratios).
    """
    if "inf" not in served:
        raise ValueError(
            f"The retention needs the served model without DP (budget 'inf'), got budgets {sorted(served)}."
        )

    def ratio(at: float, without_dp: float, alone: float) -> float | None:
        gain = without_dp - alone
        return (at - alone) / gain if gain > 0 else None

    reference = served["inf"]
    return {
        label: {
            "per_market": {
                market: ratio(
                    metrics["ndcg@10"],
                    reference["per_market"][market]["ndcg@10"],
                    local["per_market"][market]["ndcg@10"],
                )
                for market, metrics in summary["per_market"].items()
            },
            "macro": ratio(summary["macro"]["ndcg@10"], reference["macro"]["ndcg@10"], local["macro"]["ndcg@10"]),
        }
        for label, summary in served.items()
    }


def retention_frame(retained: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per budget and market (macro included): ``budget``, ``market``, ``retention`` (a fraction or None)."""
    return pd.DataFrame(
        [
            {"budget": label, "market": market, "retention": value}
            for label, entry in retained.items()
            for market, value in [*entry["per_market"].items(), ("macro", entry["macro"])]
        ],
        columns=["budget", "market", "retention"],
    )


def retention_table(retained: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Budgets as columns, markets and macro as rows, in percent; :data:`NO_GAIN` where there is none."""

    def percent(value: float | None) -> str:
        return NO_GAIN if value is None else f"{100 * value:.0f}%"

    markets = [*next(iter(retained.values()))["per_market"], "macro"]
    return pd.DataFrame(
        {
            label: [percent(entry["macro"] if market == "macro" else entry["per_market"][market]) for market in markets]
            for label, entry in retained.items()
        },
        index=pd.Index(markets, name="market"),
    )


def mean_over_seeds(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One method summary whose NDCG@10 and HR@10 are the seeds' means.

    Their standard deviations sit beside them (``ndcg@10 std``, 0 for one
    seed), ``val-ndcg@10`` is the seeds' mean, and ``epsilon`` is the most
    any seed spent (``delta`` the largest it was spent at), so a budget check
    on the summary holds for every seed. A served summary's ``chosen`` joins
    the seeds' choices in seed order (``"local,fedals-pt"``).
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
        entry = mean_std(metrics)
        if all(VALIDATION in m for m in metrics):
            entry[VALIDATION] = mean_and_std([m[VALIDATION] for m in metrics])["mean"]
        if all("chosen" in m for m in metrics):
            entry["chosen"] = ",".join(m["chosen"] for m in metrics)
        worst = {
            key: max((m[key] for m in metrics if m.get(key) is not None), default=None) for key in ("epsilon", "delta")
        }
        per_market[market] = {**entry, **worst}
    return {"per_market": per_market, "macro": mean_std([summary["macro"] for summary in summaries])}


def sweep_frame(runs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per budget and market (macro included).

    NDCG@10 and HR@10 (mean and std over seeds), the epsilon spent and its
    delta, and ``chosen`` for a served summary.
    """
    columns = [key for metric in METRICS for key in (metric, f"{metric} std")]
    rows = [
        {
            "budget": label,
            "market": market,
            **{key: metrics[key] for key in columns},
            "epsilon_spent": metrics["epsilon"],
            "delta": metrics["delta"],
            **({"chosen": metrics["chosen"]} if "chosen" in metrics else {}),
        }
        for label, summary in runs.items()
        for market, metrics in summary["per_market"].items()
    ]
    rows += [{"budget": label, "market": "macro", **summary["macro"]} for label, summary in runs.items()]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options and run the sweep."""
    parser = ArgumentParser(
        prog="python -m simulations.benchmarks.privacy_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dp-epsilons",
        type=parse_epsilons,
        default=parse_epsilons("inf,8,4,2,1"),
        help="comma-separated per-market budgets, inf for no DP (default: inf,8,4,2,1)",
    )
    parser.add_argument("--data-dir", default="", help="one interaction file per market (default: generated markets)")
    parser.add_argument(
        "--synthetic-markets", type=int, default=6, help="generated markets without --data-dir (default: %(default)s)"
    )
    parser.add_argument(
        "--method",
        default="fedals",
        choices=sorted(METHODS),
        help="federated method; its private-transfer variant, if any, runs beside it (default: %(default)s)",
    )
    parser.add_argument(
        "--num-server-rounds",
        type=int,
        default=None,
        help=f"federated rounds (default: {harness.app_defaults()['num-server-rounds']}, "
        "num-server-rounds of the app config)",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    parser.add_argument(
        "--num-seeds",
        type=int,
        default=1,
        help="seeds from --seed on; with more than one, every number is the mean over them, with its "
        "standard deviation beside it and as error bars, and each seed's runs go to OUT/seed-<s> "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/privacy"), help="output directory (default: %(default)s)"
    )
    add_verbose(parser, "every run's per-market lines")
    for old, new in {
        "--epsilons": "--dp-epsilons",
        "--rounds": "--num-server-rounds",
        "--seeds": "--num-seeds",
    }.items():
        add_alias(parser, old, new)
    args = parser.parse_args(argv)
    if args.num_seeds < 1:
        parser.error(f"--num-seeds must be at least 1, got {args.num_seeds}")
    return sweep(args)


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    run_command(main)
