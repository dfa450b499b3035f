"""A market's served ``rerank`` model on disk: fedals' retriever, the ranker and the market's feature tables.

A rerank directory ``DIR/`` holds:

* ``retriever/``: fedals' model of the market as of the test evaluation, an ordinary served model
  (:mod:`common.serving.format`), whose :meth:`ServedModel.score` gives the first feature;
* ``ranker.txt``: the LightGBM model as text (absent where the market kept fedals' order);
* ``features.npz``: the market's :class:`common.rerank.features.FeatureTables` as of the test
  evaluation (training plus validation interactions);
* ``evaluation.npz``: the test lists (users and their 100 candidates) the reported metrics rank;
* ``rerank.json``: format, market, round, metrics, the features the ranker reads, whether the
  market fell back to fedals' order, and the ranker's report.

:func:`load_rerank_model` reads it back; :meth:`RerankModel.test_metrics` reproduces the reported
test NDCG@10 from the directory alone. The harness scores the test lists through the same loaded
retriever, so the two agree exactly. ``xmfl recommend`` and ``xmfl score`` do not read this format
yet: a rerank directory has no top-level ``manifest.json``, so they refuse it rather than serve
fedals' order under the rerank name.

Everything here is the market's own: its users' histories and IDs, its interaction counts and
dates, and fedals' published factors it was sent.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.neural.model import SplitRecommender
from common.neural.train import MarketTensors
from common.rerank.features import FEATURE_NAMES, FeatureTables
from common.rerank.ranker import Ranked, RankerFit, ranked
from common.serving.format import write_served_model
from common.serving.query import ServedModel, load_served_model

RERANK_FORMAT = "xmarket-fl rerank model"
RERANK_FORMAT_VERSION = 1
RERANK_MANIFEST = "rerank.json"
RETRIEVER_DIR = "retriever"
RANKER_FILE = "ranker.txt"
FEATURES_FILE = "features.npz"
EVALUATION_FILE = "evaluation.npz"


@torch.no_grad()
def candidate_scores(model: SplitRecommender, data: MarketTensors, on_test: bool = False) -> np.ndarray:
    """``model``'s scores ``(users, candidates)`` of the market's validation (or test) lists.

    The scores :func:`common.neural.train.evaluate` ranks, computed the same way: users' vectors
    from their history as of the list, candidates looked up among the encoded assortment.
    """
    eval_set = data.split.test if on_test else data.split.valid
    market_items = data.market_items
    item_vectors = model.encoder(market_items)
    item_bias = model.head.item_bias(market_items).squeeze(-1)
    users = torch.as_tensor(eval_set.users) + data.user_offset
    history, mask = data.user_history(users, for_test=on_test)
    columns = torch.searchsorted(market_items, history).clamp(max=len(market_items) - 1)
    user_vectors = model.head.user_vectors(users, item_vectors[columns], mask)
    candidates = torch.as_tensor(eval_set.candidates)
    sampled = torch.searchsorted(market_items, candidates).clamp(max=len(market_items) - 1)
    if not torch.equal(market_items[sampled], candidates):
        raise ValueError(f"Market '{data.split.market}' ranks candidates outside its own assortment.")
    scores = torch.einsum("bd,bcd->bc", user_vectors, item_vectors[sampled]) + item_bias[sampled]
    return scores.numpy().astype(np.float64)


def retriever_scores(retriever: ServedModel, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The served retriever's scores ``(n, c)`` of local ``users``' candidate rows as of the test evaluation."""
    users = np.asarray(users, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or len(users) != len(candidates):
        raise ValueError(f"Lists need (n,) users and (n, c) candidates, got {users.shape} and {candidates.shape}.")
    user_ids = np.asarray(retriever.user_ids, dtype=object)
    item_ids = np.asarray(retriever.catalog.item_ids, dtype=object)
    if len(candidates) and candidates.max() >= len(item_ids):
        raise ValueError("Candidates must be catalog rows with an item ID.")
    pairs = pd.DataFrame(
        {"userId": np.repeat(user_ids[users], candidates.shape[1]), "itemId": item_ids[candidates.ravel()]}
    )
    scored = retriever.score(pairs, as_of="test")
    return scored["score"].to_numpy(dtype=np.float64).reshape(candidates.shape)


def write_retriever(
    directory: Path,
    model: SplitRecommender,
    data: MarketTensors,
    catalog: Catalog,
    manifest: dict[str, Any],
    user_ids: list[str],
) -> ServedModel:
    """Start ``directory`` afresh with the retriever (fedals as of test) in it; the retriever as loaded back."""
    directory = Path(directory)
    if directory.exists() and not (directory / RERANK_MANIFEST).exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} holds something other than a rerank model; refusing to replace it.")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    write_served_model(directory / RETRIEVER_DIR, model, data, catalog, manifest, user_ids=user_ids)
    return load_served_model(directory / RETRIEVER_DIR, catalog)


