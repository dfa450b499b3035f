"""The harness's ``rerank``: per market, a learned ranker re-orders fedals' candidate lists.

After ``fedals`` has run, each market:

* retrieves with fedals as ``blend`` does (:func:`simulations.blend.ials_models`): the item table
  fedals published after its last round (``OUT/models/fedals/published.pt``), the market's users
  solved on their training interactions for validation and folded in with the validation
  interaction for test. The lists are exactly the split's (the held-out item and its 99 sampled
  negatives), so NDCG@10 compares with every other method's;
* describes every candidate with features it computes itself (:mod:`common.rerank.features`):
  validation lists from the training interactions, test lists from training plus validation;
* trains its own LightGBM LambdaRank ranker on its validation lists, keeping fedals' order if the
  ranker does not beat it on held-out validation users (:mod:`common.rerank.ranker`);
* serves the result under ``OUT/models/rerank/<market>`` (:mod:`common.rerank.served`), with
  its feature tables as of the test evaluation (to reproduce the reported metrics) and as of
  serving (every interaction of the market, test included: what ``xmfl recommend`` reads), reports
  its test metrics as a one-point curve and writes ``OUT/rerank.json``: per market the ranker's
  held-out validation result against fedals', whether it fell back, its feature importances
  (gain) and an ablation of each feature group.

The validation NDCG@10 reported for ``rerank`` is that of its held-out validation users (the
others trained it), not comparable with other methods' validation over every user, so ``rerank``
is not a candidate of the per-market ``selection``. Nothing leaves a market for it.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split
from common.ials.core import IALSConfig, ItemFactors
from common.ials.model import ITEM_TABLE, IALSMarket, interaction_ratings
from common.rerank.features import FEATURE_GROUPS, FeatureTables, interaction_days, market_contexts, serving_context
from common.rerank.ranker import RankerConfig, ablation, fit_ranker, ranked
from common.rerank.served import candidate_scores, retriever_scores, write_ranker, write_retriever
from common.serving.format import market_user_ids
from common.serving.published import load_published, published_path
from simulations.baselines import Progress
from simulations.blend import ALS_METHOD, ials_models

RERANK = "rerank"
REPORT_FILE = "rerank.json"


def run_rerank(
    source: MarketSource,
    catalog: Catalog,
    models_dir: Path,
    config: IALSConfig,
    history_length: int,
    ranker: RankerConfig,
    progress: Progress,
    report_path: Path | None = None,
    with_ablation: bool = True,
) -> dict[str, list[dict[str, float]]]:
    """Re-rank fedals' lists with a ranker per market; their one-point curves.

    Parameters
    ----------
    source : MarketSource
        The run's markets.
    catalog : Catalog
        The run's catalog.
    models_dir : Path
        ``OUT/models``: ``fedals/published.pt`` is read, ``rerank/<market>`` written.
    config : IALSConfig
        fedals' settings (``als-*``), to solve the users with.
    history_length : int
        Training items pooled into a user's history.
    ranker : RankerConfig
        The rankers' settings.
    progress : Progress
        Where to say each market's result.
    report_path : Path, optional
        Where to write the report (``OUT/rerank.json``); None writes none.
    with_ablation : bool
        Train the ablation's rankers too (five more per market).

    Raises
    ------
    ValueError
        If the published file is missing or not fedals'.
    """
    path = published_path(models_dir / ALS_METHOD)
    if not path.exists():
        raise ValueError(f"{RERANK} re-ranks {ALS_METHOD}'s lists, but {path} does not exist: run {ALS_METHOD} first.")
    published = load_published(path)
    if published.method != ALS_METHOD:
        raise ValueError(
            f"{published.path} was published by {published.method}, not {ALS_METHOD}: {RERANK} needs "
            f"{ALS_METHOD}'s item factors."
        )
    table = published.arrays[ITEM_TABLE].numpy()
    # The Gram as fedals' server computes it and sends it to the markets (float64 sum, float32 wire).
    touched = table[table.any(axis=1)].astype(np.float64)
    gram = (touched.T @ touched).astype(np.float32).astype(np.float64)
    norms = np.linalg.norm(table.astype(np.float64), axis=1)
    curves: dict[str, list[dict[str, float]]] = {}
    report: dict[str, Any] = {"config": asdict(ranker), "feature-groups": FEATURE_GROUPS, "markets": {}}
    for name in source.markets:
        started = time.perf_counter()
        split = load_split(source, name, catalog)
        interactions = source.interactions(name)
        ratings = None
        if config.confidence != "binary":
            ratings = interaction_ratings(split, interactions, catalog)
        market = IALSMarket.from_split(split, history_length, ratings)
        rows = split.market_items  # the rows fedals sends the market: its assortment
        items = ItemFactors(rows, table[rows].astype(np.float64))
        valid_model, test_model = ials_models(market, items, gram, catalog.size, config, len(touched))
        days = interaction_days(split, interactions, catalog, with_test=True)
        valid_context, test_context = market_contexts(split, *days[:2])
        valid_scores = candidate_scores(valid_model, market.tensors)
        valid_features = FeatureTables.build(valid_context, rows, norms[rows]).list_features(
            split.valid.users, split.valid.candidates, valid_scores
        )
        fit = fit_ranker(valid_features, ranker)
        directory = models_dir / RERANK / name
        fedals_valid = ranked(valid_scores)
        retriever = write_retriever(
            directory,
            test_model,
            market.tensors,
            catalog,
            {
                "method": ALS_METHOD,
                "market": name,
                "round": published.round,
                "metrics": {"val-ndcg@10": fedals_valid.ndcg},
                "epsilon": None,
                "delta": None,
            },
            market_user_ids(interactions),
        )
        test_scores = retriever_scores(retriever, split.test.users, split.test.candidates)
        test_tables = FeatureTables.build(test_context, rows, norms[rows])
        test_features = test_tables.list_features(split.test.users, split.test.candidates, test_scores)
        test = ranked(fit.scores(test_features, ranker.num_threads))
        fedals_test = ranked(test_scores)
        valid = fit.holdout_fedals if fit.fallback else fit.holdout
        point = {
            "round": published.round,
            "val-ndcg": valid.ndcg,
            "val-hr": valid.hit_rate,
            "test-ndcg": test.ndcg,
            "test-hr": test.hit_rate,
            "users": test.users,
        }
        curves[name] = [point]
        write_ranker(
            directory,
            fit,
            test_tables,
            split.test.users,
            split.test.candidates,
            {
                "method": RERANK,
                "market": name,
                "round": published.round,
                "metrics": {key: value for key, value in point.items() if key != "round"},
            },
            serving_tables=FeatureTables.build(serving_context(split, *days), rows, norms[rows]),
        )
        report["markets"][name] = {
            "test-ndcg@10": test.ndcg,
            "fedals-test-ndcg@10": fedals_test.ndcg,
            "fedals-valid-ndcg@10": fedals_valid.ndcg,
            "holdout-ndcg@10": fit.holdout.ndcg,
            "holdout-fedals-ndcg@10": fit.holdout_fedals.ndcg,
            "holdout-users": fit.holdout.users,
            "fallback": fit.fallback,
            "trees": fit.trees,
            "importance-gain": fit.importance,
        }
        if with_ablation:
            report["markets"][name]["ablation"] = ablation(valid_features, test_features, ranker)
        progress(
            f"{RERANK} {name}: {'fallback to fedals' if fit.fallback else f'{fit.trees} trees'}, held-out val "
            f"NDCG@10 {fit.holdout.ndcg:.4f} (fedals {fit.holdout_fedals.ndcg:.4f}), test {test.ndcg:.4f} "
            f"(fedals {fedals_test.ndcg:.4f}) ({time.perf_counter() - started:.1f} s)"
        )
    if report_path is not None:
        markets = report["markets"]
        report["macro"] = {
            key: float(np.mean([m[key] for m in markets.values()]))
            for key in ("test-ndcg@10", "fedals-test-ndcg@10", "holdout-ndcg@10", "holdout-fedals-ndcg@10")
        }
        if with_ablation:
            variants = next(iter(markets.values()))["ablation"]
            report["macro"]["ablation"] = {
                variant: {
                    key: float(np.mean([m["ablation"][variant][key] for m in markets.values()]))
                    for key in ("holdout-ndcg@10", "test-ndcg@10")
                }
                for variant in variants
            }
        report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return curves
