"""The privacy sweep end to end on generated markets, through Flower."""

import json

import pytest

from common.markets import MarketSource
from simulations import privacy_sweep

pytestmark = pytest.mark.filterwarnings("ignore")


def _users(market: str) -> int:
    return MarketSource("", 3, 0).interactions(market)["user"].nunique()


def test_sweep_writes_results_csv_and_plot_and_respects_every_budget(tmp_path):
    privacy_sweep.main(["--dp-epsilons", "inf,2", "--synthetic-markets", "3", "--num-server-rounds", "2", "--out", str(tmp_path)])

    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["runs"]) == {"inf", "2"}
    for market, metrics in report["runs"]["2"]["per_market"].items():
        assert 0 < metrics["epsilon"] <= 2.0
        assert metrics["delta"] == pytest.approx(0.1 / _users(market))  # the default delta
    for metrics in report["runs"]["inf"]["per_market"].values():
        assert metrics["epsilon"] is None and metrics["delta"] is None
    for market, metrics in report["popular"]["2"]["per_market"].items():  # popularity released with the whole budget
        assert metrics["epsilon"] == pytest.approx(2.0, rel=0.01) and metrics["epsilon"] <= 2.0
        assert metrics["delta"] == pytest.approx(0.1 / _users(market))
    assert "delta" in (tmp_path / "sweep.csv").read_text().splitlines()[0]
    assert (tmp_path / "eps-2" / "results.csv").exists()
    assert (tmp_path / "sweep.csv").stat().st_size > 0
    assert (tmp_path / "privacy.png").stat().st_size > 0


def test_several_seeds_report_means_with_their_spread_and_keep_each_seeds_runs(tmp_path):
    report = privacy_sweep.main(["--dp-epsilons", "2", "--synthetic-markets", "2", "--num-server-rounds", "1", "--num-seeds", "2",
                                 "--out", str(tmp_path)])

    seeds = report["seeds"]
    assert sorted(seeds) == [0, 1]
    for market, metrics in report["runs"]["2"]["per_market"].items():
        values = [seeds[seed]["runs"]["2"]["per_market"][market]["ndcg@10"] for seed in (0, 1)]
        assert metrics["ndcg@10"] == pytest.approx(sum(values) / 2)
        assert metrics["ndcg@10 std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        assert metrics["epsilon"] == max(seeds[seed]["runs"]["2"]["per_market"][market]["epsilon"] for seed in (0, 1))
    assert (tmp_path / "seed-1" / "eps-2" / "results.csv").exists()
    assert "ndcg@10 std" in (tmp_path / "sweep.csv").read_text().splitlines()[0]
