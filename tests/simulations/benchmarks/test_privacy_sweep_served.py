"""The privacy sweep's served model, retention of the federation's gain, and their plot, on hand-made summaries."""

import matplotlib.pyplot as plt
import pytest

from simulations.benchmarks.privacy_plot import privacy_figure
from simulations.benchmarks.privacy_sweep import (
    NO_GAIN,
    mean_over_seeds,
    retention,
    retention_table,
    served_summary,
    sweep_frame,
    transfer_variant,
)


def _summary(per_market: dict[str, tuple[float, float]], epsilon: float | None = None) -> dict:
    """A harness-like method summary from (validation, test) NDCG@10 per market; HR@10 is the test value + 0.1."""
    markets = {
        m: {
            "ndcg@10": test,
            "hr@10": test + 0.1,
            "val-ndcg@10": val,
            "epsilon": epsilon,
            "delta": None if epsilon is None else 1e-4,
            "round": 3,
        }
        for m, (val, test) in per_market.items()
    }
    count = len(markets)
    macro = {metric: sum(m[metric] for m in markets.values()) / count for metric in ("ndcg@10", "hr@10")}
    return {"per_market": markets, "macro": macro}


def _served(ndcg: dict[str, float]) -> dict:
    return {
        "per_market": {m: {"ndcg@10": v} for m, v in ndcg.items()},
        "macro": {"ndcg@10": sum(ndcg.values()) / len(ndcg)},
    }


def test_fedals_has_its_private_transfer_variant_and_sgd_methods_have_none():
    assert transfer_variant("fedals") == "fedals-pt"
    assert transfer_variant("fedper") is None


def test_served_keeps_the_validation_better_model_with_its_test_numbers_and_ties_go_to_local():
    # Prepare: a: transfer better on validation but worse on test; b: a tie; c: local better on validation.
    local = _summary({"a": (0.30, 0.40), "b": (0.50, 0.20), "c": (0.60, 0.10)})
    transfer = _summary({"a": (0.35, 0.30), "b": (0.50, 0.90), "c": (0.55, 0.80)}, epsilon=7.9)

    # Execute
    served = served_summary(local, transfer, "fedals-pt")

    # Assert: the test numbers are the chosen model's, never the better test of the two.
    a, b, c = (served["per_market"][m] for m in "abc")
    assert a == {
        "ndcg@10": 0.30,
        "hr@10": pytest.approx(0.40),
        "val-ndcg@10": 0.35,
        "chosen": "fedals-pt",
        "epsilon": 7.9,
        "delta": 1e-4,
    }
    assert (b["chosen"], b["ndcg@10"], b["epsilon"]) == ("local", 0.20, None)
    assert (c["chosen"], c["ndcg@10"], c["val-ndcg@10"]) == ("local", 0.10, 0.60)
    assert served["macro"]["ndcg@10"] == pytest.approx((0.30 + 0.20 + 0.10) / 3)
    assert served["macro"]["hr@10"] == pytest.approx((0.40 + 0.30 + 0.20) / 3)


def test_served_refuses_summaries_of_different_markets():
    with pytest.raises(ValueError, match="same markets"):
        served_summary(_summary({"a": (0.1, 0.1)}), _summary({"b": (0.1, 0.1)}), "fedals-pt")


def test_retention_is_the_share_of_the_gain_at_inf_kept_per_market_and_of_the_macro_numbers():
    # Prepare: local a 0.30, b 0.50 (macro 0.40); served at inf a 0.40 (gain 0.10), b 0.50 (no gain).
    local = _served({"a": 0.30, "b": 0.50})
    served = {
        "inf": _served({"a": 0.40, "b": 0.50}),
        "8": _served({"a": 0.38, "b": 0.52}),
        "1": _served({"a": 0.28, "b": 0.50}),
    }

    # Execute
    retained = retention(served, local)

    # Assert
    assert list(retained) == ["inf", "8", "1"]
    assert retained["inf"]["per_market"]["a"] == pytest.approx(1.0)
    assert retained["8"]["per_market"]["a"] == pytest.approx(0.8)  # 0.08 of 0.10
    assert retained["1"]["per_market"]["a"] == pytest.approx(-0.2)  # below local
    assert all(retained[label]["per_market"]["b"] is None for label in retained)  # no gain at inf to retain
    # Macro from the macro numbers: local 0.40, inf 0.45, at 8 0.45 -> 1.0 (the mean of ratios would be undefined).
    assert retained["8"]["macro"] == pytest.approx((0.45 - 0.40) / (0.45 - 0.40))
    assert retained["1"]["macro"] == pytest.approx((0.39 - 0.40) / 0.05)


