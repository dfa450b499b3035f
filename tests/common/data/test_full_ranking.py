"""Full-assortment metrics: evaluate() against a brute-force ranking by the model's own forward pass,
and their place in results.json, results.csv and results.md."""

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import common.neural.train as train_module
from common.data.markets import MarketSource, load_split
from common.data.metrics import hit_rate_at_k, ndcg_at_k
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import (
    MarketTensors,
    RankingMetrics,
    TrainConfig,
    evaluate,
    evenly_spaced,
    train_epochs,
)
from simulations.results import (
    FINE_TUNED,
    federated_curves,
    final_step_curves,
    method_summary,
    selection_summary,
    write_results,
)

OFFSET = 7  # as in the pooled baseline: the market's users sit after other markets' in the user table


@pytest.fixture(scope="module")
def trained():
    source = MarketSource("", synthetic_markets=2, seed=0)
    catalog = source.catalog()
    data = MarketTensors.from_split(load_split(source, "m01", catalog), history_length=10, user_offset=OFFSET)
    torch.manual_seed(0)
    model = SplitRecommender(
        ModelConfig(catalog.size, OFFSET + data.split.num_users, dim=8, history_length=10, user_embeddings=True)
    )
    train_epochs(model, [data], TrainConfig(epochs=2), seed=0)
    return model, data


def _brute_force_rank_bounds(model: SplitRecommender, data: MarketTensors, on_test: bool) -> tuple[np.ndarray, ...]:
    """Each user's rank among all market items by ``model.forward``, bracketed for float noise.

    The exclusions are rebuilt from the split itself: the user's training
    items, and the validation item on test.
    """
    split = data.split
    eval_set = split.test if on_test else split.valid
    items = split.market_items
    users = torch.as_tensor(eval_set.users) + OFFSET
    history, mask = data.user_history(users, for_test=on_test)
    candidates = torch.as_tensor(items).expand(len(users), -1)
    with torch.no_grad():
        scores = model.eval()(users, history, mask, candidates).numpy()
    validation_item = dict(zip(split.valid.users.tolist(), split.valid.candidates[:, 0].tolist(), strict=True))
    lower, upper = [], []
    for row, (user, positive) in enumerate(
        zip(eval_set.users.tolist(), eval_set.candidates[:, 0].tolist(), strict=True)
    ):
        excluded = set(split.train_items[split.train_users == user].tolist())
        if on_test:
            excluded.add(validation_item[user])
        keep = np.array([item not in excluded and item != positive for item in items.tolist()])
        positive_score = scores[row, np.searchsorted(items, positive)]
        others = scores[row, keep]
        lower.append(int((others > positive_score + 1e-5).sum()))
        upper.append(int((others >= positive_score - 1e-5).sum()))
    return np.array(lower), np.array(upper)


@pytest.mark.parametrize("on_test", [False, True], ids=["validation", "test"])
def test_full_metrics_match_a_brute_force_ranking_of_every_market_item(trained, on_test):
    # Prepare: the rank of each held-out item among all the market's items,
    # scored one (user, item) pair at a time by the model's forward pass.
    model, data = trained
    lower, upper = _brute_force_rank_bounds(model, data, on_test)

    # Execute
    metrics = evaluate(model, data, on_test=on_test)

    # Assert: a better rank earns more; float noise may only move near-ties.
    assert ndcg_at_k(upper) <= metrics.full_ndcg <= ndcg_at_k(lower)
    assert hit_rate_at_k(upper) <= metrics.full_recall <= hit_rate_at_k(lower)
    assert (upper - lower).sum() <= 2  # near-ties are rare: the bracket is tight
    assert 0.0 < metrics.full_recall < 1.0