def write_ranker(
    directory: Path,
    fit: RankerFit,
    tables: FeatureTables,
    test_users: np.ndarray,
    test_candidates: np.ndarray,
    manifest: dict[str, Any],
) -> None:
    """Complete a rerank directory started by :func:`write_retriever`: ranker, feature tables, test lists, manifest.

    ``manifest`` holds ``method``, ``market``, ``round`` and ``metrics``; the format, the ranker's
    features, fallback, trees, held-out results and importances are added here.
    """
    directory = Path(directory)
    if not (directory / RETRIEVER_DIR).is_dir():
        raise ValueError(f"{directory} has no retriever: write it first with write_retriever.")
    if fit.model is not None:
        (directory / RANKER_FILE).write_text(fit.model, encoding="utf-8")
    np.savez(directory / FEATURES_FILE, **tables.arrays())
    np.savez(directory / EVALUATION_FILE, users=np.asarray(test_users), candidates=np.asarray(test_candidates))
    full = {
        "format": RERANK_FORMAT,
        "format_version": RERANK_FORMAT_VERSION,
        **manifest,
        "features": list(fit.features),
        "fallback": fit.fallback,
        "base-scale": fit.base_scale,
        "trees": fit.trees,
        "holdout": asdict(fit.holdout),
        "holdout-fedals": asdict(fit.holdout_fedals),
        "importance-gain": fit.importance,
    }
    (directory / RERANK_MANIFEST).write_text(json.dumps(full, indent=2), encoding="utf-8")
    # 0600 as the served model's files: the tables and lists hold the market's users' histories.
    for name in (RANKER_FILE, FEATURES_FILE, EVALUATION_FILE, RERANK_MANIFEST):
        if (directory / name).exists():
            (directory / name).chmod(0o600)


class RerankModel:
    """A market's rerank model as loaded: scores candidate lists, and reproduces its test metrics."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        retriever: ServedModel,
        tables: FeatureTables,
        fit: RankerFit,
        test_users: np.ndarray,
        test_candidates: np.ndarray,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.retriever = retriever
        self.tables = tables
        self.fit = fit
        self.test_users = test_users
        self.test_candidates = test_candidates

    def score_lists(self, users: np.ndarray, candidates: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """Scores ``(n, c)`` of local ``users``' candidate rows ``(n, c)`` as of the test evaluation."""
        scores = retriever_scores(self.retriever, users, candidates)
        return self.fit.scores(self.tables.list_features(users, candidates, scores), num_threads)

    def test_metrics(self) -> Ranked:
        """NDCG@10 and HR@10 of the test lists the run reported, from this directory alone."""
        return ranked(self.score_lists(self.test_users, self.test_candidates))


def load_rerank_model(directory: str | Path, catalog: Catalog | None = None) -> RerankModel:
    """Read a rerank directory written by :func:`write_retriever` and :func:`write_ranker`.

    Raises
    ------
    ValueError
        If the directory is not a rerank model of this format version, or its ranker file is missing.
    """
    directory = Path(directory)
    path = directory / RERANK_MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory} is not a rerank model: it has no {RERANK_MANIFEST}.")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != RERANK_FORMAT or manifest.get("format_version") != RERANK_FORMAT_VERSION:
        raise ValueError(f"{directory} is not a rerank model of format version {RERANK_FORMAT_VERSION}.")
    features = tuple(manifest["features"])
    if not set(features) <= set(FEATURE_NAMES):
        raise ValueError(f"{directory}'s ranker reads features this version does not compute: {features}.")
    model = None
    if not manifest["fallback"]:
        ranker_path = directory / RANKER_FILE
        if not ranker_path.is_file():
            raise ValueError(f"{directory} serves a ranker but has no {RANKER_FILE}.")
        model = ranker_path.read_text(encoding="utf-8")
    fit = RankerFit(
        model,
        features,
        float(manifest["base-scale"]),
        int(manifest["trees"]),
        Ranked(**manifest["holdout"]),
        Ranked(**manifest["holdout-fedals"]),
        dict(manifest["importance-gain"]),
    )
    with np.load(directory / FEATURES_FILE) as arrays:
        tables = FeatureTables.from_arrays(dict(arrays))
    with np.load(directory / EVALUATION_FILE) as arrays:
        test_users, test_candidates = arrays["users"], arrays["candidates"]
    retriever = load_served_model(directory / RETRIEVER_DIR, catalog)
    return RerankModel(directory, manifest, retriever, tables, fit, test_users, test_candidates)