def test_retention_is_none_where_served_at_inf_is_below_local_and_needs_inf():
    local = _served({"a": 0.50})
    assert retention({"inf": _served({"a": 0.40}), "2": _served({"a": 0.45})}, local)["2"] == {
        "per_market": {"a": None},
        "macro": None,
    }
    with pytest.raises(ValueError, match="without DP"):
        retention({"8": _served({"a": 0.40})}, local)


def test_retention_table_has_budgets_as_columns_markets_and_macro_as_rows_in_percent():
    retained = {
        "inf": {"per_market": {"a": 1.0, "b": None}, "macro": 1.0},
        "2": {"per_market": {"a": 0.456, "b": None}, "macro": 0.5},
    }

    table = retention_table(retained)

    assert list(table.columns) == ["inf", "2"] and list(table.index) == ["a", "b", "macro"]
    assert table.loc["a", "2"] == "46%" and table.loc["b", "2"] == NO_GAIN and table.loc["macro", "inf"] == "100%"


def test_means_over_seeds_keep_validation_and_join_each_seeds_choice():
    # Prepare: two seeds' served summaries of one market, choosing differently.
    seeds = [
        served_summary(_summary({"a": (0.3, 0.4)}), _summary({"a": (0.5, 0.6)}, epsilon=3.0), "fedals-pt"),
        served_summary(_summary({"a": (0.3, 0.2)}), _summary({"a": (0.1, 0.6)}, epsilon=2.5), "fedals-pt"),
    ]

    # Execute
    mean = mean_over_seeds(seeds)

    # Assert
    entry = mean["per_market"]["a"]
    assert entry["ndcg@10"] == pytest.approx(0.4) and entry["val-ndcg@10"] == pytest.approx(0.4)
    assert entry["chosen"] == "fedals-pt,local"
    assert entry["epsilon"] == 3.0  # the most any seed's served model spent
    assert mean["macro"]["ndcg@10"] == pytest.approx(0.4)
    assert sweep_frame({"2": mean})["chosen"].tolist()[0] == "fedals-pt,local"


def _report(markets: list[str], budgets: list[str]) -> dict:
    local = _summary({m: (0.3, 0.3) for m in markets})
    runs = {b: _summary({m: (0.4, 0.45 if b == "inf" else 0.32) for m in markets}) for b in budgets}
    served = {b: served_summary(local, runs[b], "fedals-pt") for b in budgets}
    report = {"config": {"method": "fedals"}, "local": local, "runs": runs, "popular": runs, "served": served}
    report = {
        key: (
            {b: mean_over_seeds([s]) for b, s in value.items()}
            if key in ("runs", "popular", "served")
            else mean_over_seeds([value])
            if key == "local"
            else value
        )
        for key, value in report.items()
    }
    if "inf" in budgets:
        report["retention"] = retention(report["served"], report["local"])
    return report


@pytest.mark.parametrize("markets", [["ca", "de", "fr"], ["ca", "de", "fr", "in", "jp", "mx"]])
def test_privacy_figure_draws_served_everywhere_and_retention_in_a_panel_of_its_own_y_axis(markets):
    # Prepare: 3 markets + macro + retention leave free panels; 6 + macro + retention fill two rows of 4.
    report = _report(markets, ["inf", "8", "2"])

    # Execute
    figure = privacy_figure(report)

    # Assert
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_title()}
    assert set(panels) == {*markets, "macro", "retention of the gain"}
    first = panels[markets[0]]
    for name in [*markets, "macro"]:
        assert first.get_shared_y_axes().joined(first, panels[name])
        assert any(bars.get_label().startswith("served:") for bars in panels[name].containers)  # errorbar lines
        assert panels[name].get_legend() is None
    kept = panels["retention of the gain"]
    assert not first.get_shared_y_axes().joined(first, kept)
    assert kept.get_ylim() != first.get_ylim()
    assert any(list(line.get_ydata()) == [50, 50] for line in kept.get_lines())  # the 50% line
    assert len(figure.legends) == (1 if len(markets) == 6 else 0)
    plt.close(figure)


def test_privacy_figure_has_no_retention_panel_without_inf():
    figure = privacy_figure(_report(["ca", "de"], ["8", "2"]))
    assert "retention of the gain" not in [axis.get_title() for axis in figure.axes]
    plt.close(figure)
