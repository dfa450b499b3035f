"""fedals' iALS factors as the project's split recommender, and what fedals' messages carry.

iALS (:mod:`common.ials`) scores user ``u`` and item ``i`` with ``x_u · y_i``. Written as a
:class:`common.model.SplitRecommender` (``ModelConfig(rows, users, d, history_length,
user_embeddings=True)``), evaluation, served models, ``recommend``, ``score``, ``join`` and the
full-ranking metrics work on it unchanged:

* ``encoder.item_embedding.weight`` = ``Y`` (zero for rows the market was not sent) and
  ``encoder.tower`` = 0, so the encoder is the identity on ``Y``;
* ``head.history_projection.weight`` = ``P``, a ridge fit of ``x_u − x̄ ≈ P·h̄_u`` over the
  market's users, where ``x̄`` is the mean user factor and ``h̄_u`` the mean item factor of the
  user's history as the model pools it (:class:`common.train.MarketTensors`);
* ``head.item_bias.weight[i]`` = ``x̄ · y_i``;
* ``head.user_embedding.weight[u]`` = ``x_u − x̄ − P·h̄_u``.

A known user then scores ``x_u · y_i`` whatever ``P`` is (to float32 rounding); an unknown user
without history gets the mean user's ranking ``x̄ · y_i`` (close to popularity), and one with a
history ``(x̄ + P·h̄) · y_i``, a linear stand-in for folding them in.

Evaluation follows the project's protocol, as :mod:`simulations.benchmarks.ials_tuning` measures iALS:
validation ranks with ``x_u`` solved on the training interactions; test with ``x_u`` folded in
from the training interactions plus the validation interaction (the item factors never see it),
just as the neural methods' test history holds the validation item. The user embeddings are
set for each of the two, so the model is exact on both: :func:`evaluate_market` returns the
test one, the model a market serves (``score(as_of="test")`` reproduces its test metrics).

The wire format of fedals (Flower Message API, arrays of numpy): the server sends a market
:func:`common.ials_wire.pack_item_factors` of its assortment's rows, or in round 1 the Gram alone with
:data:`INITIAL_ROWS_KEY` set, and the market draws its seeded initial rows itself
(:func:`initial_rows`, equal to the server's :func:`initial_encoder_state`). A market replies
with :func:`common.ials_wire.pack_statistics` and its assortment's rows (:data:`ASSORTMENT_KEY`), from
which the server learns what to send it next; :func:`reply_problem` is the server's check of it.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.data.split import MarketSplit
from common.ials.core import IALSConfig, ItemFactors, MarketInteractions, initial_item_factors, row_positions
from common.ials.steps import solve_users
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, RankingMetrics, evaluate
from common.serving.format import full_histories

ITEM_TABLE = "encoder.item_embedding.weight"  # the shared state's item factors Y over the catalog
TOWER_WEIGHT, TOWER_BIAS = "encoder.tower.weight", "encoder.tower.bias"  # zero: the encoder is the identity on Y
HISTORY_RIDGE = 1e-2  # ridge of the fit of P, relative to the mean eigenvalue of Σ h̄_u h̄_uᵀ
_INITIAL_CHUNK = 65536  # catalog rows drawn at once for the initial table


@dataclass(frozen=True)
class IALSMarket:
    """A market's split as iALS sees it: tensors for evaluation and its interactions to solve users on."""

    tensors: MarketTensors
    train: MarketInteractions  # the training interactions
    with_valid: MarketInteractions  # training plus validation interactions: a user's past at test time
    test_ratings: np.ndarray | None = None  # the test interactions' ratings (rating and log confidences), for a refit

    @property
    def split(self) -> MarketSplit:
        """The market's split."""
        return self.tensors.split

    @cached_property
    def everything(self) -> MarketInteractions:
        """Every interaction of the market, validation and test too: what a refit for serving trains on."""
        split = self.split
        ratings = self.with_valid.ratings
        if ratings is not None and self.test_ratings is None:
            raise ValueError(f"Market '{split.market}' has no test ratings to refit with its rating confidences.")
        return MarketInteractions(
            np.concatenate([self.with_valid.users, split.test.users]),
            np.concatenate([self.with_valid.items, split.test.candidates[:, 0]]),
            split.num_users,
            None if ratings is None else np.concatenate([ratings, self.test_ratings]),
        )

    @classmethod
    def from_split(
        cls, split: MarketSplit, history_length: int, ratings: tuple[np.ndarray, ...] | None = None
    ) -> "IALSMarket":
        """The market of ``split``; ``ratings`` (:func:`interaction_ratings`: training, validation and
        test) for the rating and log confidences."""
        train_ratings, valid_ratings, *test_ratings = ratings if ratings is not None else (None, None)
        valid_items = split.valid.candidates[:, 0]
        return cls(
            tensors=MarketTensors.from_split(split, history_length),
            train=MarketInteractions(split.train_users, split.train_items, split.num_users, train_ratings),
            with_valid=MarketInteractions(
                np.concatenate([split.train_users, split.valid.users]),
                np.concatenate([split.train_items, valid_items]),
                split.num_users,
                None if ratings is None else np.concatenate([train_ratings, valid_ratings]),
            ),
            test_ratings=test_ratings[0] if test_ratings else None,
        )


