"""rerank in the harness: after fedals, a ranker per market, its curve in results.json, served and reported."""

import json

import pytest

from common.data.markets import MarketSource
from common.rerank.features import FEATURE_GROUPS
from common.rerank.ranker import RankerConfig
from common.rerank.served import load_rerank_model
from simulations import run as harness
from tests.conftest import server_task_identity
from tests.in_process import in_process_federated

SOURCE = MarketSource("", 3, 0)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_harness_refuses_rerank_without_fedals(capsys):
    # Prepare / Execute
    with pytest.raises(SystemExit):
        harness.parse_args(["--methods", "local,rerank"])

    # Assert
    assert "rerank re-ranks fedals's candidate lists: add fedals to --methods" in capsys.readouterr().err


@pytest.fixture(scope="module")
def rerank_run(tmp_path_factory):
    """One harness run on three generated markets: fedals (one round, in this process), then rerank.

    The rankers are kept small (at most 20 trees): the test is of the wiring, not of their quality.
    """
    out = tmp_path_factory.mktemp("rerank")
    server_task_identity.__wrapped__()  # the module's training runs before any test's own fixture
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "run_federated", in_process_federated)
        patch.setattr(harness, "RankerConfig", lambda seed: RankerConfig(seed=seed, max_trees=20, stopping_rounds=5))
        results = harness.main(
            [
                "--synthetic-markets",
                "3",
                "--rounds",
                "1",
                "--history-length",
                "10",
                "--methods",
                "fedals,rerank",
                "--set",
                "als-factors=8",
                "--out",
                str(out),
            ]
        )
    return out, results


@pytest.mark.slow
def test_rerank_reports_every_market_and_is_no_selection_candidate(rerank_run):
    # Prepare
    out, results = rerank_run

    # Execute
    summary = results["methods"]["rerank"]
    report = json.loads((out / "rerank.json").read_text(encoding="utf-8"))

    # Assert
    assert sorted(summary["per_market"]) == SOURCE.markets
    assert "selection" not in results["methods"]  # no local in the run; and rerank is never a candidate
    for market, metrics in summary["per_market"].items():
        entry = report["markets"][market]
        assert metrics["ndcg@10"] == pytest.approx(entry["test-ndcg@10"])
        # A market that fell back serves fedals' order: its test NDCG@10 is fedals' own.
        if entry["fallback"]:
            assert entry["test-ndcg@10"] == pytest.approx(entry["fedals-test-ndcg@10"])
        else:
            assert entry["holdout-ndcg@10"] > entry["holdout-fedals-ndcg@10"]
        variants = {f"without {group}" for group in FEATURE_GROUPS if group != "retrieval"} | {"retrieval only"}
        assert set(entry["ablation"]) == variants


@pytest.mark.slow
def test_every_served_rerank_reproduces_the_test_ndcg_results_report(rerank_run):
    # Prepare
    out, results = rerank_run
    catalog = SOURCE.catalog()

    for market, reported in results["methods"]["rerank"]["per_market"].items():
        # Execute
        model = load_rerank_model(out / "models" / "rerank" / market, catalog)

        # Assert
        assert model.manifest["market"] == market
        assert model.test_metrics().ndcg == pytest.approx(reported["ndcg@10"], abs=1e-6), market
        # The serving tables add each user's test interaction to what the test tables know.
        serving, at_test = model.serving_tables.user_offsets[-1], model.tables.user_offsets[-1]
        assert serving == at_test + len(model.test_users), market
