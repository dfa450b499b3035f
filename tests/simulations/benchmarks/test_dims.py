"""The dims benchmark: one fedals run per d on the same split; bytes grow with d."""

import json

import pytest

from simulations import run as harness_module
from simulations.benchmarks import command as benchmark
from tests.in_process import in_process_federated


@pytest.mark.usefixtures("server_task_identity")
def test_dims_runs_fedals_at_each_d_and_reports_quality_seconds_and_bytes(tmp_path, monkeypatch):
    # Prepare: the federation in this process; every item leaves its market (min buyers 1).
    monkeypatch.setattr(harness_module, "run_federated", in_process_federated)
    argv = ["dims", "--synthetic-markets", "2", "--dims", "4,16", "--num-server-rounds", "2"]

    # Execute
    report = benchmark.main([*argv, "--als-min-buyers", "1", "--out", str(tmp_path)])

    # Assert: a row per d, each the macro of its own run's results, and a wider factor costs more bytes.
    assert list(report["dims"]) == ["4", "16"]
    for d, row in report["dims"].items():
        results = json.loads((tmp_path / f"d{d}" / "results.json").read_text())
        assert row["test-ndcg@10"] == pytest.approx(results["methods"]["fedals"]["macro"]["ndcg@10"])
        assert 0 < row["val-ndcg@10"] <= 1 and row["seconds-per-round"] > 0
    small, large = report["dims"]["4"], report["dims"]["16"]
    assert large["upload-bytes-per-interaction"] > 2 * small["upload-bytes-per-interaction"]
    assert large["download-bytes-per-round"] > small["download-bytes-per-round"]
    assert json.loads((tmp_path / "dims.json").read_text()) == report
    assert "| 16 |" in (tmp_path / "dims.md").read_text()