@pytest.mark.parametrize("on_test", [False, True], ids=["validation", "test"])
def test_above_the_cap_only_evenly_spaced_users_are_ranked_in_full_and_every_user_is_sampled(
    trained, on_test, monkeypatch
):
    # Prepare: a cap of 7 users, below the market's count; the brute-force ranks of every user.
    model, data = trained
    lower, upper = _brute_force_rank_bounds(model, data, on_test)
    uncapped = evaluate(model, data, on_test=on_test)
    monkeypatch.setattr(train_module, "FULL_RANKING_USERS", 7)
    chosen = evenly_spaced(len(lower), 7)

    # Execute
    capped = evaluate(model, data, on_test=on_test)

    # Assert: the full metrics are those of the 7 chosen users; the sampled ones still count every user.
    assert len(chosen) == 7 < len(lower)
    assert ndcg_at_k(upper[chosen]) <= capped.full_ndcg <= ndcg_at_k(lower[chosen])
    assert hit_rate_at_k(upper[chosen]) <= capped.full_recall <= hit_rate_at_k(lower[chosen])
    assert (capped.ndcg, capped.hit_rate, capped.users) == (uncapped.ndcg, uncapped.hit_rate, uncapped.users)


@pytest.mark.parametrize("on_test", [False, True], ids=["validation", "test"])
def test_above_the_evaluated_cap_only_evenly_spaced_users_are_ranked(trained, on_test, monkeypatch):
    # Prepare: a cap of 9 users; each user's sampled rank by the model's forward pass, and the
    # brute-force full ranks, of every user.
    model, data = trained
    eval_set = data.split.test if on_test else data.split.valid
    users = torch.as_tensor(eval_set.users) + OFFSET
    history, mask = data.user_history(users, for_test=on_test)
    with torch.no_grad():
        scores = model.eval()(users, history, mask, torch.as_tensor(eval_set.candidates)).numpy()
    sampled_ranks = (scores[:, 1:] > scores[:, :1]).sum(axis=1)
    lower, upper = _brute_force_rank_bounds(model, data, on_test)
    monkeypatch.setattr(train_module, "EVALUATED_USERS", 9)
    monkeypatch.setattr(train_module, "FULL_RANKING_USERS", 4)
    chosen = evenly_spaced(len(users), 9)
    in_full = chosen[evenly_spaced(9, 4)]

    # Execute
    capped = evaluate(model, data, on_test=on_test)

    # Assert: the 9 evenly spaced users alone, and the full ranking of 4 spread among them
    assert capped.users == 9 < len(users)
    assert capped.ndcg == pytest.approx(ndcg_at_k(sampled_ranks[chosen]), abs=1e-6)
    assert ndcg_at_k(upper[in_full]) <= capped.full_ndcg <= ndcg_at_k(lower[in_full])


def test_evenly_spaced_are_all_up_to_the_cap_then_evenly_spaced_from_first_to_last():
    assert evenly_spaced(3, cap=5).tolist() == [0, 1, 2]
    assert evenly_spaced(5, cap=5).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(10, cap=4).tolist() == [0, 3, 6, 9]  # linspace(0, 9, 4)
    assert evenly_spaced(11, cap=1).tolist() == [0]
    with pytest.raises(ValueError, match="at least one user"):
        evenly_spaced(10, cap=0)


@pytest.mark.parametrize("on_test", [False, True], ids=["validation", "test"])
def test_full_ranking_ranks_lower_than_the_sampled_protocol(trained, on_test):
    # Sampled negatives are a subset of the full candidates: the full metrics can only be lower.
    model, data = trained

    metrics = evaluate(model, data, on_test=on_test)

    assert 0.0 <= metrics.full_ndcg <= metrics.full_recall <= 1.0
    assert metrics.full_ndcg <= metrics.ndcg + 1e-9
    assert metrics.full_recall <= metrics.hit_rate + 1e-9


def test_sampled_metrics_are_unchanged_by_the_full_ranking(trained):
    model, data = trained

    with_full = evaluate(model, data, on_test=True)
    without = evaluate(model, data, on_test=True, full=False)

    assert (without.ndcg, without.hit_rate, without.users) == (with_full.ndcg, with_full.hit_rate, with_full.users)
    assert math.isnan(without.full_ndcg) and math.isnan(without.full_recall)
    # Callers that build the metrics by position still can.
    assert math.isnan(RankingMetrics(0.5, 0.75, 3).full_ndcg)