def interaction_ratings(
    split: MarketSplit, interactions: pd.DataFrame, catalog: Catalog
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rating of each training, each validation and each test interaction of ``split``.

    Parameters
    ----------
    split : MarketSplit
        The market's split, with its user IDs.
    interactions : pandas.DataFrame
        The table the split was made from (columns ``user``, ``item``, ``rating``).
    catalog : Catalog
        The catalog the split maps items through.

    Raises
    ------
    ValueError
        If an interaction of the split has no rating in the table.
    """
    table = pd.DataFrame(
        {
            "user": interactions["user"].astype(str),
            "row": catalog.rows(interactions["item"]),
            "rating": interactions["rating"].to_numpy(dtype=np.float64),
        }
    ).drop_duplicates(["user", "row"], keep="last")
    ids = np.asarray(split.user_ids, dtype=object)

    def ratings(users: np.ndarray, rows: np.ndarray) -> np.ndarray:
        keys = pd.DataFrame({"user": ids[users], "row": rows})
        found = keys.merge(table, on=["user", "row"], how="left")["rating"].to_numpy(dtype=np.float64)
        if np.isnan(found).any():
            raise ValueError(f"Market '{split.market}': {int(np.isnan(found).sum())} interactions have no rating.")
        return found

    return (
        ratings(split.train_users, split.train_items),
        ratings(split.valid.users, split.valid.candidates[:, 0]),
        ratings(split.test.users, split.test.candidates[:, 0]),
    )


HISTORY_BLOCK = 1 << 17  # users whose history means and offsets are computed at once


@dataclass(frozen=True)
class HistoryHead:
    """The head's stand-in for a user's factor from their history: ``x ≈ x̄ + P·h̄``."""

    mean_user: np.ndarray  # x̄, (d,)
    projection: np.ndarray  # P, (d, d)

    @classmethod
    def fit(cls, user_factors: np.ndarray, means: np.ndarray) -> "HistoryHead":
        """``x̄`` and the ridge least-squares ``P`` of ``x_u − x̄ ≈ P·h̄_u`` over the market's users."""
        mean_user = user_factors.mean(axis=0)
        gram = means.T @ means
        scale = np.trace(gram) / len(gram)
        ridge = HISTORY_RIDGE * scale if scale > 0 else 1.0  # no history at all: P = 0
        # Σ_u h̄_u (x_u − x̄)ᵀ without the (users, d) difference: a million users' copy is 1 GB.
        cross = means.T @ user_factors - np.outer(means.sum(axis=0), mean_user)
        projection = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross).T
        return cls(mean_user, projection)

    def offsets(self, user_factors: np.ndarray, means: np.ndarray) -> np.ndarray:
        """The user embeddings that make the head give ``user_factors`` exactly: ``x_u − x̄ − P·h̄_u``.

        float32, as the model's embedding table holds them, computed a block of users at a time.
        """
        offsets = np.empty(user_factors.shape, dtype=np.float32)
        for start in range(0, len(user_factors), HISTORY_BLOCK):
            block = slice(start, start + HISTORY_BLOCK)
            offsets[block] = user_factors[block] - self.mean_user - means[block] @ self.projection.T
        return offsets


