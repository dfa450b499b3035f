"""Results in the shape DESIGN.md fixes: results.json, a CSV and a readable table."""

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: the harness runs on machines without a screen
import matplotlib.pyplot as plt
import pandas as pd

Curve = list[dict[str, float]]  # one market's metrics per round, round 0 first


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
            }
            if "ft-test-ndcg" in metrics:
                point["fine-tuned"] = {key[3:]: value for key, value in metrics.items() if key.startswith("ft-")}
            curves.setdefault(market, []).append(point)
    return curves


def fine_tuned_curves(curves: dict[str, Curve]) -> dict[str, Curve]:
    """fedper-ft as a method of its own: each market's fork after the last round."""
    tuned = {}
    for market, curve in curves.items():
        final = curve[-1]
        if "fine-tuned" not in final:
            raise ValueError(f"Market '{market}' reported no fine-tuned metrics after the last round.")
        tuned[market] = [
            {"round": final["round"], "users": final["users"], "epsilon": final["epsilon"], "delta": final["delta"],
             **final["fine-tuned"]}
        ]
    return tuned


def select_on_validation(curve: Curve) -> dict[str, float]:
    """The trained point (round >= 1) with the best validation NDCG@10; test is never looked at."""
    trained = [point for point in curve if point["round"] >= 1]
    if not trained:
        raise ValueError("A curve needs at least one trained round to select from.")
    return max(trained, key=lambda point: point["val-ndcg"])


def method_summary(curves: dict[str, Curve], seconds: float) -> dict[str, Any]:
    """The ``methods.<name>`` entry of results.json."""
    per_market = {}
    for market in sorted(curves):
        best = select_on_validation(curves[market])
        per_market[market] = {
            "ndcg@10": best["test-ndcg"],
            "hr@10": best["test-hr"],
            "users": int(best["users"]),
            "epsilon": best.get("epsilon"),
            "delta": best.get("delta"),
            "round": int(best["round"]),
            "val-ndcg@10": best["val-ndcg"],
        }
    return {"per_market": per_market, "macro": _macro(per_market), "seconds": seconds}


def _macro(per_market: dict[str, dict[str, Any]]) -> dict[str, float]:
    count = len(per_market)
    return {
        "ndcg@10": sum(m["ndcg@10"] for m in per_market.values()) / count,
        "hr@10": sum(m["hr@10"] for m in per_market.values()) / count,
    }


def selection_summary(methods: dict[str, dict[str, Any]], candidates: list[str]) -> dict[str, Any]:
    """Each market keeps the candidate that is best on its own validation split.

    With ``local`` among the candidates no market ends up with a model it
    judges worse than training alone; ``chosen`` says which one it kept.
    """
    per_market = {}
    for market in methods[candidates[0]]["per_market"]:
        chosen = max(candidates, key=lambda name: methods[name]["per_market"][market]["val-ndcg@10"])
        per_market[market] = {**methods[chosen]["per_market"][market], "chosen": chosen}
    return {
        "per_market": per_market,
        "macro": _macro(per_market),
        "seconds": sum(methods[name]["seconds"] for name in candidates),
        "candidates": candidates,
    }


def results_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per (method, market) plus a ``macro`` row per method."""
    rows = []
    for method, summary in results["methods"].items():
        for market, metrics in summary["per_market"].items():
            rows.append({"method": method, "market": market, **metrics})
        rows.append({"method": method, "market": "macro", **summary["macro"]})
    return pd.DataFrame(rows)


def format_table(results: dict[str, Any], metric: str = "ndcg@10") -> str:
    """Markdown table: markets as rows, methods as columns, best method in bold."""
    frame = results_frame(results).pivot(index="market", columns="method", values=metric)
    markets = [m for m in frame.index if m != "macro"] + ["macro"]
    methods = list(results["methods"])
    frame = frame.loc[markets, methods]
    lines = [
        f"| {metric.upper()} (test) | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for market, row in frame.iterrows():
        best = row.max()
        cells = [f"**{value:.4f}**" if value == best else f"{value:.4f}" for value in row]
        lines.append(f"| {market} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path) -> str:
    """Write results.json, results.csv and results.md; return the printed table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    results_frame(results).to_csv(out / "results.csv", index=False)
    table = format_table(results, "ndcg@10") + "\n\n" + format_table(results, "hr@10")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    return table


def plot_rounds(curves_by_method: dict[str, dict[str, Curve]], path: Path) -> None:
    """Macro validation NDCG@10 per round for every method."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, curves in curves_by_method.items():
        rounds = sorted({point["round"] for curve in curves.values() for point in curve})
        macro = [
            sum(p["val-ndcg"] for curve in curves.values() for p in curve if p["round"] == r)
            / len(curves)
            for r in rounds
        ]
        axis.plot(rounds, macro, marker="o", label=method)
    axis.set_xlabel("round")
    axis.set_ylabel("macro validation NDCG@10")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
