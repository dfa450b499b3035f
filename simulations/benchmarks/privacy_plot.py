"""The privacy sweep's figure: NDCG@10 against epsilon per market and macro, and retention of the gain.

:func:`plot` draws ``OUT/privacy.png`` from the report :mod:`simulations.benchmarks.privacy_sweep` writes
to ``results.json``; the report's ``served`` and ``retention`` sections are optional.
"""

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator

from common.methods import transfer_variant


def budget_positions(labels: list[str]) -> dict[str, float]:
    """Where each budget sits on the log-2 epsilon axis; ``inf`` (no DP) one doubling past the largest."""
    finite = sorted(float(label) for label in labels if label != "inf")
    positions = {label: float(label) for label in labels if label != "inf"}
    if "inf" in labels:
        positions["inf"] = 2 * finite[-1] if finite else 1.0
    return positions


def privacy_figure(report: dict[str, Any]) -> plt.Figure:
    """NDCG@10 against epsilon, one panel per market plus macro, and a retention panel.

    Every NDCG@10 panel shares one y-axis, so the drop under DP compares
    across markets; the retention panel (when the report has ``retention``)
    has its own, in percent, with the served model's retention per market and
    macro and a dashed line at 50%. The epsilon ticks are the budgets
    themselves, written as plain numbers, with ``inf`` (the run without DP) at
    the right end. The served line is drawn when the report has ``served``.
    The legend sits in a free panel, or below the panels when there is none.
    """
    runs, local, popular = report["runs"], report["local"], report["popular"]
    served, retained = report.get("served"), report.get("retention")
    transfer = transfer_variant(report.get("config", {}).get("method", ""))
    positions = budget_positions(list(runs))
    labels = sorted(positions, key=positions.get)
    markets = [*local["per_market"], "macro"]
    panels = len(markets) + (retained is not None)
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows + 0.6), squeeze=False)
    first = axes.flat[0]
    for index, (axis, market) in enumerate(zip(axes.flat, markets, strict=False)):

        def score(summary: dict[str, Any], key: str = "ndcg@10", market: str = market) -> float:
            return summary["macro"][key] if market == "macro" else summary["per_market"][market][key]

        if axis is not first:
            axis.sharey(first)
        if index % columns:
            axis.tick_params(labelleft=False)
        lines = [
            (runs, "o", "tab:blue", "federated, DP (inf: no DP)"),
            (popular, "x", "tab:orange", "popularity, DP (inf: exact)"),
        ]
        if served is not None:
            lines.append(
                (
                    served,
                    "s",
                    "tab:red",
                    f"served: local or {'private transfer' if transfer else 'federated'},\nchosen on validation",
                )
            )
        for summary, marker, color, label in lines:
            # Error bars: one standard deviation over seeds (none for one seed).
            axis.errorbar(
                [positions[b] for b in labels],
                [score(summary[b]) for b in labels],
                yerr=[score(summary[b], "ndcg@10 std") for b in labels],
                marker=marker,
                color=color,
                capsize=3,
                label=label,
            )
        if "inf" in runs:
            axis.axhline(score(runs["inf"]), linestyle="--", color="tab:green", label="federated, no DP")
        axis.axhline(score(local), linestyle=":", color="tab:gray", label="local only")
        epsilon_axis(axis, positions, labels)
        axis.set_title(market)
    for axis in axes[:, 0]:
        axis.set_ylabel("test NDCG@10")
    handles, names = first.get_legend_handles_labels()
    spare = list(axes.flat)[len(markets) :]
    kept = retention_panel(spare.pop(0), retained, positions, labels) if retained is not None else None
    for axis in spare:
        axis.axis("off")
    if kept is not None:  # the retention legend in a free panel of its own if there is one to spare, else inside
        kept_handles, kept_names = kept.get_legend_handles_labels()
        if len(spare) > 1:
            spare[1].legend(
                kept_handles,
                kept_names,
                loc="center",
                fontsize="small",
                ncol=2,
                title="retention of the gain",
                title_fontsize="small",
            )
        else:
            kept.legend(fontsize="x-small", ncol=2, loc="best")
    if spare:
        spare[0].legend(handles, names, loc="center", fontsize="small")
        figure.tight_layout()
    else:
        figure.legend(handles, names, loc="lower center", ncol=min(len(names), 3), fontsize="small")
        # Room below the panels for the legend's rows (the served entry takes two lines), in inches.
        figure.tight_layout(rect=(0, (0.1 + 0.22 * math.ceil(len(names) / 3)) / figure.get_figheight(), 1, 1))
    return figure


def epsilon_axis(axis: plt.Axes, positions: dict[str, float], labels: list[str]) -> None:
    """A log-2 epsilon x-axis ticked at the budgets, written as plain numbers."""
    axis.set_xscale("log", base=2)
    axis.set_xticks([positions[b] for b in labels], labels=labels)
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xlabel("epsilon")
    axis.grid(alpha=0.3)


def retention_panel(
    axis: plt.Axes, retained: dict[str, dict[str, Any]], positions: dict[str, float], labels: list[str]
) -> plt.Axes:
    """Draw on ``axis`` the served model's retention of the federation's gain against epsilon, in percent.

    One thin line per market, the macro thick and black, a dashed line at
    50%; the y-axis spans at least 0 to 100%. Returns ``axis`` (its legend is
    left to the caller).
    """

    def percent(value: float | None) -> float:
        return math.nan if value is None else 100 * value

    x = [positions[b] for b in labels]
    for market in next(iter(retained.values()))["per_market"]:
        axis.plot(
            x,
            [percent(retained[b]["per_market"][market]) for b in labels],
            marker=".",
            linewidth=1,
            alpha=0.7,
            label=market,
        )
    axis.plot(x, [percent(retained[b]["macro"]) for b in labels], marker="s", color="black", linewidth=2, label="macro")
    axis.axhline(50, linestyle="--", color="tab:gray", linewidth=1, label="50%")
    shown = [y for line in axis.get_lines() for y in line.get_ydata() if not math.isnan(y)]
    axis.set_ylim(min(-5.0, *(y - 5 for y in shown)), max(105.0, *(y + 5 for y in shown)))
    epsilon_axis(axis, positions, labels)
    axis.set_title("retention of the gain")
    axis.set_ylabel("retained gain (%)")
    return axis


def plot(report: dict[str, Any], path: Path) -> None:
    """Write :func:`privacy_figure` to ``path``."""
    figure = privacy_figure(report)
    figure.savefig(path, dpi=110)
    plt.close(figure)
