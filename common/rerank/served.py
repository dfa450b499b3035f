"""A market's served ``rerank`` model on disk: fedals' retriever, the ranker and the market's feature tables.

A rerank directory ``DIR/`` holds:

* ``retriever/``: fedals' model of the market as of the test evaluation, an ordinary served model
  (:mod:`common.serving.format`), whose :meth:`ServedModel.score` gives the first feature;
* ``ranker.txt``: the LightGBM model as text (absent where the market kept fedals' order);
* ``features.npz``: the market's :class:`common.rerank.features.FeatureTables` as of the test
  evaluation (training plus validation interactions);
* ``features-serving.npz``: the same tables as of serving, from every interaction of the market
  (training, validation and test): what ``xmfl recommend`` and ``xmfl score`` describe users with;
* ``evaluation.npz``: the test lists (users and their 100 candidates) the reported metrics rank;
* ``rerank.json``: format, market, round, metrics, the features the ranker reads, whether the
  market fell back to fedals' order, the ranker's report, and the size and SHA-256 of
  ``ranker.txt``.

:func:`load_rerank_model` reads it back, checking every file before use (one
:class:`RerankModelError` naming the directory and what does not fit, as
:func:`common.serving.query.load_served_model` does for a served model);
:meth:`RerankModel.test_metrics` reproduces the reported test NDCG@10 from the directory alone.
The harness scores the test lists through the same loaded retriever, so the two agree exactly.
:func:`load_any_model` is what the serving commands load: a served model or a rerank model
(:mod:`common.rerank.query` answers for the latter).

LightGBM ends the process (a C++ abort, not an exception) on some damaged model texts, so
``ranker.txt`` is parsed only once its size and digest match the manifest's.

Everything here is the market's own: its users' histories and IDs, its interaction counts and
dates, and fedals' published factors it was sent.
"""

import hashlib
import json
import math
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.neural.model import SplitRecommender
from common.neural.train import MarketTensors
from common.rerank.features import FEATURE_NAMES, FeatureTables
from common.rerank.ranker import Ranked, RankerFit, ranked
from common.runtime.names import printable
from common.serving.format import MANIFEST, ServedModelError, write_served_model
from common.serving.query import ServedModel, load_served_model

RERANK_FORMAT = "xmarket-fl rerank model"
RERANK_FORMAT_VERSION = 2  # 2: serving tables, named features in the ranker's text, its size and digest
RERANK_MANIFEST = "rerank.json"
RETRIEVER_DIR = "retriever"
RANKER_FILE = "ranker.txt"
FEATURES_FILE = "features.npz"
SERVING_FEATURES_FILE = "features-serving.npz"
EVALUATION_FILE = "evaluation.npz"
PARSE_SECONDS = 120  # a ranker text LightGBM has not parsed in a child process by then is refused
MAX_RANKER_BYTES = 64 * 2**20  # a ranker of 400 trees of 15 leaves is under 1 MiB: a larger file is not one of ours
# What reading a damaged or foreign .npz raises (numpy reads it as a zip of .npy files).
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


