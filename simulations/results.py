"""Results in the shape DESIGN.md fixes: results.json, a CSV and a readable table.

Beside the sampled metrics (``ndcg@10``, ``hr@10``: 99 sampled negatives, the
published protocol) each market reports ``full-ndcg@10`` and ``full-recall@10``
(the held-out item ranked against the market's whole assortment minus the
user's own items) when its evaluation measured them, from the same
best-validation round. Every method reports the macro mean over markets and,
for fairness across markets, the ``worst`` market's value of each metric.
"""

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: the harness runs on machines without a screen
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from common.selection import best_by

Curve = list[dict[str, float]]  # one market's metrics per round, round 0 first

SAMPLED_METRICS = ("ndcg@10", "hr@10")  # every market reports these
# Full-assortment metrics in results.json -> the curve point (and reply metric) they come from.
FULL_METRICS = {"full-ndcg@10": "test-full-ndcg", "full-recall@10": "test-full-recall"}
FINE_TUNED, TRANSFERRED = "fine-tuned", "transferred"
# Reply-metric prefixes of a method's final step after the last round -> the curve point's key.
FINAL_STEPS = {"ft-": FINE_TUNED, "pt-": TRANSFERRED}
# Reply metrics a market may send beside the sampled ones (``ft-`` prefixed for fedper-ft's fork).
FULL_REPLY_KEYS = ("val-full-ndcg", "val-full-recall", "test-full-ndcg", "test-full-recall")


def mean_and_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def federated_curves(history: dict[str, Any]) -> dict[str, Curve]:
    """Per-market curves from a ServerApp ``history.json`` (fine-tuning metrics kept aside)."""
    curves: dict[str, Curve] = {}
    for entry in history["rounds"]:
        for market, metrics in entry["per_market"].items():
            if "test-ndcg" not in metrics:
                continue
            point = {
                "round": entry["round"],
                "val-ndcg": metrics["val-ndcg"],
                "val-hr": metrics["val-hr"],
                "test-ndcg": metrics["test-ndcg"],
                "test-hr": metrics["test-hr"],
                "users": int(metrics["num-examples"]),
                "epsilon": metrics.get("epsilon"),
                "delta": metrics.get("delta"),
                **{key: metrics[key] for key in FULL_REPLY_KEYS if key in metrics},
            }
            for prefix, key in FINAL_STEPS.items():
                if f"{prefix}test-ndcg" in metrics:
                    point[key] = {
                        name[len(prefix) :]: value for name, value in metrics.items() if name.startswith(prefix)
                    }
            curves.setdefault(market, []).append(point)
    return curves


def final_step_curves(curves: dict[str, Curve], step: str) -> dict[str, Curve]:
    """fedper-ft (``step`` fine-tuned) or fedals-pt (transferred) as a method of its own.

    Each market's one point is its model after the last round's final step.
    """
    final_points = {}
    for market, curve in curves.items():
        final = curve[-1]
        if step not in final:
            raise ValueError(f"Market '{market}' reported no {step} metrics after the last round.")
        final_points[market] = [
            {
                "round": final["round"],
                "users": final["users"],
                "epsilon": final["epsilon"],
                "delta": final["delta"],
                **final[step],
            }
        ]
    return final_points


def select_on_validation(curve: Curve) -> dict[str, float]:
    """The trained point (round >= 1) with the best validation NDCG@10; test is never looked at.

    The first of equal points wins (:mod:`common.selection`), as every market's served model does.
    """
    trained = [point for point in curve if point["round"] >= 1]
    if not trained:
        raise ValueError("A curve needs at least one trained round to select from.")
    return best_by(trained, lambda point: point["val-ndcg"])


def method_summary(curves: dict[str, Curve], seconds: float) -> dict[str, Any]:
    """The ``methods.<name>`` entry of results.json."""
    per_market = {}
    for market in sorted(curves):
        best = select_on_validation(curves[market])
        per_market[market] = {
            "ndcg@10": best["test-ndcg"],
            "hr@10": best["test-hr"],
            **{name: best[key] for name, key in FULL_METRICS.items() if key in best},
            "users": int(best["users"]),
            "epsilon": best.get("epsilon"),
            "delta": best.get("delta"),
            "round": int(best["round"]),
            "val-ndcg@10": best["val-ndcg"],
        }
    return {"per_market": per_market, "macro": _macro(per_market), "worst": _worst(per_market), "seconds": seconds}


def _reported(per_market: dict[str, dict[str, Any]]) -> list[str]:
    """The metrics every market reports: the sampled ones, and the full ones if all markets measured them."""
    return [*SAMPLED_METRICS, *(name for name in FULL_METRICS if all(name in m for m in per_market.values()))]


def _macro(per_market: dict[str, dict[str, Any]]) -> dict[str, float]:
    count = len(per_market)
    return {metric: sum(m[metric] for m in per_market.values()) / count for metric in _reported(per_market)}