def history_means(items: ItemFactors, history: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``h̄_u``: the mean item factor of each user's history, pooled as :class:`MarketHead` pools it.

    Parameters
    ----------
    items : ItemFactors
        The item factors (rows not listed are zero).
    history, mask : torch.Tensor
        ``(users, history_length)`` catalog rows and 1.0 where a row holds an item.
    """
    means = np.zeros((len(history), items.dim))
    if not history.numel():
        return means
    # Rows without a factor point at a zero row appended last; torch's embedding_bag sums each
    # user's weighted rows in one call, (users, d) in memory, never (users, history, d). Users
    # go in blocks so that the positions of a million users' histories are never all held.
    table = torch.cat([torch.as_tensor(items.factors), torch.zeros((1, items.dim), dtype=torch.float64)])
    for start in range(0, len(history), HISTORY_BLOCK):
        rows = history[start : start + HISTORY_BLOCK].numpy()
        weights = mask[start : start + HISTORY_BLOCK].to(torch.float64)
        index = torch.as_tensor(row_positions(items.rows, rows))
        total = torch.nn.functional.embedding_bag(index, table, per_sample_weights=weights, mode="sum")
        means[start : start + len(rows)] = (total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)).numpy()
    return means


def ials_recommender(
    items: ItemFactors, num_items: int, head: HistoryHead, offsets: np.ndarray, history_length: int
) -> SplitRecommender:
    """The split recommender of item factors ``items``, the history ``head`` and the user ``offsets``.

    Parameters
    ----------
    items : ItemFactors
        The item factors the market holds; every other row of the catalog is zero.
    num_items : int
        Rows of the item table (catalog plus overflow).
    head : HistoryHead
        ``x̄`` and ``P``.
    offsets : np.ndarray
        ``(users, d)`` the user embeddings, :meth:`HistoryHead.offsets`.
    history_length : int
        Training items pooled into a user's history, as the market's tensors hold them.
    """
    config = ModelConfig(num_items, len(offsets), items.dim, history_length, user_embeddings=True)
    with torch.device("meta"):  # no random initialisation of a table every value of which is set below
        model = SplitRecommender(config)
    model = model.to_empty(device="cpu")
    rows = torch.as_tensor(items.rows)
    with torch.no_grad():
        model.encoder.item_embedding.weight.zero_()
        model.encoder.item_embedding.weight[rows] = torch.as_tensor(items.factors, dtype=torch.float32)
        model.encoder.tower.weight.zero_()
        model.encoder.tower.bias.zero_()
        model.head.history_projection.weight.copy_(torch.as_tensor(head.projection))
        model.head.item_bias.weight.zero_()
        model.head.item_bias.weight[rows, 0] = torch.as_tensor(items.factors @ head.mean_user, dtype=torch.float32)
        model.head.user_embedding.weight.copy_(torch.as_tensor(offsets))
    return model.eval()


def evaluate_market(
    market: IALSMarket,
    items: ItemFactors,
    gram: np.ndarray,
    num_items: int,
    config: IALSConfig,
    user_factors: np.ndarray | None = None,
    *,
    item_rows: int,
) -> tuple[RankingMetrics, RankingMetrics, SplitRecommender]:
    """Validation and test metrics of the item factors ``items`` in ``market``, and the model to serve.

    Validation scores ``x_u · y_i`` with users solved on the training interactions, test with
    users folded in from training and validation (module docstring), both through the split
    recommender and :func:`common.train.evaluate`, sampled and full ranking.

    Parameters
    ----------
    market : IALSMarket
        The market.
    items : ItemFactors
        Factors of (at least) the market's assortment.
    gram : np.ndarray
        ``(d, d)`` ``YᵀY`` over the whole item table.
    num_items : int
        Rows of the item table (the catalog's): the served model's size.
    config : IALSConfig
        Hyper-parameters of the user solves.
    user_factors : np.ndarray, optional
        The users solved on the training interactions against ``items``, when already at hand.
    item_rows : int
        Rows of the whole table that hold a factor: |I| of the user solves (``common.ials.steps.solve_users``).

    Returns
    -------
    tuple[RankingMetrics, RankingMetrics, SplitRecommender]
        Validation and test metrics, and the model as of the test evaluation.
    """
    if user_factors is None:
        user_factors = solve_users(market.train, items, gram, item_rows, config)
    folded = solve_users(market.with_valid, items, gram, item_rows, config)
    return evaluate_factors(market, items, num_items, user_factors, folded)


def evaluate_factors(
    market: IALSMarket, items: ItemFactors, num_items: int, user_factors: np.ndarray, folded: np.ndarray
) -> tuple[RankingMetrics, RankingMetrics, SplitRecommender]:
    """Validation and test metrics of given factors in ``market``, and the model to serve.

    :func:`evaluate_market` once the users are solved, for factors from elsewhere too (implicit's
    ALS in :mod:`simulations.baselines`): validation scores ``user_factors · y_i``, test
    ``folded · y_i``, both ``(users, d)`` over the market's users.
    """
    tensors = market.tensors
    means = history_means(items, tensors.history, tensors.history_mask)
    head = HistoryHead.fit(user_factors, means)
    model = ials_recommender(items, num_items, head, head.offsets(user_factors, means), tensors.history.shape[1])
    del means  # (users, d) float64: a million users' is 1 GB, and the test's comes next
    valid = evaluate(model, tensors)
    test_means = history_means(items, tensors.test_history, tensors.test_history_mask)
    with torch.no_grad():
        model.head.user_embedding.weight.copy_(torch.as_tensor(head.offsets(folded, test_means)))
    return valid, evaluate(model, tensors, on_test=True), model


def refit_recommender(
    market: IALSMarket,
    items: ItemFactors,
    gram: np.ndarray,
    num_items: int,
    config: IALSConfig,
    history_length: int,
    *,
    item_rows: int,
) -> SplitRecommender:
    """The model a market serves after a refit for serving: every interaction in its users and their histories.

    The users are solved on :attr:`IALSMarket.everything` against the refit's item factors, and
    each user's history is the last ``history_length`` of all their interactions, as the served
    model keeps them (:func:`common.serving.format.full_histories`), so that a known user scores
    ``x_u · y_i`` when served. Nothing is held out, so nothing is evaluated.

    Parameters
    ----------
    market, items, gram, num_items, config, item_rows
        As :func:`evaluate_market`.
    history_length : int
        Items pooled into a user's history, as the market's tensors hold them.
    """
    users = solve_users(market.everything, items, gram, item_rows, config)
    history, mask = last_items(*full_histories(market.split), history_length)
    means = history_means(items, history, mask)
    head = HistoryHead.fit(users, means)
    return ials_recommender(items, num_items, head, head.offsets(users, means), history_length)


def last_items(offsets: np.ndarray, rows: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's last ``length`` of ``rows[offsets[u]:offsets[u + 1]]``, oldest first, left-aligned as
    :class:`common.neural.train.MarketTensors` holds histories, and 1.0 where a slot holds an item."""
    users = len(offsets) - 1
    take = np.minimum(np.diff(offsets), length)
    user = np.repeat(np.arange(users), take)
    column = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    history = np.zeros((users, length), dtype=np.int64)
    mask = np.zeros((users, length), dtype=np.float32)
    history[user, column] = rows[np.repeat(offsets[1:] - take, take) + column]
    mask[user, column] = 1.0
    return torch.as_tensor(history), torch.as_tensor(mask)


# --- the shared state: the encoder's state dict holding Y ---------------------------------------


def encoder_state(table: np.ndarray) -> dict[str, torch.Tensor]:
    """The encoder's state dict of item table ``Y`` ``(rows, d)``: float32, the tower zero (identity)."""
    dim = table.shape[1]
    return {
        ITEM_TABLE: torch.as_tensor(np.asarray(table, dtype=np.float32)),
        TOWER_WEIGHT: torch.zeros((dim, dim)),
        TOWER_BIAS: torch.zeros(dim),
    }


def initial_rows(rows: np.ndarray, config: IALSConfig) -> ItemFactors:
    """The seeded initial factors of catalog ``rows`` as the server's float32 table holds them."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    factors = initial_item_factors(rows, config.factors, config.seed, config.init_std)
    return ItemFactors(rows, factors.astype(np.float32).astype(np.float64))


def initial_encoder_state(num_items: int, config: IALSConfig) -> dict[str, torch.Tensor]:
    """The encoder state of fedals' round 1: every catalog row's seeded initial factor."""
    table = np.empty((num_items, config.factors), dtype=np.float32)
    for start in range(0, num_items, _INITIAL_CHUNK):
        rows = np.arange(start, min(start + _INITIAL_CHUNK, num_items))
        table[rows] = initial_rows(rows, config).factors
    return encoder_state(table)