class RerankModelError(ServedModelError):
    """A rerank directory cannot be used: the message names it and what does not fit."""


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
    *,
    serving_tables: FeatureTables,
) -> None:
    """Complete a rerank directory started by :func:`write_retriever`: ranker, feature tables, test lists, manifest.

    Parameters
    ----------
    directory : Path
        The directory :func:`write_retriever` started.
    fit : RankerFit
        The market's ranker (or its fallback to fedals' order).
    tables : FeatureTables
        The tables as of the test evaluation (training plus validation interactions).
    test_users, test_candidates : np.ndarray
        The test lists the reported metrics rank.
    manifest : dict
        ``method``, ``market``, ``round`` and ``metrics``; the format, the ranker's features,
        fallback, trees, held-out results, importances and the ranker file's size and digest are
        added here.
    serving_tables : FeatureTables
        The tables as of serving (every interaction of the market, test included).
    """
    directory = Path(directory)
    if not (directory / RETRIEVER_DIR).is_dir():
        raise ValueError(f"{directory} has no retriever: write it first with write_retriever.")
    if len(serving_tables.user_day) != len(tables.user_day) or not np.array_equal(serving_tables.items, tables.items):
        raise ValueError("The serving tables must describe the same users and assortment as the test tables.")
    ranker: dict[str, Any] = {}
    if fit.model is not None:
        text = fit.model.encode("utf-8")
        (directory / RANKER_FILE).write_bytes(text)
        ranker = {"ranker-bytes": len(text), "ranker-sha256": hashlib.sha256(text).hexdigest()}
    np.savez(directory / FEATURES_FILE, **tables.arrays())
    np.savez(directory / SERVING_FEATURES_FILE, **serving_tables.arrays())
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
        **ranker,
    }
    (directory / RERANK_MANIFEST).write_text(json.dumps(full, indent=2), encoding="utf-8")
    # 0600 as the served model's files: the tables and lists hold the market's users' histories.
    for name in (RANKER_FILE, FEATURES_FILE, SERVING_FEATURES_FILE, EVALUATION_FILE, RERANK_MANIFEST):
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
        serving_tables: FeatureTables,
        booster: lightgbm.Booster | None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.retriever = retriever
        self.tables = tables
        self.fit = fit
        self.test_users = test_users
        self.test_candidates = test_candidates
        self.serving_tables = serving_tables
        self.booster = booster  # the ranker parsed once; None where the market kept fedals' order

    @property
    def market(self) -> str:
        """The market this model serves."""
        return str(self.manifest["market"])

    def score_lists(self, users: np.ndarray, candidates: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """Scores ``(n, c)`` of local ``users``' candidate rows ``(n, c)`` as of the test evaluation."""
        scores = retriever_scores(self.retriever, users, candidates)
        return self.fit.scores(self.tables.list_features(users, candidates, scores), num_threads, self.booster)

    def test_metrics(self) -> Ranked:
        """NDCG@10 and HR@10 of the test lists the run reported, from this directory alone."""
        return ranked(self.score_lists(self.test_users, self.test_candidates))


def load_rerank_model(directory: str | Path, catalog: Catalog | None = None) -> RerankModel:
    """Read and check a rerank directory written by :func:`write_retriever` and :func:`write_ranker`.

    Parameters
    ----------
    directory : str or Path
        The rerank directory.
    catalog : Catalog, optional
        The catalog the caller serves with, checked against the retriever's as for a served model.

    Raises
    ------
    RerankModelError
        In one sentence naming the directory and what does not fit: not a rerank model of this
        format version, a manifest without the ranker's settings, a ``ranker.txt`` missing or
        not the one the manifest describes (size, digest), a ranker reading other features than
        the manifest's or in another order, or a feature table missing, unreadable or
        inconsistent (with itself or with the retriever's users).
    ServedModelError
        If the retriever is not a usable served model (:func:`load_served_model`).
    """
    directory = Path(directory)
    manifest = _read_rerank_manifest(directory)
    features: tuple[str, ...] = tuple(manifest["features"])
    model = None
    booster = None
    if not manifest["fallback"]:
        model = _read_ranker(directory, manifest)
        booster = _parse_ranker(directory, model, features)
    fit = RankerFit(
        model,
        features,
        float(manifest["base-scale"]),
        int(manifest["trees"]),
        Ranked(**manifest["holdout"]),
        Ranked(**manifest["holdout-fedals"]),
        dict(manifest["importance-gain"]),
    )
    tables = _read_tables(directory, FEATURES_FILE)
    serving_tables = _read_tables(directory, SERVING_FEATURES_FILE)
    try:
        with np.load(directory / EVALUATION_FILE) as arrays:
            test_users, test_candidates = np.asarray(arrays["users"]), np.asarray(arrays["candidates"])
    except NPZ_ERRORS as err:
        raise RerankModelError(
            f"The rerank model {directory} has an unreadable {EVALUATION_FILE} ({_reason(err)})."
        ) from err
    retriever = load_served_model(directory / RETRIEVER_DIR, catalog)
    users = len(retriever.user_ids)
    for name, table in ((FEATURES_FILE, tables), (SERVING_FEATURES_FILE, serving_tables)):
        if len(table.user_day) != users or table.items[-1] >= retriever.catalog.size:
            raise RerankModelError(
                f"The rerank model {directory} has a {name} of {len(table.user_day)} users or items beyond its "
                f"catalog, its retriever {users} users and {retriever.catalog.size} catalog rows."
            )
    if test_candidates.ndim != 2 or test_users.shape != test_candidates.shape[:1]:
        raise RerankModelError(f"The rerank model {directory} has test lists that are not (users,) and (users, c).")
    return RerankModel(
        directory, manifest, retriever, tables, fit, test_users, test_candidates, serving_tables, booster
    )


def is_rerank_model(directory: str | Path) -> bool:
    """Whether ``directory`` holds a rerank model (a ``rerank.json``), readable or not."""
    return (Path(directory) / RERANK_MANIFEST).is_file()


def load_any_model(directory: str | Path, catalog: Catalog | None = None) -> "ServedModel | RerankModel":
    """The model the serving commands answer with: a rerank model where ``directory`` has a ``rerank.json``,
    else a served model.

    Raises
    ------
    ServedModelError
        If the directory holds neither (one sentence naming both files), or the model it holds
        is unusable (:func:`load_rerank_model`, :func:`load_served_model`).
    """
    directory = Path(directory)
    if is_rerank_model(directory):
        return load_rerank_model(directory, catalog)
    if directory.is_dir() and not (directory / MANIFEST).exists():
        raise ServedModelError(
            f"{directory} is not a model: it has neither {MANIFEST} (a served model) nor {RERANK_MANIFEST} "
            "(a rerank model)."
        )
    return load_served_model(directory, catalog)


def _reason(err: BaseException) -> str:
    """An exception's message on one line, bounded: what a one-sentence error quotes."""
    reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
    return reason or type(err).__name__


def _read_rerank_manifest(directory: Path) -> dict[str, Any]:
    """``rerank.json``, checked for this format version and the types of the ranker's settings."""
    path = directory / RERANK_MANIFEST
    if not path.is_file():
        raise RerankModelError(f"{directory} is not a rerank model: it has no {RERANK_MANIFEST}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RerankModelError(
            f"The rerank model {directory} has an unreadable {RERANK_MANIFEST} ({_reason(err)})."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != RERANK_FORMAT:
        raise RerankModelError(f"{directory} is not a rerank model: its {RERANK_MANIFEST} does not name the format.")
    if manifest.get("format_version") != RERANK_FORMAT_VERSION:
        raise RerankModelError(
            f"The rerank model {directory} has format version {manifest.get('format_version')!r}, but this "
            f"version reads {RERANK_FORMAT_VERSION} only: run the harness's rerank again to rewrite it."
        )
    features = manifest.get("features")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(name, str) for name in features)
        or not set(features) <= set(FEATURE_NAMES)
        or "fedals-score" not in features
        or len(set(features)) != len(features)
    ):
        raise RerankModelError(
            f"The rerank model {directory}'s ranker reads features this version does not compute: {features!r} "
            f"(it computes {list(FEATURE_NAMES)})."
        )
    try:
        valid = (
            isinstance(manifest["fallback"], bool)
            and math.isfinite(float(manifest["base-scale"]))
            and isinstance(manifest["trees"], int)
            and isinstance(manifest["importance-gain"], dict)
            and isinstance(manifest["market"], str)
        )
        Ranked(**manifest["holdout"])
        Ranked(**manifest["holdout-fedals"])
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise RerankModelError(f"The rerank model {directory} has a {RERANK_MANIFEST} without the ranker's settings.")
    return manifest


