"""A small quality benchmark on generated markets: the report's shape and its sums."""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import psutil
import pytest
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split
from common.neural.model import CatalogEmbedding, PositionwiseLinear
from common.privacy.ghost_norms import embedding_norm_sample, positionwise_linear_norm_sample
from simulations import run as harness_module
from simulations.benchmarks import command as benchmark
from simulations.benchmarks import memory, scale_benchmark
from simulations.run import main as run_harness
from tests.in_process import in_process_federated

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.usefixtures("server_task_identity")
def test_quality_benchmark_reports_mean_and_std_over_seeds(tmp_path, monkeypatch):
    # Prepare: the federated training in this process (a SuperLink and Ray cost ~25 s a seed; test_simulation
    # covers them).
    monkeypatch.setattr(harness_module, "run_federated", in_process_federated)

    # Execute: two seeds, three generated markets, the default federated method and two references.
    benchmark.main(
        [
            "quality",
            "--synthetic-markets",
            "3",
            "--num-server-rounds",
            "2",
            "--num-seeds",
            "2",
            "--methods",
            "fedals,local,pooled-ials",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert: the summary is the mean and std of the per-seed results.
    report = json.loads((tmp_path / "results.json").read_text())
    runs = report["runs"]
    per_seed = [run["methods"]["fedals"]["per_market"]["m00"]["ndcg@10"] for run in runs]
    summary = report["summary"]["fedals"]["per_market"]["m00"]["ndcg@10"]
    assert summary["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert summary["std"] == pytest.approx(statistics.stdev(per_seed))
    assert set(report["summary"]) == {"fedals", "local", "pooled-ials", "selection"}
    assert report["acceptance"]["best_federated_method"] in {"fedals", "selection"}
    best = report["acceptance"]["best_federated_method"]
    macro = {method: report["summary"][method]["macro"]["ndcg@10"]["mean"] for method in (best, "pooled-ials")}
    assert report["acceptance"]["macro_relative_to_pooled-ials"] == pytest.approx(macro[best] / macro["pooled-ials"])
    assert report["overhead"]["ratio"] > 0
    table = (tmp_path / "quality.md").read_text()
    assert "published best" in table and "0.379" in table


def test_dp_step_benchmark_times_both_norm_samplers_and_restores_the_projects():
    # Execute: a tiny batch, so that the timing itself is quick.
    report = benchmark.dp_step(
        benchmark.parse_args(
            [
                "dp-step",
                "--synthetic-markets",
                "2",
                "--dp-batch-size",
                "32",
                "--embedding-dim",
                "8",
                "--steps",
                "2",
                "--repeats",
                "2",
            ]
        )
    )

    # Assert: every block yields a ratio for each implementation, and later
    # DP-SGD in this process gets the project's norms back.
    assert len(report["ratios"]) == len(report["opacus_norms_ratios"]) == 2
    assert all(ratio > 0 for ratio in report["ratios"] + report["opacus_norms_ratios"])
    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS[CatalogEmbedding] is embedding_norm_sample
    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS[PositionwiseLinear] is positionwise_linear_norm_sample


@pytest.mark.usefixtures("server_task_identity")
def test_join_benchmark_reports_join_and_local_per_fraction_and_local_matches_the_harness_baseline(
    tmp_path, monkeypatch
):
    # Prepare: the federated training in this process (a SuperLink and Ray cost ~30 s; test_simulation covers them).
    monkeypatch.setattr(harness_module, "run_federated", in_process_federated)

    # Execute: one held-out market of three generated ones, one round, two fractions.
    benchmark.main(
        [
            "join",
            "--synthetic-markets",
            "3",
            "--markets",
            "m02",
            "--num-server-rounds",
            "1",
            "--join-epochs",
            "1",
            "--fine-tune-epochs",
            "1",
            "--fractions",
            "0.5,1",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert: join.json has the shape, the macro is the mean over the
    # held-out markets, and the wins are counted from the numbers beside them.
    written = json.loads((tmp_path / "join.json").read_text())
    assert written["markets"].keys() == {"m02"} and written["macro"].keys() == {"0.5", "1.0"}
    for fraction in ("0.5", "1.0"):
        entry = written["markets"]["m02"][fraction]
        assert written["macro"][fraction]["join"] == pytest.approx(entry["join"])
        assert written["wins"][fraction]["markets"] == int(entry["join"] > entry["local"])
    assert written["markets"]["m02"]["0.5"]["train-users"] < written["markets"]["m02"]["1.0"]["train-users"]
    assert (tmp_path / "join.png").stat().st_size > 0 and "| m02 |" in (tmp_path / "join.md").read_text()
    # The federation that published the shared part never saw the joining market.
    without = json.loads((tmp_path / "without-m02" / "results.json").read_text())
    assert without["config"]["markets"] == ["m00", "m01"]
    # local on every user is the harness's own local baseline, trained the same way.
    harness = run_harness(
        [
            "--data-dir",
            str(tmp_path / "data"),
            "--methods",
            "local",
            "--num-server-rounds",
            "1",
            "--out",
            str(tmp_path / "local"),
        ]
    )
    assert entry["local"] == pytest.approx(harness["methods"]["local"]["per_market"]["m02"]["ndcg@10"], abs=1e-6)


def test_scale_proportionality_tells_bytes_per_touched_item_from_a_catalog_sized_payload():
    # Prepare: markets touching 10, 20 and 40 items; one payload of 8 bytes per touched item,
    # one of 1,000 bytes whatever the market touches (a catalog-sized message).
    traffic = {
        market: {"touched-items": items, "upload-bytes": 8.0 * items, "download-bytes": 1000.0}
        for market, items in {"a": 10, "b": 20, "c": 40}.items()
    }

    # Execute
    per_item = scale_benchmark.proportionality(traffic, "upload")
    per_catalog = scale_benchmark.proportionality(traffic, "download")

    # Assert: exact proportionality has slope 8, r² 1 and one cost per item; the flat payload
    # costs 4x more per item in the smallest market than in the largest.
    assert per_item == {
        "bytes-per-touched-item": pytest.approx(8.0),
        "r2": pytest.approx(1.0),
        "max-over-min-bytes-per-touched-item": pytest.approx(1.0),
    }
    assert per_catalog["max-over-min-bytes-per-touched-item"] == pytest.approx(4.0)
    assert per_catalog["r2"] < 0.5


def test_the_memory_sampler_sees_a_childs_memory_and_stops_it_above_the_limit():
    # Prepare: a child that holds 300 MiB of touched memory until it is killed.
    holder = "import time; block = b'x' * (300 * 2**20); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        # Execute: sample with a limit of 200 MiB above what this process already takes.
        own = memory._pss(os.getpid(), psutil.Process().memory_info().rss)  # what the sampler sums
        assert child.stdout.readline().strip() == "ready"
        with memory.TreeMemorySampler(interval=0.05, limit_bytes=own + 200 * 2**20) as sampler:
            deadline = time.monotonic() + 20
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)

        # Assert: the child's 300 MiB showed in both peaks, and the child was killed for it.
        assert sampler.exceeded and child.returncode is not None and child.returncode < 0
        assert sampler.peak_pss_bytes >= own + 250 * 2**20 and sampler.peak_bytes >= sampler.peak_pss_bytes
    finally:
        child.kill()
        child.wait()


# The scale tests' federation: 2 markets over 3,000 catalog items, 60 users in the larger.
SCALE_SIZE = ["--synthetic-markets", "2", "--items", "3000", "--largest-market-users", "60"]


def assert_reference_and_ratios(written: dict, methods: list[str]) -> None:
    """The reference's numbers are finite and positive, and each ratio is the quotient of the reported numbers."""
    reference = written["references"]["implicit-pooled"]
    assert "error" not in reference, reference.get("error")
    assert reference["threads"] == scale_benchmark.federation_workers(2) >= 1
    for key in ("macro-ndcg@10", "seconds-per-iteration"):
        assert math.isfinite(reference[key]) and reference[key] > 0
    for method in methods:
        entry = written["methods"][method]
        assert entry["ndcg-ratio-to-implicit"] == pytest.approx(entry["macro-ndcg@10"] / reference["macro-ndcg@10"])
        assert entry["round-to-iteration-ratio"] == pytest.approx(
            statistics.fmean(entry["seconds-per-round"]) / reference["seconds-per-iteration"]
        )


def _fake_federated(args, method, markets):
    """A federated method of fixed quality and round time, with traffic for every market."""
    point = {"round": 1, "val-ndcg": 0.2, "val-hr": 0.4, "test-ndcg": 0.1, "test-hr": 0.3, "users": 1}
    traffic = {market: {"download-bytes": 1000.0, "upload-bytes": 500.0} for market in markets}
    return {market: [point] for market in markets}, [{"round": 1, "seconds": 0.5, "per_market": traffic}]


def test_the_scale_benchmarks_reference_is_implicit_pooled_on_the_same_split_and_candidates(tmp_path, monkeypatch):
    # Prepare: the federated method stands in (the slow test below runs the real one); implicit is real.
    pytest.importorskip("implicit.cpu.als")
    monkeypatch.setattr(harness_module, "run_federated", _fake_federated)

    # Execute
    report = benchmark.main(
        ["scale", *SCALE_SIZE, "--num-server-rounds", "1", "--methods", "fedals", "--out", str(tmp_path)]
    )

    # Assert: scale.json has the reference and the ratios, computed from the numbers beside them.
    written = json.loads((tmp_path / "scale.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert_reference_and_ratios(written, ["fedals"])
    assert written["methods"]["fedals"]["ndcg-ratio-to-implicit"] == pytest.approx(
        0.1 / written["references"]["implicit-pooled"]["macro-ndcg@10"]
    )
    assert "implicit-pooled (reference" in (tmp_path / "scale.md").read_text()
    # The same number as the harness's own implicit-pooled on these files (same split and candidates).
    markets = tmp_path / "data" / "markets"
    harness = run_harness(["--data-dir", str(markets), "--methods", "implicit-pooled", "--out", str(tmp_path / "h")])
    assert written["references"]["implicit-pooled"]["macro-ndcg@10"] == pytest.approx(
        harness["methods"]["implicit-pooled"]["macro"]["ndcg@10"]
    )
    # The federated markets split under the company catalog (catalog-path), the reference under the
    # catalog of the products sold: the same evaluation candidates, item for item.
    source = MarketSource(str(markets), seed=0)
    company, sold = Catalog.load(tmp_path / "data" / "catalog.txt"), source.catalog()
    assert company.size > sold.size
    for market in source.markets:
        by_company, by_sold = load_split(source, market, company), load_split(source, market, sold)
        for part in ("valid", "test"):
            ids = [
                [catalog.item_ids[row] for row in getattr(split, part).candidates.ravel()]
                for catalog, split in ((company, by_company), (sold, by_sold))
            ]
            assert ids[0] == ids[1]


def test_the_scale_benchmark_without_reference_reports_the_federated_numbers_only(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setattr(harness_module, "run_federated", _fake_federated)

    # Execute
    benchmark.main(
        [
            "scale",
            *SCALE_SIZE,
            "--num-server-rounds",
            "1",
            "--methods",
            "fedals",
            "--no-reference",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert
    written = json.loads((tmp_path / "scale.json").read_text())
    assert "references" not in written and "ndcg-ratio-to-implicit" not in written["methods"]["fedals"]


def test_the_scale_benchmarks_overhead_of_fedals_is_against_pooled_ials_iterations(tmp_path, monkeypatch):
    # Prepare: the federated method stands in at 0.5 s a round; pooled-ials, its work without Flower, is real.
    monkeypatch.setattr(harness_module, "run_federated", _fake_federated)

    # Execute
    report = benchmark.main(
        ["scale", *SCALE_SIZE, "--num-server-rounds", "2", "--methods", "fedals", "--local", "--no-reference"]
        + ["--out", str(tmp_path)]
    )

    # Assert: the ratio is fedals' round over pooled-ials' mean timed iteration (evaluation in, reading out).
    entry = report["methods"]["fedals"]
    results = json.loads((tmp_path / "fedals" / "results.json").read_text())
    iterations = results["methods"]["pooled-ials"]["iteration-seconds"]
    assert entry["in-process"] == "pooled-ials" and len(iterations) == 2
    assert entry["local-seconds-per-round-without-flower"] == pytest.approx(sum(iterations) / 2)
    assert entry["overhead-ratio"] == pytest.approx(0.5 / entry["local-seconds-per-round-without-flower"])
    assert sum(iterations) < results["methods"]["pooled-ials"]["seconds"]


@pytest.mark.slow  # the harness with a real SuperLink (tests/README.md)
def test_the_scale_benchmark_runs_fedals_over_a_catalog_larger_than_what_markets_sell(tmp_path):
    # Execute: the README's scale command at a small size: 2 markets, 3,000 catalog items, 1 round.
    report = benchmark.main(
        ["scale", *SCALE_SIZE, "--num-server-rounds", "1", "--methods", "fedals", "--out", str(tmp_path)]
    )

    # Assert: the shared table spans the whole catalog while each market sends and receives rows of
    # what it sells only; the report and its table are written, memory was sampled.
    entry = report["methods"]["fedals"]
    assert "error" not in entry, entry.get("error")
    catalog_rows = 3000 + 64
    for traffic in entry["traffic"].values():
        assert traffic["touched-items"] < 3000
        assert traffic["download-bytes"] < catalog_rows * 128 * 2  # less than the float16 catalog
    assert entry["peak-tree-pss-mib"] > 0 and entry["seconds-per-round"]
    assert (tmp_path / "scale.json").exists() and "fedals" in (tmp_path / "scale.md").read_text()
    # implicit-pooled ran on the same federation in the same run; the ratios are of the reported numbers.
    assert_reference_and_ratios(json.loads((tmp_path / "scale.json").read_text()), ["fedals"])


@pytest.mark.slow  # a loopback deployment: SuperLink and SuperNodes (tests/README.md)
def test_the_latency_benchmark_compares_both_round_loops_on_a_real_deployment(tmp_path):
    # Execute: the README's latency command at a small size: 2 regions, 1 round per setting.
    report = benchmark.main(
        ["latency", "--num-regions", "2", "--num-server-rounds", "1", "--embedding-dim", "8", "--out", str(tmp_path)]
    )

    # Assert: both settings ran and the ratios are of measured, positive times.
    assert set(report["settings"]) == {"flower-defaults", "tuned"}
    for result in report["settings"].values():
        assert result["mean_seconds_per_round"] > 0
    assert report["ratio_seconds_per_round"] > 0
    assert (tmp_path / "latency.json").exists()


def test_the_scale_benchmark_reuses_a_federation_generated_with_the_same_settings(tmp_path, monkeypatch):
    # Prepare: a federation generated once.
    parser = argparse.ArgumentParser()
    scale_benchmark.add_arguments(parser)
    args = parser.parse_args([*SCALE_SIZE, "--out", str(tmp_path)])
    first = scale_benchmark.write_federation(args, tmp_path / "data")

    # Execute: the same settings again, with generation made to fail.
    def refuse(*_args, **_kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(scale_benchmark, "write_markets", refuse)
    again = scale_benchmark.write_federation(args, tmp_path / "data")

    # Assert: read back, the same catalog and counts; a market file the stamp does not list, a
    # stamp that is not JSON, or other settings generate anew (the stale files removed first).
    assert again == first
    stale = tmp_path / "data" / "markets" / "m99.csv"
    stale.write_text("userId,itemId,rating\n")
    with pytest.raises(AssertionError, match="generated again"):
        scale_benchmark.write_federation(args, tmp_path / "data")
    assert not stale.exists()
    (tmp_path / "data" / "federation.json").write_text("{not json")
    with pytest.raises(AssertionError, match="generated again"):
        scale_benchmark.write_federation(args, tmp_path / "data")


@pytest.mark.parametrize(
    ("axis", "size"),
    [
        ("items", ["--synthetic-markets", "2", "--items", "6000", "--largest-market-users", "60"]),
        ("users", ["--synthetic-markets", "2", "--items", "3000", "--largest-market-users", "240"]),
        ("markets", ["--synthetic-markets", "5", "--items", "3000", "--largest-market-users", "60"]),
    ],
)
def test_each_axis_of_the_scale_tables_runs_small_against_implicit(tmp_path, monkeypatch, axis, size):
    # Prepare: docs/scale.md's tables grow one axis at a time; here each at a small size, the
    # federated method standing in (the slow test above runs the real one), implicit real.
    pytest.importorskip("implicit.cpu.als")
    monkeypatch.setattr(harness_module, "run_federated", _fake_federated)

    # Execute
    report = benchmark.main(["scale", *size, "--num-server-rounds", "1", "--methods", "fedals", "--out", str(tmp_path)])

    # Assert: the federation has the size asked on that axis, and the reference ran beside it.
    markets = tmp_path / "data" / "markets"
    users = {
        path.stem: len({line.split(",")[0] for line in path.read_text().splitlines()[1:]}) for path in markets.iterdir()
    }
    catalog = Catalog.load(tmp_path / "data" / "catalog.txt")
    expected = {
        "items": catalog.size >= 6000,
        "users": max(users.values()) == 240,
        "markets": len(report["interactions"]) == len(users) == 5,
    }
    assert expected[axis], (axis, catalog.size, users)
    assert_reference_and_ratios(json.loads((tmp_path / "scale.json").read_text()), ["fedals"])
