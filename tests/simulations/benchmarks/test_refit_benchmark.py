"""The refit benchmark: the future split, the negatives, the ranking of served scores, the report."""

import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest

from common.data.catalog import Catalog
from common.data.interactions import read_interactions
from common.data.split import NUM_NEGATIVES, split_market
from common.data.synthetic import SyntheticConfig, generate_markets
from common.runtime.command import OptionError
from simulations import run as harness_module
from simulations.benchmarks import command as benchmark
from simulations.benchmarks import refit_benchmark as refit
from simulations.benchmarks.continue_benchmark import write_market_file
from tests.in_process import in_process_federated


def market(rows: list[tuple[str, str, str | None]]) -> pd.DataFrame:
    """A market as read_interactions returns it, from (user, item, date) rows in file order."""
    return pd.DataFrame(
        {
            "user": [user for user, _, _ in rows],
            "item": [item for _, item, _ in rows],
            "rating": 5.0,
            "date": pd.to_datetime([date for _, _, date in rows]),
            "position": np.arange(len(rows), dtype=np.int64),
        }
    )


def test_the_future_is_each_users_latest_interaction_with_ties_broken_by_file_order():
    # Prepare: a's two latest share a date (z comes later in the file), b has one
    # interaction, c's undated interaction sorts before its dated one.
    interactions = market(
        [
            ("a", "x", "2020-01-02"),
            ("a", "z", "2020-01-03"),
            ("b", "x", "2020-01-05"),
            ("c", "x", None),
            ("a", "y", "2020-01-03"),
            ("a", "w", "2020-01-01"),
            ("c", "y", "2019-01-01"),
        ]
    )

    # Execute
    kept, future = refit.split_future(interactions)

    # Assert: a's future is y (the later of the tied rows), b's its only one, c's the dated one;
    # the rest stays in file order.
    assert list(zip(future["user"], future["item"], strict=True)) == [("a", "y"), ("b", "x"), ("c", "y")]
    assert kept["position"].tolist() == [0, 1, 3, 5]


def test_the_future_is_the_item_the_harness_split_holds_out_for_test():
    # Prepare: three users with three or more interactions, a tie on u1's latest date.
    interactions = market(
        [
            ("u1", "i1", "2021-03-01"),
            ("u2", "i2", "2021-01-01"),
            ("u1", "i2", "2021-03-01"),
            ("u3", "i3", "2021-01-01"),
            ("u2", "i3", "2021-02-01"),
            ("u1", "i3", "2021-01-01"),
            ("u3", "i1", "2021-05-01"),
            ("u2", "i1", "2020-01-01"),
            ("u3", "i2", "2021-04-01"),
        ]
    )
    # The split needs NUM_NEGATIVES unseen items per user: 35 more users with three items each.
    fillers = market([(f"f{n // 3:02d}", f"n{n:03d}", "2000-01-01") for n in range(105)])
    padded = pd.concat([interactions, fillers], ignore_index=True).assign(position=lambda frame: np.arange(len(frame)))
    catalog = Catalog.from_items(padded["item"])

    # Execute
    _, future = refit.split_future(padded)
    split = split_market("m", padded, catalog, seed=0)

    # Assert: u1's tie goes to i2 (later in the file), u2's latest is i3, u3's i1 -- the split's test items.
    users = [split.user_ids[user] for user in split.test.users]
    tested = dict(zip(users, [catalog.item_ids[row] for row in split.test.candidates[:, 0]], strict=True))
    assert {user: tested[user] for user in ("u1", "u2", "u3")} == {"u1": "i2", "u2": "i3", "u3": "i1"}
    assert dict(zip(future["user"], future["item"], strict=True)) == tested


def test_the_kept_interactions_are_written_so_that_read_interactions_reads_them_back(tmp_path):
    # Prepare
    interactions = market([("a", "x", "2020-01-02"), ("a", "y", "2020-01-03"), ("b", "x", "2020-01-01")])
    kept, _ = refit.split_future(interactions.assign(rating=[1.0, 2.0, 3.0]))

    # Execute
    write_market_file(kept, tmp_path / "m.txt")
    read = read_interactions(tmp_path / "m.txt")

    # Assert: only a's earlier interaction is left, as it was.
    assert read[["user", "item", "rating"]].values.tolist() == [["a", "x", 1.0]]
    assert read["date"].tolist() == [pd.Timestamp("2020-01-02")]


