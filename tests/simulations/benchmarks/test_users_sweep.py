"""The dp-users benchmark: where DP quality reaches 90% of non-private, by users per market."""

import csv
import json
import math

import pandas as pd
import pytest

from common.data.synthetic import SyntheticConfig, generate_markets
from common.runtime.command import OptionError
from simulations import run as harness_module
from simulations.benchmarks import command as benchmark
from simulations.benchmarks import users_sweep
from tests.cli_check import ENDS_WITH_DEFAULT, option_entries, run_help
from tests.in_process import in_process_federated
from tests.paths import XMARKET_DIR


def test_the_crossing_is_interpolated_on_log_users_between_the_sizes_around_it():
    # 0.8 at 1,000 and 0.95 at 100,000: 0.9 is 2/3 of the way in log(users),
    # 10 ** (3 + 2/3 * 2) = 10 ** (13/3) = 21,544.
    found = users_sweep.crossing([1000, 100_000], [0.8, 0.95])

    assert found["status"] == "interpolated" and found["between"] == [1000, 100_000]
    assert found["users"] == pytest.approx(10 ** (13 / 3))


def test_the_first_crossing_counts_and_an_exact_hit_lands_on_its_size():
    # 0.5, 0.7, 0.9, 0.95: 0.9 is first reached at 10,000 itself.
    found = users_sweep.crossing([100, 1000, 10_000, 100_000], [0.5, 0.7, 0.9, 0.95])
    assert found["users"] == pytest.approx(10_000)

    # A dip after the first crossing does not move it: 0.6 at 1,000, 1.2 at 10,000: halfway, 10 ** 3.5.
    found = users_sweep.crossing([1000, 10_000, 100_000], [0.6, 1.2, 0.85])
    assert found["users"] == pytest.approx(10**3.5)


def test_a_target_never_reached_or_reached_at_the_smallest_size_says_so():
    assert users_sweep.crossing([1000, 10_000, 100_000], [0.2, 0.5, 0.89]) == {"status": "not-reached", "users": None}
    assert users_sweep.crossing([1000, 10_000], [0.93, 0.97]) == {"status": "at-smallest", "users": 1000.0}
    assert "not reached up to 100,000" in users_sweep.describe(
        {"status": "not-reached", "users": None}, [1000, 100_000], 0.9
    )


def test_sizes_parse_sorted_and_bad_ones_are_refused():
    assert users_sweep.parse_users("100000, 1000,10000,1000") == [1000, 10_000, 100_000]
    for text in ("", "1000,lots", "3"):
        with pytest.raises(OptionError):
            users_sweep.parse_users(text)


def test_the_largest_size_alone_takes_fewer_markets_and_rounds():
    args = benchmark.parse_args(
        [
            "dp-users",
            "--users",
            "1000,100000",
            "--largest-markets",
            "2",
            "--largest-rounds",
            "5",
            "--num-server-rounds",
            "12",
        ]
    )

    small, large = (users_sweep.size_settings(args, size, 100_000) for size in (1000, 100_000))

    assert (small["markets"], small["rounds"]) == (4, 12)
    assert (large["markets"], large["rounds"]) == (2, 5)
    # Markets each sell the median market's items on average: a catalog of 2,179 / 0.76.
    assert small["items"] == large["items"] == round(2179 / 0.76)


def test_user_blocks_draw_the_same_markets_as_all_users_at_once():
    config = SyntheticConfig(
        markets=2, items=400, largest_market_users=130, smallest_market_users=130, mean_interactions=9, seed=3
    )

    whole = generate_markets(config)
    blocks = generate_markets(SyntheticConfig(**{**config.__dict__, "user_block": 50}))

    for market in whole:
        pd.testing.assert_frame_equal(whole[market], blocks[market])
    # Equal sizes: the power-law decay leaves every market at largest = smallest users.
    assert [table["userId"].nunique() for table in whole.values()] == [130, 130]


@pytest.mark.skipif(not XMARKET_DIR.is_dir(), reason="XMarket Electronics is not in ../shared/data")
def test_the_defaults_are_xmarket_electronics_median_market():
    shape = users_sweep.median_market_shape(XMARKET_DIR)

    assert shape["market"] == "de"
    assert shape["items"] == users_sweep.MEDIAN_MARKET_ITEMS
    assert round(shape["mean-interactions-per-user"]) == users_sweep.MEDIAN_MARKET_INTERACTIONS_PER_USER


@pytest.mark.slow  # a whole sweep of the real apps in this process (tests/README.md)
@pytest.mark.usefixtures("server_task_identity")
def test_a_small_sweep_runs_both_trainings_per_size_and_writes_its_report(tmp_path, monkeypatch):
    # Prepare: the federated trainings in this process (a SuperLink and Ray cost ~30 s a run).
    monkeypatch.setattr(harness_module, "run_federated", in_process_federated)

    # Execute: two sizes of two markets over a few hundred items, two rounds.
    report = benchmark.main(
        [
            "dp-users",
            "--users",
            "200,400",
            "--synthetic-markets",
            "2",
            "--items-per-market",
            "300",
            "--num-server-rounds",
            "2",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert: per size, a non-private and a DP run happened, and their ratio is the fraction.
    for size in ("200", "400"):
        plain = json.loads((tmp_path / f"users-{size}" / "non-private" / "results.json").read_text())
        private = json.loads((tmp_path / f"users-{size}" / "eps-8" / "results.json").read_text())
        assert plain["config"]["dp_epsilon"] == 0 and private["config"]["dp_epsilon"] == 8
        assert plain["config"]["markets"] == private["config"]["markets"] == ["m00", "m01"]
        entry = report["sizes"][size]
        for method in ("fedals", "fedals-pt"):
            fraction = entry["fraction"][method]
            assert math.isfinite(fraction) and fraction > 0
            assert fraction == pytest.approx(
                private["methods"][method]["macro"]["ndcg@10"] / plain["methods"][method]["macro"]["ndcg@10"]
            )
        assert entry["generated"]["m00"]["users"] == int(size)
        assert 0 < entry["dp"]["fedals"]["run-epsilon"] <= 8 and "run-epsilon" not in entry["non-private"]["fedals"]
    assert set(report["crossing"]) == {"fedals", "fedals-pt"}
    with open(tmp_path / "users.csv", encoding="utf-8") as table:
        rows = list(csv.DictReader(table))
    assert [(row["users"], row["method"]) for row in rows] == [
        ("200", "fedals"),
        ("200", "fedals-pt"),
        ("400", "fedals"),
        ("400", "fedals-pt"),
    ]
    assert (tmp_path / "users.png").stat().st_size > 0 and "| 400 |" in (tmp_path / "users.md").read_text()

    # Execute again: every run is reused, none trains.
    monkeypatch.setattr(harness_module, "main", lambda argv: pytest.fail(f"trained again: {argv}"))
    again = benchmark.main(
        [
            "dp-users",
            "--users",
            "200,400",
            "--synthetic-markets",
            "2",
            "--items-per-market",
            "300",
            "--num-server-rounds",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert again["sizes"]["400"]["fraction"] == entry["fraction"]


def test_xmfl_benchmark_dp_users_help_names_itself_and_shows_every_default(capsys):
    text = run_help(capsys, ["benchmark", "dp-users", "--help"])

    assert text.startswith("usage: xmfl benchmark dp-users ")
    options = option_entries(text)
    assert options and [entry for entry in options if not ENDS_WITH_DEFAULT.search(entry)] == []