def _read_ranker(directory: Path, manifest: dict[str, Any]) -> str:
    """``ranker.txt``, once its size and SHA-256 are the manifest's (checked before it is read whole)."""
    path = directory / RANKER_FILE
    expected, digest = manifest.get("ranker-bytes"), manifest.get("ranker-sha256")
    if not isinstance(expected, int) or not isinstance(digest, str) or not 0 < expected <= MAX_RANKER_BYTES:
        raise RerankModelError(
            f"The rerank model {directory} has a {RERANK_MANIFEST} without its ranker's size and digest."
        )
    try:
        size = path.stat().st_size
        if size != expected:
            raise RerankModelError(
                f"The rerank model {directory} has a {RANKER_FILE} of {size} bytes, its manifest says {expected}."
            )
        text = path.read_bytes()
    except FileNotFoundError:
        raise RerankModelError(f"The rerank model {directory} serves a ranker but has no {RANKER_FILE}.") from None
    except OSError as err:
        raise RerankModelError(
            f"The rerank model {directory} has an unreadable {RANKER_FILE} ({_reason(err)})."
        ) from err
    if hashlib.sha256(text).hexdigest() != digest:
        raise RerankModelError(
            f"The rerank model {directory} has a {RANKER_FILE} that is not the one its manifest describes "
            "(SHA-256 differs)."
        )
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RerankModelError(f"The rerank model {directory} has a {RANKER_FILE} that is not text.") from err