def _worst(per_market: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The lowest value of each metric over markets, and under ``market`` which market has it.

    Each metric names its own market (the worst on NDCG@10 need not be the worst
    on full recall); on a tie, the first market in name order.
    """
    worst: dict[str, Any] = {"market": {}}
    for metric in _reported(per_market):
        market = min(per_market, key=lambda name: per_market[name][metric])
        worst[metric] = per_market[market][metric]
        worst["market"][metric] = market
    return worst


def selection_summary(methods: dict[str, dict[str, Any]], candidates: list[str]) -> dict[str, Any]:
    """Each market keeps the candidate that is best on its own validation split.

    With ``local`` among the candidates no market ends up with a model it
    judges worse than training alone; ``chosen`` says which one it kept.
    """
    per_market = {}
    for market in methods[candidates[0]]["per_market"]:
        validation = {name: methods[name]["per_market"][market]["val-ndcg@10"] for name in candidates}
        chosen = best_by(candidates, validation.__getitem__)
        per_market[market] = {**methods[chosen]["per_market"][market], "chosen": chosen}
    return {
        "per_market": per_market,
        "macro": _macro(per_market),
        "worst": _worst(per_market),
        "seconds": sum(methods[name]["seconds"] for name in candidates),
        "candidates": candidates,
    }


def results_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per (method, market) plus a ``macro`` and a ``worst`` row per method.

    The ``worst`` row holds each metric's lowest value over markets and, in
    ``<metric> market`` columns, the market it comes from.
    """
    rows = []
    for method, summary in results["methods"].items():
        for market, metrics in summary["per_market"].items():
            rows.append({"method": method, "market": market, **metrics})
        rows.append({"method": method, "market": "macro", **summary["macro"]})
        if "worst" in summary:
            worst = summary["worst"]
            rows.append(
                {
                    "method": method,
                    "market": "worst",
                    **{k: v for k, v in worst.items() if k != "market"},
                    **{f"{metric} market": name for metric, name in worst["market"].items()},
                }
            )
    return pd.DataFrame(rows)


def format_table(results: dict[str, Any], metric: str = "ndcg@10") -> str:
    """Markdown table: markets as rows, then macro and the worst market; methods as columns, best in bold.

    A method that did not measure ``metric`` shows ``n/a``.
    """
    frame = results_frame(results)
    if metric not in frame:
        frame = frame.assign(**{metric: float("nan")})
    frame = frame.pivot(index="market", columns="method", values=metric)
    summaries = ("macro", "worst")
    markets = [m for m in frame.index if m not in summaries] + [m for m in summaries if m in frame.index]
    methods = list(results["methods"])
    frame = frame.loc[markets, methods]
    lines = [
        f"| {metric.upper()} (test) | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for market, row in frame.iterrows():
        best = row.max()
        cells = []
        for method, value in row.items():
            if pd.isna(value):
                cells.append("n/a")
                continue
            cell = f"{value:.4f}"
            if market == "worst":
                cell += f" ({results['methods'][method]['worst']['market'][metric]})"
            cells.append(f"**{cell}**" if value == best else cell)
        lines.append(f"| {market} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path) -> str:
    """Write results.json, results.csv and results.md; return the printed table.

    The table holds the sampled NDCG@10 and HR@10 and, when any method
    measured them, the full-assortment NDCG@10 and recall@10.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    frame = results_frame(results)
    frame.to_csv(out / "results.csv", index=False)
    metrics = [*SAMPLED_METRICS, *(name for name in FULL_METRICS if name in frame and frame[name].notna().any())]
    table = "\n\n".join(format_table(results, metric) for metric in metrics)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    return table


def macro_per_round(curves: dict[str, Curve], key: str = "test-ndcg") -> tuple[list[int], list[float]]:
    """Rounds and the macro of ``key`` in each, over the markets that reported that round only.

    A market that did not reply in a round has no point there; dividing by
    every market would pull the macro down for a reason that is not quality.
    """
    rounds = sorted({int(point["round"]) for curve in curves.values() for point in curve})
    macro = []
    for r in rounds:
        values = [point[key] for curve in curves.values() for point in curve if point["round"] == r]
        macro.append(sum(values) / len(values))
    return rounds, macro


def rounds_figure(curves_by_method: dict[str, dict[str, Curve]]) -> plt.Figure:
    """Macro test NDCG@10 per round for every method (the metric the tables report)."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, curves in curves_by_method.items():
        rounds, macro = macro_per_round(curves)
        axis.plot(rounds, macro, marker="o", label=method)
    axis.set_title("Test NDCG@10 per round, macro over the markets that replied")
    axis.set_xlabel("round")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("macro test NDCG@10")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def plot_rounds(curves_by_method: dict[str, dict[str, Curve]], path: Path) -> None:
    """Write :func:`rounds_figure` to ``path``."""
    figure = rounds_figure(curves_by_method)
    figure.savefig(path, dpi=120)
    plt.close(figure)
