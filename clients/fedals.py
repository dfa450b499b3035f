"""fedals in a market: solve its users against the received item factors, reply with item-side sums.

Train message: the item factors of the market's assortment and the Gram ``YᵀY`` (in round 1
the Gram alone, and the market draws its seeded initial rows itself). The market solves its
users (:func:`common.ials.solve_users`), evaluates the received factors when the server folds
the evaluation into the message, and replies with :func:`common.ials_wire.pack_statistics` of its
item statistics (checked item-side with :func:`common.ials_wire.check_item_side` before they leave),
its assortment's rows and numbers. Evaluate message: the same factors, evaluated.

Under DP (``dp-epsilon`` > 0) the reply is instead the market's private release
(:func:`common.dp_ials.private_release`): clipped, noised item sums and Grams, one Gaussian
release per round recorded in the market's lifetime ledger before it is made
(:func:`clients.privacy_state.release_ledger`); a market out of budget sends a release of zeros
with weight 0 and still evaluates.

Nothing user-indexed is sent: user factors are solved afresh from the received items every
round and never kept, so there is no head to persist in a deployed region. The model a market
serves is the iALS factors as a split recommender (:mod:`common.ials_model`), its best
validation round written by :mod:`clients.served` at the final round, as for the other methods.
``fedals-pt`` serves instead the private transfer (:mod:`common.transfer`): after the last
round the market refits its own data, without noise, on the received factors, and keeps the
candidate best on its validation; nothing of that fit is sent.
"""

import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from common.catalog import Catalog
from common.data import read_interactions
from common.dp_ials import noise_generator, private_release
from common.ials import IALSConfig, ItemFactors, market_item_statistics, solve_users
from common.ials_wire import check_item_side, pack_statistics, unpack_item_factors
from common.ials_model import (
    ASSORTMENT_KEY,
    INITIAL_ROWS_KEY,
    IALSMarket,
    evaluate_market,
    initial_rows,
    interaction_ratings,
)
from common.market_config import MarketConfig
from common.markets import MarketSource
from common.methods import get_method
from common.model import SplitRecommender
from common.privacy import PrivacyBudgetExceeded
from common.split import MarketSplit
from common.transfer import candidates, choose

from clients.local_model import config_from_context, resolve_market
from clients.messages import RECEIVED_PREFIX, evaluation_metrics, reply
from clients.privacy_state import MarketPrivacy, insecure_marker, out_of_budget, release_ledger, training_noise_seed
from clients.served import FINAL_KEY, KEPT_METRICS, remember_if_best, write_best_model

TRANSFER_PREFIX = "pt-"  # evaluate reply metrics of fedals-pt's served fit (as fedper-ft's "ft-")

_markets: dict[tuple[str, int, str], IALSMarket] = {}


def train(msg: Message, context: Context) -> Message:
    """One ALS iteration's market side: the user step, and the item statistics it yields for the server."""
    market, catalog, config = _market(context)
    ials = config.ials_config()
    round_config = msg.content["config"]
    server_round = int(round_config["server-round"])
    split = market.split
    items, gram = _received(msg, market, catalog, ials)
    started = time.perf_counter()
    users = solve_users(market.train, items, gram, catalog.size, ials)
    training_id = str(round_config.get("training-id", ""))
    metrics: dict[str, Any]
    if config.dp_epsilon > 0:
        statistics, metrics = _private_release(context, market, config, users, server_round, training_id)
    else:
        statistics = pack_statistics(market_item_statistics(market.train, users, ials), config.als_wire)
        check_item_side(statistics, market.train.items, ials.factors)
        metrics = {"num-examples": split.num_train, "trained": int(split.num_train > 0)}
    metrics["train-seconds"] = time.perf_counter() - started
    if bool(round_config.get("evaluate-received", False)):
        # The previous round's item factors, evaluated with the users this round solved on them.
        received = _evaluate(context, market, catalog, config, items, gram, server_round - 1, training_id, users)[0]
        metrics.update({RECEIVED_PREFIX + key: value for key, value in received.items()})
    sent = statistics | {ASSORTMENT_KEY: split.market_items.astype(np.int64)}
    return reply(msg, split.market, metrics, ArrayRecord({name: Array(value) for name, value in sent.items()}))


def evaluate(msg: Message, context: Context) -> Message:
    """Validation and test metrics of the received item factors; at the final round, the served model."""
    market, catalog, config = _market(context)
    ials = config.ials_config()
    round_config = msg.content["config"]
    items, gram = _received(msg, market, catalog, ials)
    server_round = int(round_config.get("server-round", 0))
    metrics, model = _evaluate(context, market, catalog, config, items, gram, server_round,
                               str(round_config.get("training-id", "")))
    if bool(round_config.get(FINAL_KEY, False)):
        method = get_method(config.method)
        fit = None
        if method.transfer:
            transfer_metrics, fit = _transfer(context, market, catalog, config, items, gram, server_round)
            metrics.update(transfer_metrics)
        write_best_model(context, model, market.tensors, catalog, method, fit)
    return reply(msg, market.split.market, metrics)


