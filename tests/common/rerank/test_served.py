"""rerank's served directory: retriever, ranker and feature tables reproduce the test NDCG@10 on their own."""

import numpy as np
import pytest
import torch

from common.data.markets import MarketSource, load_split
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, evaluate
from common.rerank.features import FeatureTables, interaction_days, market_contexts
from common.rerank.ranker import RankerConfig, fit_ranker, ranked
from common.rerank.served import (
    candidate_scores,
    load_rerank_model,
    retriever_scores,
    write_ranker,
    write_retriever,
)
from common.serving.format import market_user_ids

SOURCE = MarketSource("", 3, 0)
HISTORY = 5
MARKET = "m02"  # the smallest generated market
CONFIG = RankerConfig(max_trees=20, stopping_rounds=5, min_child_samples=20)


@pytest.fixture(scope="module")
def market():
    catalog = SOURCE.catalog()
    split = load_split(SOURCE, MARKET, catalog)
    data = MarketTensors.from_split(split, HISTORY)
    torch.manual_seed(0)
    model = SplitRecommender(ModelConfig(catalog.size, split.num_users, 8, HISTORY, user_embeddings=True))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    return catalog, split, data, model.eval()


def test_candidate_scores_rank_as_the_evaluation_does(market):
    # Prepare
    _, _, data, model = market

    # Execute
    valid, test = ranked(candidate_scores(model, data)), ranked(candidate_scores(model, data, on_test=True))

    # Assert
    assert valid.ndcg == pytest.approx(evaluate(model, data, full=False).ndcg, abs=1e-12)
    assert test.ndcg == pytest.approx(evaluate(model, data, on_test=True, full=False).ndcg, abs=1e-12)


def test_the_directory_alone_reproduces_the_test_ndcg(market, tmp_path):
    # Prepare: the harness's steps on one market, a random model as the retriever.
    catalog, split, data, model = market
    interactions = SOURCE.interactions(MARKET)
    valid_context, test_context = market_contexts(split, *interaction_days(split, interactions, catalog))
    norms = np.linspace(0.0, 1.0, len(split.market_items))
    valid_features = FeatureTables.build(valid_context, split.market_items, norms).list_features(
        split.valid.users, split.valid.candidates, candidate_scores(model, data)
    )
    fit = fit_ranker(valid_features, CONFIG)
    manifest = {"method": "fedals", "market": MARKET, "round": 1, "metrics": {}, "epsilon": None, "delta": None}
    directory = tmp_path / MARKET

    # Execute
    retriever = write_retriever(directory, model, data, catalog, manifest, market_user_ids(interactions))
    tables = FeatureTables.build(test_context, split.market_items, norms)
    test_scores = retriever_scores(retriever, split.test.users, split.test.candidates)
    reported = ranked(fit.scores(tables.list_features(split.test.users, split.test.candidates, test_scores)))
    write_ranker(
        directory,
        fit,
        tables,
        split.test.users,
        split.test.candidates,
        {"method": "rerank", "market": MARKET},
        serving_tables=tables,
    )
    loaded = load_rerank_model(directory, catalog)

    # Assert
    assert loaded.fit.fallback == fit.fallback
    assert loaded.test_metrics().ndcg == pytest.approx(reported.ndcg, abs=1e-6)
    # The retriever is fedals' model as of test: its scores rank as the evaluation ranks it.
    assert ranked(test_scores).ndcg == pytest.approx(evaluate(model, data, on_test=True, full=False).ndcg, abs=1e-6)


def test_a_directory_without_a_rerank_manifest_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a rerank model"):
        load_rerank_model(tmp_path)