def test_the_negatives_are_seeded_never_an_item_the_user_had_and_users_without_enough_are_counted():
    # Prepare: 200 items; u had 50 of them and its future, v had 5; w had 102 of them (98 left).
    items = [f"i{n:03d}" for n in range(200)]
    full = pd.DataFrame(
        {
            "user": ["u"] * 51 + ["v"] * 6 + ["w"] * 102,
            "item": items[:51] + items[100:106] + items[:102],
        }
    )
    future = pd.DataFrame({"user": ["w", "v", "u"], "item": ["i101", "i105", "i050"]})

    # Execute
    first = refit.draw_candidates("m", future, full, items, seed=3)
    again = refit.draw_candidates("m", future, full, items, seed=3)
    other = refit.draw_candidates("m", future, full, items, seed=4)

    # Assert: u and v are ranked, in ID order, the future item first; w is counted apart.
    assert first.users.tolist() == ["u", "v"] and first.too_few_items == 1
    assert first.items[:, 0].tolist() == ["i050", "i105"]
    had = {"u": set(items[:51]), "v": set(items[100:106])}
    for user, row in zip(first.users, first.items, strict=True):
        negatives = set(row[1:])
        assert len(negatives) == NUM_NEGATIVES and negatives <= set(items) and not negatives & had[user]
    # The same seed draws the same candidates (both phases rank these), another seed others.
    assert np.array_equal(first.items, again.items) and not np.array_equal(first.items, other.items)


class ScoreTable:
    """A served model that scores from a table: what evaluate asks of one."""

    def __init__(self, scores: dict[tuple[str, str], float], users: set[str], assortment: list[str]) -> None:
        self.scores, self.users, self.assortment = scores, users, assortment

    def known_users(self, user_ids):
        return np.asarray([user in self.users for user in user_ids])

    def score(self, pairs: pd.DataFrame) -> pd.DataFrame:
        values = [self.scores.get((u, i), 0.0) for u, i in zip(pairs["userId"], pairs["itemId"], strict=True)]
        return pairs.assign(score=values)


def test_evaluate_ranks_the_future_item_among_its_negatives_and_counts_who_it_cannot_rank():
    # Prepare: negatives score 0 unless set. u1's future tops its list (rank 0, gain 1); u2's
    # has one negative above and one tied (a tie counts above: rank 2, gain 1/log2(4) = 0.5);
    # u3's has 12 above (rank 12, outside the top 10: gain 0). u4 is unknown to the model;
    # u5's future item is not sold by the market.
    negatives = [f"n{n:02d}" for n in range(NUM_NEGATIVES)]
    users = ["u1", "u2", "u3", "u4", "u5"]
    futures = ["f1", "f2", "f3", "f4", "gone"]
    candidates = refit.FutureCandidates(
        users=np.asarray(users, dtype=object),
        items=np.asarray([[future, *negatives] for future in futures], dtype=object),
        too_few_items=0,
    )
    scores = {("u1", "f1"): 2.0, ("u2", "f2"): 1.0, ("u2", "n00"): 3.0, ("u2", "n01"): 1.0, ("u3", "f3"): 1.0}
    scores |= {("u3", negative): 5.0 for negative in negatives[:12]}
    model = ScoreTable(scores, {"u1", "u2", "u3", "u5"}, ["f1", "f2", "f3", "f4", *negatives])

    # Execute
    result = refit.evaluate(model, candidates)

    # Assert
    assert result["ndcg@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert result["hr@10"] == pytest.approx(2 / 3)
    assert (result["users"], result["unknown_users"], result["outside_assortment"]) == (3, 1, 1)


def test_the_report_keeps_a_failed_phases_error_and_the_other_phases_numbers():
    # Prepare: two markets ranked by no-refit; refit failed.
    def scored(ndcg: float, users: int) -> dict:
        return {"ndcg@10": ndcg, "hr@10": 0.5, "users": users, "unknown_users": 0, "outside_assortment": 1}

    evaluations = {"no-refit": {"a": scored(0.4, 10), "b": scored(0.2, 20)}}
    errors = {"refit": "--set serve-refit: the app config has no key 'serve-refit'."}

    # Execute
    report = refit.build_report(evaluations, errors, {"a": 12, "b": 21}, {"a": 1, "b": 0})
    text = refit.table({**report, "rounds": 3})

    # Assert: the macro is the mean over markets; refit has no numbers; its error is one line.
    assert report["macro"] == {"no-refit": pytest.approx(0.3), "refit": None, "difference": None}
    assert report["markets"]["a"]["no-refit"] == 0.4 and report["markets"]["a"]["refit"] is None
    assert (report["markets"]["b"]["users"], report["markets"]["b"]["future_users"]) == (20, 21)
    assert report["markets"]["a"]["too_few_items"] == 1
    assert report["markets"]["a"]["outside_assortment_by_phase"] == {"no-refit": 1}
    assert "| **macro** | 30 | 0.3000 | n/a | n/a | | |" in text
    assert [line for line in text.splitlines() if "failed" in line] == [f"refit failed: {errors['refit']}"]


def test_the_report_of_both_phases_has_their_difference():
    # Prepare
    evaluations = {
        phase: {"a": {"ndcg@10": ndcg, "hr@10": 1.0, "users": 4, "unknown_users": 0, "outside_assortment": 0}}
        for phase, ndcg in (("no-refit", 0.25), ("refit", 0.5))
    }

    # Execute
    report = refit.build_report(evaluations, {}, {"a": 4}, {"a": 0})

    # Assert
    assert report["macro"] == {"no-refit": 0.25, "refit": 0.5, "difference": 0.25}
    assert report["markets"]["a"]["difference"] == 0.25 and report["errors"] == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-server-rounds", "0"], "--num-server-rounds must be at least 1"),
        (["--set", "serve-refit=false"], "its refit phase sets it itself"),
    ],
)
def test_options_the_benchmark_cannot_run_with_are_refused_before_anything_is_written(tmp_path, options, message):
    # Prepare
    parser = argparse.ArgumentParser()
    refit.add_arguments(parser)
    args = parser.parse_args([*options, "--out", str(tmp_path / "out")])

    # Execute / Assert
    with pytest.raises(OptionError, match=message):
        refit.run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two harness runs of fedals (in this process)