def _private_release(
    context: Context, market: IALSMarket, config: MarketConfig, users: np.ndarray, server_round: int,
    training_id: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """This round's DP release and its reply metrics; zeros with weight 0 when the budget is spent.

    The release is recorded in the ledger before it is made, and the ledger is saved before
    the reply leaves, so that no release goes unaccounted.
    """
    split = market.split
    name = split.market
    privacy = MarketPrivacy(context, name)
    with privacy.hold():
        entry = privacy.load()
        try:
            entry = release_ledger(privacy, config, split.num_users, training_id)
            entry.ledger.record(1)
            generator = noise_generator(training_noise_seed(config, name, server_round))
            release = private_release(market.train, users, split.market_items, entry.ledger.noise_multiplier,
                                      generator)
            examples = split.num_users  # public (it sets delta); the number of interactions is not
        except PrivacyBudgetExceeded as error:
            # Out of budget: nothing of the data is sent, only zeros that add nothing to the sums.
            out_of_budget(entry, error, name)
            release = private_release(market.train, np.zeros_like(users), split.market_items, 0.0,
                                      noise_generator(0))
            examples = 0
        if entry is not None:
            privacy.save(entry)
        metrics = {"num-examples": examples, "trained": int(examples > 0), **privacy.spent(config),
                   **insecure_marker(config, name)}
    return release, metrics


def _transfer(
    context: Context, market: IALSMarket, catalog: Catalog, config: MarketConfig, items: ItemFactors,
    gram: np.ndarray, server_round: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """fedals-pt's private transfer after the last round: its reply metrics and the fit to serve.

    The candidates are fitted on the market's own data and the factors it received; only
    their evaluation metrics are reported.
    """
    choice = choose(candidates(market, items, gram, catalog.size, config.ials_config()))
    chosen = choice.chosen
    metrics = evaluation_metrics(chosen.valid, chosen.test)
    metrics.pop("num-examples")
    spent = MarketPrivacy(context, market.split.market).spent(config)
    fit = {
        "state": chosen.model.state_dict(),
        "round": server_round,
        "metrics": {key: metrics[key] for key in KEPT_METRICS},
        "spent": spent,
        "manifest": {"transfer": {"chosen": chosen.name, "validation-ndcg@10": choice.validation,
                                  "local-fit": "without noise, on the market's own data; never sent"}},
    }
    return {TRANSFER_PREFIX + key: value for key, value in metrics.items()}, fit


def _evaluate(
    context: Context, market: IALSMarket, catalog: Catalog, config: MarketConfig, items: ItemFactors,
    gram: np.ndarray, server_round: int, training_id: str, users: np.ndarray | None = None,
) -> tuple[dict[str, Any], SplitRecommender]:
    """The metrics of ``items`` in the market (with the privacy spent under DP) and its model.

    The model is kept as the served candidate if its round is the best so far.
    """
    valid, test, model = evaluate_market(market, items, gram, catalog.size, config.ials_config(), users)
    metrics = MarketPrivacy(context, market.split.market).spent(config) | evaluation_metrics(valid, test)
    remember_if_best(context, model, market.split.market, server_round, metrics, training_id)
    return metrics, model


def _market(context: Context) -> tuple[IALSMarket, Catalog, MarketConfig]:
    """This node's market as iALS sees it (cached per process), its catalog and the run's settings."""
    config = config_from_context(context)
    split, catalog = resolve_market(context, config)
    # A region whose node config demands DP refuses this run, which trains without it.
    config = config.for_market(split.market, split.num_users, context.node_config)
    key = (split.market, config.history_length, config.als_confidence)
    if key not in _markets or _markets[key].split is not split:
        ratings = None if config.als_confidence == "binary" else _ratings(context, config, split, catalog)
        _markets[key] = IALSMarket.from_split(split, config.history_length, ratings)
    return _markets[key], catalog, config


def _ratings(
    context: Context, config: MarketConfig, split: MarketSplit, catalog: Catalog
) -> tuple[np.ndarray, np.ndarray]:
    """The ratings of the market's training and validation interactions, from its own file."""
    node = context.node_config
    if "market" in node:
        interactions = read_interactions(str(node["data-path"]))
    else:
        interactions = MarketSource(config.data_dir, config.synthetic_markets, config.seed).interactions(split.market)
    return interaction_ratings(split, interactions, catalog)


def _received(msg: Message, market: IALSMarket, catalog: Catalog, ials: IALSConfig) -> tuple[ItemFactors, np.ndarray]:
    """The item factors of the market's rows and the Gram the server sent, checked.

    Raises
    ------
    ValueError
        If the arrays are not what fedals' server sends, have another number of factors than
        ``als-factors``, rows outside the catalog, or values that are not finite.
    """
    name = market.split.market
    arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    initial = bool(msg.content["config"].get(INITIAL_ROWS_KEY, False))
    expected = {"gram"} if initial else {"items", "factors", "gram"}
    if set(arrays) != expected:
        raise ValueError(
            f"Market '{name}' expected the arrays {sorted(expected)} of fedals' server but received "
            f"{sorted(arrays)}; do server and client use the same method?"
        )
    if initial:
        items, gram = initial_rows(market.split.market_items, ials), arrays["gram"].astype(np.float64)
    else:
        items, gram = unpack_item_factors(arrays)
    dim = ials.factors
    if gram.shape != (dim, dim) or items.dim != dim:
        raise ValueError(
            f"Market '{name}': the server sent item factors of width {items.dim} and a {gram.shape} Gram, but "
            f"als-factors is {dim}; server and regions must use the same als-factors."
        )
    if len(items.rows) and (items.rows[0] < 0 or items.rows[-1] >= catalog.size):
        raise ValueError(
            f"Market '{name}': the server sent factors of rows outside its catalog of {catalog.size} rows; "
            "server and regions must use the same catalog (catalog-path)."
        )
    if not (np.isfinite(items.factors).all() and np.isfinite(gram).all()):
        raise ValueError(f"Market '{name}': the server's item factors hold NaN or infinite values.")
    return items, gram
