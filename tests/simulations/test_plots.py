"""The two plots a user reads: rounds.png of the harness and privacy.png of the privacy sweep."""

import matplotlib.pyplot as plt
import pytest

from simulations.benchmarks.privacy_plot import plot, privacy_figure
from simulations.results import macro_per_round, plot_rounds, rounds_figure


def _point(round_: int, val: float, test: float) -> dict[str, float]:
    return {"round": round_, "val-ndcg": val, "val-hr": val, "test-ndcg": test, "test-hr": test, "users": 10}


def _summary(markets: dict[str, float]) -> dict:
    per_market = {m: {"ndcg@10": v, "ndcg@10 std": 0.01, "hr@10": v, "hr@10 std": 0.0} for m, v in markets.items()}
    macro = sum(markets.values()) / len(markets)
    return {"per_market": per_market, "macro": {"ndcg@10": macro, "ndcg@10 std": 0.0, "hr@10": macro}}


def _report(markets: list[str], budgets: list[str]) -> dict:
    # Markets of very different levels, so per-panel y-axes would each pick their own scale.
    level = {m: 0.1 + 0.3 * i for i, m in enumerate(markets)}
    step = {label: (0.0 if label == "inf" else 0.05 / float(label)) for label in budgets}
    return {
        "local": _summary({m: level[m] - 0.01 for m in markets}),
        "runs": {b: _summary({m: level[m] - step[b] for m in markets}) for b in budgets},
        "popular": {b: _summary({m: level[m] - 0.02 - step[b] for m in markets}) for b in budgets},
    }


def test_rounds_macro_divides_by_the_markets_that_replied_that_round():
    # Prepare: market b did not reply in round 2.
    curves = {
        "a": [_point(0, 0.9, 0.2), _point(1, 0.9, 0.4), _point(2, 0.9, 0.6)],
        "b": [_point(0, 0.9, 0.4), _point(1, 0.9, 0.6)],
    }

    # Execute
    rounds, macro = macro_per_round(curves)

    # Assert: round 2 is a's value alone, not a's value over two markets.
    assert rounds == [0, 1, 2]
    assert macro == pytest.approx([0.3, 0.5, 0.6])


def test_rounds_plot_shows_the_test_metric_the_tables_report_with_a_title(tmp_path):
    # Prepare: validation and test differ, so the plotted line shows which one it holds.
    curves = {"fedrep": {"a": [_point(0, 0.9, 0.2), _point(1, 0.8, 0.3)], "b": [_point(0, 0.7, 0.4)]}}

    # Execute
    figure = rounds_figure(curves)
    plot_rounds(curves, tmp_path / "rounds.png")

    # Assert
    axis = figure.axes[0]
    (line,) = axis.get_lines()
    assert list(line.get_ydata()) == pytest.approx([0.3, 0.3])
    assert "test" in axis.get_ylabel() and "validation" not in axis.get_ylabel()
    assert axis.get_title()
    assert (tmp_path / "rounds.png").stat().st_size > 0
    plt.close(figure)


def test_privacy_panels_share_one_y_axis():
    # Prepare
    report = _report(["ca", "de", "jp"], ["inf", "8", "4", "2", "1"])

    # Execute
    figure = privacy_figure(report)

    # Assert: every panel is joined to the first one's y-axis and shows the same limits.
    first = figure.axes[0]
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert len(panels) == 4  # three markets and the macro
    for axis in panels:
        assert first.get_shared_y_axes().joined(first, axis)
        assert axis.get_ylim() == first.get_ylim()
    plt.close(figure)


def test_privacy_epsilon_ticks_are_plain_numbers_with_inf_at_the_end():
    # Prepare
    report = _report(["ca", "de"], ["inf", "8", "4", "2", "1"])

    # Execute
    figure = privacy_figure(report)
    figure.canvas.draw()

    # Assert
    for axis in (a for a in figure.axes if a.get_title()):
        assert [tick.get_text() for tick in axis.get_xticklabels()] == ["1", "2", "4", "8", "inf"]
        assert not axis.get_xticklabels(minor=True)
    plt.close(figure)


@pytest.mark.parametrize(("markets", "free_panel"), [(["ca", "de", "fr", "in"], True), (["ca", "de", "fr"], False)])
def test_privacy_legend_sits_outside_every_data_panel(markets, free_panel):
    # Prepare: 4 markets + macro leave free panels in a second row of 4; 3 markets + macro fill one row.
    report = _report(markets, ["inf", "2"])

    # Execute
    figure = privacy_figure(report)

    # Assert: no panel that shows data carries a legend; the legend is in the free panel or the figure's.
    data_panels = [axis for axis in figure.axes if axis.get_title()]
    assert all(axis.get_legend() is None for axis in data_panels)
    free = [axis for axis in figure.axes if not axis.get_title() and axis.get_legend() is not None]
    assert (len(free) == 1) is free_panel
    assert (len(figure.legends) == 1) is not free_panel
    plt.close(figure)


def test_privacy_plot_writes_the_file(tmp_path):
    # Prepare
    report = _report(["ca"], ["8", "1"])  # no run without DP: no inf tick

    # Execute
    plot(report, tmp_path / "privacy.png")

    # Assert
    assert (tmp_path / "privacy.png").stat().st_size > 0