def test_the_test_ranking_leaves_out_the_validation_item_and_validation_keeps_the_test_item():
    # Prepare: one evaluated user; scores are item bias alone (the popularity
    # baseline's model); the user's validation item is the top item, the test item second.
    source = MarketSource("", synthetic_markets=2, seed=0)
    split = load_split(source, "m01", source.catalog())
    users = split.valid.users[:1]
    one_user = replace(split.valid, users=users, candidates=split.valid.candidates[:1])
    one_test = replace(split.test, users=users, candidates=split.test.candidates[:1])
    split = replace(split, valid=one_user, test=one_test)
    data = MarketTensors.from_split(split, history_length=5)
    model = SplitRecommender(ModelConfig(source.catalog().size, split.num_users, dim=1, history_length=5))
    with torch.no_grad():
        model.encoder.item_embedding.weight.zero_()
        model.head.item_bias.weight.zero_()
        model.head.item_bias.weight[int(one_user.candidates[0, 0])] = 2.0
        model.head.item_bias.weight[int(one_test.candidates[0, 0])] = 1.0
        for row in split.market_items:  # all other items score a distinct value below
            if row not in (one_user.candidates[0, 0], one_test.candidates[0, 0]):
                model.head.item_bias.weight[int(row)] = -1.0 - 1e-3 * int(row)

    # Execute
    valid = evaluate(model, data)
    test = evaluate(model, data, on_test=True)

    # Assert: both held-out items rank first; on validation the test item is
    # a candidate below it, on test the validation item is left out.
    assert (valid.full_ndcg, valid.full_recall) == (1.0, 1.0)
    assert (test.full_ndcg, test.full_recall) == (1.0, 1.0)
    # And the ranking is not blind: swapping the two scores costs the validation item first place.
    with torch.no_grad():
        model.head.item_bias.weight[int(one_user.candidates[0, 0])] = 0.5
    assert evaluate(model, data).full_ndcg == pytest.approx(1.0 / math.log2(3))
    assert evaluate(model, data, on_test=True).full_ndcg == 1.0


# --- results.json: full metrics from the best-validation round, macro and worst market ---


def _reply(val: float, test: float, full: float | None, users: int = 50) -> dict:
    """A market's evaluation metrics as the history records them (full ones only if given)."""
    metrics = {"val-ndcg": val, "val-hr": val + 0.1, "test-ndcg": test, "test-hr": test + 0.1, "num-examples": users}
    if full is not None:
        metrics |= {
            "val-full-ndcg": full + 0.01,
            "val-full-recall": full + 0.05,
            "test-full-ndcg": full,
            "test-full-recall": full + 0.04,
        }
    return metrics


def _history(with_full: bool = True) -> dict:
    full = (lambda value: value) if with_full else (lambda value: None)
    return {
        "rounds": [
            {"round": 0, "per_market": {"a": _reply(0.1, 0.1, full(0.01)), "b": _reply(0.1, 0.1, full(0.01))}},
            # a is best on validation in round 1, b in round 2; round 2 has a's best full metrics (never selected).
            {"round": 1, "per_market": {"a": _reply(0.5, 0.40, full(0.10)), "b": _reply(0.2, 0.20, full(0.02))}},
            {"round": 2, "per_market": {"a": _reply(0.4, 0.45, full(0.30)), "b": _reply(0.3, 0.25, full(0.05))}},
        ]
    }