def _parse_ranker(directory: Path, model: str, features: tuple[str, ...]) -> lightgbm.Booster:
    """The ranker parsed, refused unless it reads exactly ``features`` in that order.

    LightGBM's parser aborts the whole process on some malformed texts (a tree's child index
    out of its range) instead of raising, and a digest kept beside the file is no defence
    against whoever can write both: the text is parsed first in a child process, and only a
    text that parsed there is parsed here.
    """
    probe = "import sys, lightgbm; lightgbm.Booster(model_str=sys.stdin.read())"
    try:
        parsed = subprocess.run(
            [sys.executable, "-c", probe], input=model, text=True, capture_output=True, timeout=PARSE_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise RerankModelError(
            f"The rerank model {directory} has a {RANKER_FILE} LightGBM did not parse within {PARSE_SECONDS} s."
        ) from None
    if parsed.returncode != 0:
        lines = [line for line in parsed.stderr.splitlines() if line.strip()]
        reason = printable(lines[-1] if lines else f"exit code {parsed.returncode}")[:200]
        raise RerankModelError(f"The rerank model {directory} has a {RANKER_FILE} LightGBM cannot read ({reason}).")
    try:
        booster = lightgbm.Booster(model_str=model)
    except (lightgbm.basic.LightGBMError, ValueError, TypeError) as err:
        raise RerankModelError(
            f"The rerank model {directory} has a {RANKER_FILE} LightGBM cannot read ({_reason(err)})."
        ) from err
    names = booster.feature_name()
    if names != list(features):
        raise RerankModelError(
            f"The rerank model {directory}'s {RANKER_FILE} reads the features {names}, but its manifest and this "
            f"version's code name {list(features)}."
        )
    return booster


def _read_tables(directory: Path, name: str) -> FeatureTables:
    """A feature table file, read without pickles and checked to fit together."""
    try:
        with np.load(directory / name, allow_pickle=False) as arrays:
            tables = FeatureTables.from_arrays({key: np.asarray(arrays[key]) for key in arrays.files})
        tables.check()
    except FileNotFoundError:
        raise RerankModelError(f"The rerank model {directory} has no {name}.") from None
    except NPZ_ERRORS as err:
        raise RerankModelError(f"The rerank model {directory} has an unusable {name} ({_reason(err)}).") from err
    return tables
