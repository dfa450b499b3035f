"""The privacy sweep end to end on generated markets, through Flower."""

import csv
import json

import pytest

from common.data.markets import MarketSource
from simulations import run as harness
from simulations.benchmarks import privacy_sweep
from tests.in_process import in_process_federated


@pytest.fixture(autouse=True)
def in_process(monkeypatch, server_task_identity):
    """The real apps in this process instead of a SuperLink and Ray: the sweep needs the outputs (the
    transport has its own tests)."""
    monkeypatch.setattr(harness, "run_federated", in_process_federated)


pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]  # whole sweeps of the real apps (tests/README.md)


def _users(market: str) -> int:
    return MarketSource("", 3, 0).interactions(market)["user"].nunique()


def test_sweep_writes_results_csv_and_plot_and_respects_every_budget(tmp_path):
    # The default method, fedals, with its private-transfer variant fedals-pt beside it.
    privacy_sweep.main(
        ["--dp-epsilons", "inf,2", "--synthetic-markets", "3", "--num-server-rounds", "2", "--out", str(tmp_path)]
    )

    report = json.loads((tmp_path / "results.json").read_text())
    assert report["config"]["method"] == "fedals"
    assert set(report["runs"]) == {"inf", "2"}
    for market, metrics in report["runs"]["2"]["per_market"].items():
        assert 0 < metrics["epsilon"] <= 2.0
        # The default delta: 0.1 / the user count the market released (noise of std 10 users).
        assert 0.1 / (_users(market) + 50) <= metrics["delta"] <= 0.1 / (_users(market) - 50)
    for metrics in report["runs"]["inf"]["per_market"].values():
        assert metrics["epsilon"] is None and metrics["delta"] is None
    for market, metrics in report["popular"]["2"]["per_market"].items():  # popularity released with the whole budget
        assert metrics["epsilon"] == pytest.approx(2.0, rel=0.01) and metrics["epsilon"] <= 2.0
        assert metrics["delta"] == pytest.approx(0.1 / _users(market))
    # Served: per market the validation-better of local and fedals-pt (ties to local), with its own test numbers.
    assert set(report["transfer"]) == set(report["served"]) == set(report["retention"]) == set(report["runs"])
    local = report["local"]["per_market"]
    for label, served in report["served"].items():
        for market, entry in served["per_market"].items():
            transfer = report["transfer"][label]["per_market"][market]
            wins = transfer["val-ndcg@10"] > local[market]["val-ndcg@10"]
            chosen = transfer if wins else local[market]
            assert entry["chosen"] == ("fedals-pt" if wins else "local")
            assert (entry["ndcg@10"], entry["val-ndcg@10"]) == (chosen["ndcg@10"], chosen["val-ndcg@10"])
            assert entry["epsilon"] == chosen["epsilon"]
            if label == "2" and wins:
                assert 0 < entry["epsilon"] <= 2.0
    for label, retained in report["retention"].items():
        assert set(retained["per_market"]) == set(local)
        gain = report["served"]["inf"]["macro"]["ndcg@10"] - report["local"]["macro"]["ndcg@10"]
        expected = (report["served"][label]["macro"]["ndcg@10"] - report["local"]["macro"]["ndcg@10"]) / gain
        assert retained["macro"] == (pytest.approx(expected) if gain > 0 else None)
    with (tmp_path / "sweep.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert {"delta", "chosen", "retention"} <= set(rows[0])
    assert {row["method"] for row in rows} == {"fedals", "fedals-pt", "popular", "served"}
    assert (tmp_path / "eps-2" / "results.csv").exists()
    assert (tmp_path / "privacy.png").stat().st_size > 0


def test_several_seeds_report_means_with_their_spread_and_keep_each_seeds_runs(tmp_path):
    # A DP-SGD method, which has no transfer variant: served chooses between local and fedper itself.
    report = privacy_sweep.main(
        [
            "--dp-epsilons",
            "2",
            "--synthetic-markets",
            "2",
            "--num-server-rounds",
            "1",
            "--num-seeds",
            "2",
            "--method",
            "fedper",
            "--out",
            str(tmp_path),
        ]
    )

    seeds = report["seeds"]
    assert sorted(seeds) == [0, 1]
    for market, metrics in report["runs"]["2"]["per_market"].items():
        values = [seeds[seed]["runs"]["2"]["per_market"][market]["ndcg@10"] for seed in (0, 1)]
        assert metrics["ndcg@10"] == pytest.approx(sum(values) / 2)
        assert metrics["ndcg@10 std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        assert metrics["val-ndcg@10"] == pytest.approx(
            sum(seeds[seed]["runs"]["2"]["per_market"][market]["val-ndcg@10"] for seed in (0, 1)) / 2
        )
        assert metrics["epsilon"] == max(seeds[seed]["runs"]["2"]["per_market"][market]["epsilon"] for seed in (0, 1))
        # Chosen per seed, then averaged; the choices joined in seed order.
        choices = [seeds[seed]["served"]["2"]["per_market"][market]["chosen"] for seed in (0, 1)]
        assert set(choices) <= {"local", "fedper"}
        assert report["served"]["2"]["per_market"][market]["chosen"] == ",".join(choices)
        assert report["served"]["2"]["per_market"][market]["ndcg@10"] == pytest.approx(
            sum(seeds[seed]["served"]["2"]["per_market"][market]["ndcg@10"] for seed in (0, 1)) / 2
        )
    assert report["transfer"] == {}
    assert "retention" not in report  # no inf among the budgets: nothing to measure the gain against
    assert (tmp_path / "seed-1" / "eps-2" / "results.csv").exists()
    assert "ndcg@10 std" in (tmp_path / "sweep.csv").read_text().splitlines()[0]