def test_results_report_full_metrics_from_the_best_validation_round_with_macro_and_worst():

    summary = method_summary(federated_curves(_history()), seconds=1.0)

    a, b = summary["per_market"]["a"], summary["per_market"]["b"]
    assert (a["round"], a["ndcg@10"], a["full-ndcg@10"], a["full-recall@10"]) == (1, 0.40, 0.10, pytest.approx(0.14))
    assert (b["round"], b["ndcg@10"], b["full-ndcg@10"], b["full-recall@10"]) == (2, 0.25, 0.05, pytest.approx(0.09))
    assert summary["macro"] == pytest.approx(
        {"ndcg@10": 0.325, "hr@10": 0.425, "full-ndcg@10": 0.075, "full-recall@10": 0.115}
    )
    assert summary["worst"] == {
        "ndcg@10": 0.25,
        "hr@10": pytest.approx(0.35),
        "full-ndcg@10": 0.05,
        "full-recall@10": pytest.approx(0.09),
        "market": {"ndcg@10": "b", "hr@10": "b", "full-ndcg@10": "b", "full-recall@10": "b"},
    }


def test_worst_names_each_metrics_own_market():

    def method(full_a: float, full_b: float) -> dict:
        per_market = {
            "a": {"ndcg@10": 0.2, "hr@10": 0.3, "full-ndcg@10": full_a, "full-recall@10": 0.1, "val-ndcg@10": 0.2},
            "b": {"ndcg@10": 0.4, "hr@10": 0.5, "full-ndcg@10": full_b, "full-recall@10": 0.1, "val-ndcg@10": 0.4},
        }
        return {"per_market": per_market, "seconds": 1.0}

    summary = selection_summary({"local": method(0.09, 0.03)}, ["local"])

    # a is worst on the sampled metrics, b on full NDCG; a tie on recall goes to the first market.
    assert summary["worst"]["market"] == {"ndcg@10": "a", "hr@10": "a", "full-ndcg@10": "b", "full-recall@10": "a"}
    assert summary["worst"]["full-ndcg@10"] == 0.03
    assert summary["per_market"]["b"]["chosen"] == "local"


def test_results_without_full_metrics_keep_the_sampled_shape():
    # A history from clients that send no full metrics, or a market that lacks
    # them: the macro and worst hold only what every market measured.

    without = method_summary(federated_curves(_history(with_full=False)), seconds=1.0)
    history = _history()
    for entry in history["rounds"]:
        entry["per_market"]["b"] = _reply(0.3, 0.25, None)
    mixed = method_summary(federated_curves(history), seconds=1.0)

    assert "full-ndcg@10" not in without["per_market"]["a"]
    for summary in (without, mixed):
        assert set(summary["macro"]) == {"ndcg@10", "hr@10"}
        assert set(summary["worst"]) == {"ndcg@10", "hr@10", "market"}
    assert mixed["per_market"]["a"]["full-ndcg@10"] == 0.10


def test_fine_tuned_full_metrics_reach_fedper_ft():

    history = _history()
    for metrics in history["rounds"][-1]["per_market"].values():
        metrics |= {f"ft-{key}": value for key, value in _reply(0.6, 0.5, 0.2).items() if key != "num-examples"}

    summary = method_summary(final_step_curves(federated_curves(history), FINE_TUNED), seconds=1.0)

    assert summary["per_market"]["a"]["full-ndcg@10"] == 0.2
    assert summary["macro"]["full-recall@10"] == pytest.approx(0.24)


def test_table_and_csv_show_full_metrics_and_the_worst_market(tmp_path):

    results = {
        "config": {},
        "methods": {
            "fedper": method_summary(federated_curves(_history()), seconds=1.0),
            "old": method_summary(federated_curves(_history(with_full=False)), seconds=1.0),
        },
        "rounds": [],
    }

    table = write_results(results, tmp_path)

    assert "| FULL-NDCG@10 (test) | fedper | old |" in table
    assert "| FULL-RECALL@10 (test) | fedper | old |" in table
    assert "| worst | **0.0500 (b)** | n/a |" in table
    assert "| macro | **0.0750** | n/a |" in table
    frame = pd.read_csv(tmp_path / "results.csv")
    worst = frame[(frame["method"] == "fedper") & (frame["market"] == "worst")].iloc[0]
    assert (worst["full-ndcg@10"], worst["full-ndcg@10 market"], worst["ndcg@10 market"]) == (0.05, "b", "b")
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["fedper"]["worst"]["market"]["hr@10"] == "b"
