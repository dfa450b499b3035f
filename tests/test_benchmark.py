"""A small quality benchmark on generated markets: the report's shape and its sums."""

import json
import statistics

import pytest
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

from common.ghost_norms import embedding_norm_sample, positionwise_linear_norm_sample
from common.model import CatalogEmbedding, PositionwiseLinear
from simulations import benchmark

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_quality_benchmark_reports_mean_and_std_over_seeds(tmp_path):
    # Execute: two seeds, three generated markets, one federated method.
    benchmark.main(["quality", "--synthetic-markets", "3", "--rounds", "2", "--seeds", "2",
                    "--methods", "local,pooled,fedper", "--out", str(tmp_path)])

    # Assert: the summary is the mean and std of the per-seed results.
    report = json.loads((tmp_path / "results.json").read_text())
    runs = report["runs"]
    per_seed = [run["methods"]["fedper"]["per_market"]["m00"]["ndcg@10"] for run in runs]
    summary = report["summary"]["fedper"]["per_market"]["m00"]["ndcg@10"]
    assert summary["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert summary["std"] == pytest.approx(statistics.stdev(per_seed))
    assert set(report["summary"]) == {"local", "pooled", "fedper", "selection"}
    assert report["acceptance"]["best_federated_method"] in {"fedper", "selection"}
    assert report["overhead"]["ratio"] > 0
    table = (tmp_path / "quality.md").read_text()
    assert "published best" in table and "0.379" in table


def test_dp_step_benchmark_times_both_norm_samplers_and_restores_the_projects():
    # Execute: a tiny batch, so that the timing itself is quick.
    report = benchmark.dp_step(benchmark.parse_args(["dp-step", "--synthetic-markets", "2", "--batch-size", "32",
                                               "--embedding-dim", "8", "--steps", "2", "--repeats", "2"]))

    # Assert: every block yields a ratio for each implementation, and later
    # DP-SGD in this process gets the project's norms back.
    assert len(report["ratios"]) == len(report["opacus_norms_ratios"]) == 2
    assert all(ratio > 0 for ratio in report["ratios"] + report["opacus_norms_ratios"])
    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS[CatalogEmbedding] is embedding_norm_sample
    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS[PositionwiseLinear] is positionwise_linear_norm_sample
