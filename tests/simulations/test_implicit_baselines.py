"""implicit's ALS as references: implicit-local and implicit-pooled in the harness, served, never selected."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from common.data.markets import MarketSource
from common.ials.model import ITEM_TABLE
from common.methods import BASELINES, METHODS
from common.serving.query import load_served_model
from simulations import run as harness
from simulations.baselines import IMPLICIT_SETTINGS, implicit_missing
from simulations.benchmarks import command as benchmark
from tests.paths import REPO
from tests.served_check import served_test_ndcg

SOURCE = MarketSource("", 3, 0)
IMPLICIT = ("implicit-local", "implicit-pooled")


def _fake_federated(args, method, markets):
    """A federated method whose validation is worse than anything: the selection must fall back to local."""
    point = {"round": 1, "val-ndcg": 0.0, "val-hr": 0.0, "test-ndcg": 0.0, "test-hr": 0.0, "users": 1}
    return {market: [point] for market in SOURCE.markets}, [{"round": 1, "seconds": 0.5, "per_market": {}}]


@pytest.fixture(scope="module")
def implicit_run(tmp_path_factory):
    """One harness run: local (one epoch), a stand-in federated method and both implicit references."""
    pytest.importorskip("implicit.cpu.als")
    out = tmp_path_factory.mktemp("implicit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "run_federated", _fake_federated)
        results = harness.main(
            [
                "--synthetic-markets",
                "3",
                "--num-server-rounds",
                "1",
                "--embedding-dim",
                "8",
                "--history-length",
                "10",
                "--methods",
                "local,fedper,implicit-local,implicit-pooled",
                "--out",
                str(out),
            ]
        )
    return out, results


def test_both_references_report_every_market_after_their_tuned_iterations(implicit_run):
    _, results = implicit_run

    for method in IMPLICIT:
        summary = results["methods"][method]
        assert sorted(summary["per_market"]) == SOURCE.markets
        for metrics in summary["per_market"].values():
            assert 0 < metrics["ndcg@10"] <= 1 and 0 < metrics["val-ndcg@10"] <= 1
            assert metrics["round"] == IMPLICIT_SETTINGS[method].iterations
            assert "full-ndcg@10" in metrics  # evaluated as every other method: sampled and full ranking
        assert summary["seconds"] > 0


def test_every_served_model_reproduces_the_test_ndcg_results_report(implicit_run):
    out, results = implicit_run
    catalog = SOURCE.catalog()

    for method in IMPLICIT:
        for market, reported in results["methods"][method]["per_market"].items():
            # Execute: score the market's test candidates with its served model.
            served, ndcg = served_test_ndcg(out / "models" / method / market, SOURCE, market, catalog)

            # Assert
            assert served.manifest["method"] == method
            assert ndcg == pytest.approx(reported["ndcg@10"], abs=1e-6), (method, market)


def test_pooled_shares_its_item_factors_across_markets_and_local_does_not(implicit_run):
    out, _ = implicit_run
    catalog = SOURCE.catalog()

    def tables(method: str) -> list[np.ndarray]:
        return [
            load_served_model(out / "models" / method / market, catalog).model.state_dict()[ITEM_TABLE].numpy()
            for market in SOURCE.markets
        ]

    pooled, local = tables("implicit-pooled"), tables("implicit-local")
    assert np.abs(pooled[0]).max() > 0
    for table in pooled[1:]:
        np.testing.assert_array_equal(table, pooled[0])
    assert not np.array_equal(local[0], local[1])


def test_the_selection_never_picks_a_reference(implicit_run):
    _, results = implicit_run
    selection = results["methods"]["selection"]

    assert selection["candidates"] == ["local", "fedper"]
    assert {entry["chosen"] for entry in selection["per_market"].values()} == {"local"}
    # Not trivially so: an implicit reference beats local on validation somewhere.
    assert any(
        results["methods"][method]["per_market"][market]["val-ndcg@10"]
        > results["methods"]["local"]["per_market"][market]["val-ndcg@10"]
        for method in IMPLICIT
        for market in SOURCE.markets
    )
    assert not set(BASELINES) & set(METHODS)


def test_the_quality_benchmark_tables_the_references_and_judges_only_federated_methods(
    implicit_run, tmp_path, monkeypatch
):
    # Prepare: every seed's harness run is the fixture's (the benchmark's own code does the rest).
    _, results = implicit_run
    monkeypatch.setattr(benchmark.harness, "main", lambda argv: copy.deepcopy(results))

    # Execute
    benchmark.main(
        [
            "quality",
            "--num-seeds",
            "2",
            "--methods",
            "local,fedper,implicit-local,implicit-pooled",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["summary"]) >= {*IMPLICIT, "local", "fedper", "selection"}
    assert report["acceptance"]["best_federated_method"] in {"fedper", "selection"}
    macro = report["summary"]["implicit-pooled"]["macro"]["ndcg@10"]["mean"]
    assert report["acceptance"]["macro_relative_to_implicit-pooled"] == pytest.approx(
        report["acceptance"]["macro_ndcg@10"] / macro
    )
    header = (tmp_path / "quality.md").read_text().splitlines()[0]
    assert "implicit-local" in header and "implicit-pooled" in header  # the same table


def test_without_implicit_the_harness_refuses_the_references_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "implicit", None)  # import implicit now fails

    assert implicit_missing() is not None
    with pytest.raises(SystemExit):
        harness.parse_args(["--methods", "local,implicit-pooled"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "implicit-pooled" in error and 'pip install ".[benchmark]"' in error
    harness.parse_args(["--methods", "local,pooled-ials"])  # the other methods do not need it


def test_the_apps_and_the_harness_do_not_import_implicit():
    code = (
        "import sys, clients.client_app, server.server_app, simulations.run, simulations.benchmark; "
        "sys.exit('implicit' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0