@pytest.mark.usefixtures("server_task_identity")
def test_the_benchmark_ranks_every_users_future_with_and_without_the_refit(tmp_path, monkeypatch, capsys):
    # Prepare: the federated training in this process (a SuperLink and Ray cost ~30 s; test_simulation covers them).
    monkeypatch.setattr(harness_module, "run_federated", in_process_federated)

    # Two small generated markets, written as market files.
    config = SyntheticConfig(markets=2, items=300, largest_market_users=80, smallest_market_users=60)
    for name, frame in generate_markets(config).items():
        frame = frame.rename(columns={"userId": "user", "itemId": "item"})
        write_market_file(frame.assign(rating=frame["rating"].astype("float64")), tmp_path / "full" / f"{name}.txt")

    # Execute: one round.
    report = benchmark.main(
        ["refit", "--data-dir", str(tmp_path / "full"), "--num-server-rounds", "1", "--out", str(tmp_path / "out")]
    )

    # Assert: both phases ran, the refit's served models say so; each phase accounts for every user with a
    # future: ranked, unknown, their item not sold, or too few items.
    out = tmp_path / "out"
    written = json.loads((out / "refit.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert not written["errors"] and "Traceback" not in capsys.readouterr().out
    assert set(written["markets"]) == {"m00", "m01"}
    assert all(entry["rounds"] == 1 for entry in written["refit_manifests"]["refit"].values())
    for name, entry in written["markets"].items():
        full = read_interactions(tmp_path / "full" / f"{name}.txt")
        kept = read_interactions(out / "data" / f"{name}.txt")
        assert entry["future_users"] == full["user"].nunique() == len(full) - len(kept)
        for phase in ("no-refit", "refit"):
            apart = entry["unknown_users_by_phase"][phase] + entry["outside_assortment_by_phase"][phase]
            ranked = entry["users_by_phase"][phase]
            assert ranked + apart + entry["too_few_items"] == entry["future_users"]
            assert ranked > 0 and 0 <= entry[phase] <= 1
    for phase in ("no-refit", "refit"):
        assert written["macro"][phase] == pytest.approx(sum(e[phase] for e in written["markets"].values()) / 2)
        assert not math.isnan(written["harness_macro_test_ndcg@10"][phase])
