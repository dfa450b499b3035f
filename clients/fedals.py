"""fedals in a market: solve its users against the received item factors, reply with item-side sums.

Train message: the item factors of the market's assortment and the Gram ``YᵀY`` (in round 1
the Gram alone, and the market draws its seeded initial rows itself). The market solves its
users (:func:`common.ials.solve_users`), evaluates the received factors when the server folds
the evaluation into the message, and replies with :func:`common.ials.packed.pack_market_statistics` of its
item statistics (checked item-side with :func:`common.ials_wire.check_item_side` before they leave),
its assortment's rows and numbers. Evaluate message: the same factors, evaluated.

Under DP (``dp-epsilon`` > 0) the reply is instead the market's private release
(:func:`common.dp_ials.private_release`): clipped, noised item sums and Grams, one Gaussian
release per round recorded in the market's lifetime ledger before it is made
(:func:`clients.privacy_state.release_ledger`); a market out of budget sends a release of zeros
with weight 0 and still evaluates.

Nothing user-indexed is sent: user factors are solved afresh from the received items every
round and kept only in the market, for its step over the items that never leave it
(:func:`_with_private_items`): in ``context.state`` and, in a deployed region, in its
``state-dir`` for the last two rounds it trained (:class:`clients.state_store.UsersStore`), so that a restarted
SuperNode or a resumed server trains and evaluates a round as the lost attempt did. The model a market
serves is the iALS factors as a split recommender (:mod:`common.ials.model`), its best
validation round written by :mod:`clients.served` at the final round, as for the other methods.
``fedals-pt`` serves instead the private transfer (:mod:`common.ials.transfer`): after the last
round the market refits its own data, without noise, on the received factors, and keeps the
candidate best on its validation; nothing of that fit is sent.
"""

import hashlib
import time
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.common import log

from clients.local_model import config_from_context, resolve_market
from clients.messages import Disclosure, evaluation_metrics, reply
from clients.privacy_state import (
    MarketPrivacy,
    insecure_marker,
    node_settings,
    out_of_budget,
    region_policy,
    release_ledger,
    released_users,
    released_weight,
    state_dir,
    training_noise_seed,
)
from clients.served import remember_if_best, write_best_model, write_refit_model
from clients.state_store import UsersStore
from common.config import parse_bool
from common.data.catalog import Catalog
from common.data.interactions import read_interactions
from common.data.markets import MarketSource
from common.data.split import MarketSplit
from common.ials.core import IALSConfig, ItemFactors, MarketInteractions
from common.ials.dp import noise_generator, private_release, zero_release
from common.ials.model import IALSMarket, evaluate_market, initial_rows, interaction_ratings, refit_recommender
from common.ials.packed import pack_market_statistics
from common.ials.private import merged, min_buyers, restricted, shared_items, solve_private_items
from common.ials.steps import solve_users
from common.ials.transfer import candidates, choose
from common.ials.wire import (
    ASSORTMENT_KEY,
    INITIAL_ROWS_KEY,
    ITEM_SIDE_KEYS,
    check_item_side,
    item_rows_problem,
    unpack_item_factors,
)
from common.methods import get_method
from common.neural.model import SplitRecommender
from common.privacy.ledger import PrivacyBudgetExceeded
from common.privacy.region import RegionPolicy, public_assortment
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    EVALUATE_RECEIVED_KEY,
    EVALUATION_METRICS,
    FINAL_ROUND_KEY,
    NUM_EXAMPLES_KEY,
    RECEIVED_PREFIX,
    REFIT_KEY,
    SERVER_ROUND_KEY,
    TRAIN_SECONDS_KEY,
    TRAINED_KEY,
    TRAINING_ID_KEY,
    TRANSFER_PREFIX,
    USER_GRAM_KEY,
)
from common.run_config import RunConfig
from common.runtime.sized_cache import SizedCache

PRIVATE_STATE = "fedals-private-users"  # context.state: this market's last user factors, for its private item step

# The markets this process prepared, the most recent first out of memory beyond this many training
# interactions: a simulation's worker trains whichever market it is handed, and a million-user
# market's arrays are gigabytes (common.runtime.sized_cache).
MARKET_CACHE_INTERACTIONS = 4_000_000
_markets: SizedCache[IALSMarket] = SizedCache(MARKET_CACHE_INTERACTIONS)
# (market, training interactions or not) -> (the interactions, their digest)
_digests: dict[tuple[str, bool], tuple[MarketInteractions, str]] = {}


def train(msg: Message, context: Context) -> Message:
    """One ALS iteration's market side: the user step, and the item statistics it yields for the server."""
    market, catalog, config = _market(context)
    ials = config.ials_config()
    round_config = msg.content[CONFIG_RECORD]
    server_round = int(round_config[SERVER_ROUND_KEY])
    split = market.split
    # A refit for serving (serve-refit) trains on every interaction; a training round on the training ones.
    interactions = market.everything if _refit(round_config, config, split.market) else market.train
    if interactions is not market.train and parse_bool(
        EVALUATE_RECEIVED_KEY, round_config.get(EVALUATE_RECEIVED_KEY, False)
    ):
        # Validation scored with users solved on the validation items would pass for a better round.
        raise ValueError(
            f"Market '{split.market}': a round of a refit for serving evaluates nothing, but the server asked "
            "for the received factors' evaluation in it."
        )
    items, gram, item_rows = _received(msg, market, catalog, ials)
    started = time.perf_counter()
    minimum = 1
    if config.dp_epsilon == 0:
        minimum = min_buyers(context.run_config, node_settings(context), split.market)
        items, gram, item_rows = _with_private_items(
            context, msg, market, interactions, (items, gram, item_rows), ials, minimum
        )
    users = solve_users(interactions, items, gram, item_rows, ials)
    training_id = str(round_config.get(TRAINING_ID_KEY, ""))
    policy = region_policy(context, split.market)
    metrics: dict[str, Any]
    if config.dp_epsilon > 0:
        # Under DP the released rows are public (the region's product list or the catalog),
        # never the items its users happen to have bought.
        rows = public_assortment(policy, catalog)
        statistics, metrics = _private_release(
            context, market, interactions, config, users, (server_round, training_id), rows, policy
        )
    else:
        rows = split.market_items
        # Only the items with at least `minimum` buyers here leave the market (common.ials.private).
        shared = restricted(interactions, shared_items(interactions, minimum))
        statistics = pack_market_statistics(shared, users, ials, config.als_wire)
        check_item_side(statistics, shared.items, ials.factors)
        _remember_users(context, market, interactions, users, server_round, training_id)
        count = len(interactions.users)
        metrics = {NUM_EXAMPLES_KEY: count, TRAINED_KEY: int(count > 0)}
    metrics[TRAIN_SECONDS_KEY] = time.perf_counter() - started
    if parse_bool(EVALUATE_RECEIVED_KEY, round_config.get(EVALUATE_RECEIVED_KEY, False)):
        # The previous round's item factors, evaluated with the users this round solved on them.
        received = _evaluate(
            context, market, catalog, config, (items, gram, item_rows), server_round - 1, training_id, users
        )[0]
        metrics.update({RECEIVED_PREFIX + key: value for key, value in received.items()})
    sent = statistics | {ASSORTMENT_KEY: np.asarray(rows, dtype=np.int64)}
    return reply(
        msg,
        split.market,
        metrics,
        ArrayRecord({name: Array(value) for name, value in sent.items()}),
        disclosure=Disclosure.of(config, policy),
    )


def evaluate(msg: Message, context: Context) -> Message:
    """Validation and test metrics of the received item factors; at the final round, the served model."""
    market, catalog, config = _market(context)
    ials = config.ials_config()
    round_config = msg.content[CONFIG_RECORD]
    refit = _refit(round_config, config, market.split.market)
    interactions = market.everything if refit else market.train
    items, gram, item_rows = _received(msg, market, catalog, ials)
    if config.dp_epsilon == 0:
        minimum = min_buyers(context.run_config, node_settings(context), market.split.market)
        items, gram, item_rows = _with_private_items(
            context, msg, market, interactions, (items, gram, item_rows), ials, minimum
        )
    server_round = int(round_config.get(SERVER_ROUND_KEY, 0))
    item_side = (items, gram, item_rows)
    if refit:
        return _serve_refit(context, msg, market, catalog, config, item_side, server_round)
    metrics, model = _evaluate(
        context, market, catalog, config, item_side, server_round, str(round_config.get(TRAINING_ID_KEY, ""))
    )
    if parse_bool(FINAL_ROUND_KEY, round_config.get(FINAL_ROUND_KEY, False)):
        method = get_method(config.method)
        fit = None
        if method.transfer:
            transfer_metrics, fit = _transfer(context, market, catalog, config, item_side, server_round)
            metrics.update(transfer_metrics)
        training_id = str(round_config.get(TRAINING_ID_KEY, ""))
        write_best_model(context, model, market.tensors, catalog, method, training_id, fit)
    policy = region_policy(context, market.split.market)
    weight = released_weight(MarketPrivacy(context, market.split.market)) if config.dp_epsilon > 0 else None
    return reply(msg, market.split.market, metrics, disclosure=Disclosure.of(config, policy, weight))


def _refit(round_config: ConfigRecord, config: RunConfig, market: str) -> bool:
    """Whether the server's message is a round of a refit for serving (``serve-refit``).

    Raises
    ------
    ValueError
        For a refit under DP: the noise is calibrated so that the training's rounds spend the
        budget, so a refit's releases would find it spent and the refit would be the seeded
        start, served in place of the trained model.
    """
    refit = parse_bool(REFIT_KEY, round_config.get(REFIT_KEY, False))
    if refit and config.dp_epsilon > 0:
        raise ValueError(
            f"Market '{market}' trains under DP, whose budget the training's rounds spend: it makes no refit "
            "for serving and serves its best validation round."
        )
    return refit


def _serve_refit(
    context: Context,
    msg: Message,
    market: IALSMarket,
    catalog: Catalog,
    config: RunConfig,
    item_side: tuple[ItemFactors, np.ndarray, int],
    server_round: int,
) -> Message:
    """The last evaluate of a refit for serving: the market writes the refit as its served model.

    Nothing is held out of a refit, so nothing is evaluated and no metric is sent; the reply
    carries the interactions it trained on (there is no refit under DP).
    """
    round_config = msg.content[CONFIG_RECORD]
    if not parse_bool(FINAL_ROUND_KEY, round_config.get(FINAL_ROUND_KEY, False)):
        raise ValueError(
            f"Market '{market.split.market}': a refit for serving is evaluated only at its last round, "
            "where the market writes it; the server asked for an evaluation before."
        )
    items, gram, item_rows = item_side
    model = refit_recommender(
        market, items, gram, catalog.size, config.ials_config(), config.history_length, item_rows=item_rows
    )
    training_id = str(round_config.get(TRAINING_ID_KEY, ""))
    method = get_method(config.method)
    write_refit_model(context, model, market.tensors, catalog, method, training_id, server_round, {})
    policy = region_policy(context, market.split.market)
    metrics = {NUM_EXAMPLES_KEY: len(market.everything.users)}  # no refit under DP (_refit)
    return reply(msg, market.split.market, metrics, disclosure=Disclosure.of(config, policy))


def _private_release(
    context: Context,
    market: IALSMarket,
    interactions: MarketInteractions,
    config: RunConfig,
    users: np.ndarray,
    round_of: tuple[int, str],
    rows: np.ndarray,
    policy: RegionPolicy,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """This round's DP release of ``interactions`` over the public ``rows`` and its metrics; zeros of
    weight 0 once the budget is spent. ``round_of`` is the server round and the training's id.

    The release is recorded in the ledger before it is made, and the ledger is saved before
    the reply leaves, so that no release goes unaccounted. The weight is the user count the
    ledger released, never the count itself.
    """
    split = market.split
    name = split.market
    server_round, training_id = round_of
    privacy = MarketPrivacy(context, name)
    with privacy.hold():
        entry = privacy.load()
        try:
            entry = release_ledger(privacy, config, split.num_users, training_id, policy)
            entry.ledger.record(1)
            privacy.save(entry)  # recorded before anything is computed from the data for the release
            generator = noise_generator(training_noise_seed(policy, config, name, server_round))
            release = private_release(interactions, users, rows, entry.ledger.noise_multiplier, generator)
            examples = released_users(entry)
        except PrivacyBudgetExceeded as error:
            # Out of budget: nothing of the data is sent, only zeros that add nothing to the sums.
            out_of_budget(entry, error, name)
            release = zero_release(len(rows), config.als_factors)
            examples = 0
        if entry is not None:
            privacy.save(entry)
        metrics = {
            NUM_EXAMPLES_KEY: examples,
            TRAINED_KEY: int(examples > 0),
            **privacy.spent(config),
            **insecure_marker(policy, name),
        }
    return release, metrics


def _transfer(
    context: Context,
    market: IALSMarket,
    catalog: Catalog,
    config: RunConfig,
    item_side: tuple[ItemFactors, np.ndarray, int],
    server_round: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """fedals-pt's private transfer after the last round: its reply metrics and the fit to serve.

    The candidates are fitted on the market's own data and the factors it received
    (``item_side``: the factors, the Gram and the rows with a factor); only their evaluation
    metrics are reported.
    """
    items, gram, item_rows = item_side
    choice = choose(candidates(market, items, gram, catalog.size, config.ials_config(), shared_rows=item_rows))
    chosen = choice.chosen
    metrics = evaluation_metrics(chosen.valid, chosen.test)
    metrics.pop(NUM_EXAMPLES_KEY)
    spent = MarketPrivacy(context, market.split.market).spent(config)
    fit = {
        "state": chosen.model.state_dict(),
        "round": server_round,
        "metrics": {key: metrics[key] for key in EVALUATION_METRICS},
        "spent": spent,
        "manifest": {
            "transfer": {
                "chosen": chosen.name,
                "validation-ndcg@10": choice.validation,
                "local-fit": "without noise, on the market's own data; never sent",
            }
        },
    }
    return {TRANSFER_PREFIX + key: value for key, value in metrics.items()}, fit


def _evaluate(
    context: Context,
    market: IALSMarket,
    catalog: Catalog,
    config: RunConfig,
    item_side: tuple[ItemFactors, np.ndarray, int],
    server_round: int,
    training_id: str,
    users: np.ndarray | None = None,
) -> tuple[dict[str, Any], SplitRecommender]:
    """The metrics of the received ``item_side`` (factors, Gram, rows with a factor) in the
    market (with the privacy spent under DP) and its model.

    The model is kept as the served candidate if its round is the best so far.
    """
    items, gram, item_rows = item_side
    valid, test, model = evaluate_market(
        market, items, gram, catalog.size, config.ials_config(), users, item_rows=item_rows
    )
    metrics = MarketPrivacy(context, market.split.market).spent(config) | evaluation_metrics(valid, test)
    remember_if_best(context, model, market.split.market, server_round, metrics, training_id)
    return metrics, model


def _with_private_items(
    context: Context,
    msg: Message,
    market: IALSMarket,
    interactions: MarketInteractions,
    item_side: tuple[ItemFactors, np.ndarray, int],
    ials: IALSConfig,
    minimum: int,
) -> tuple[ItemFactors, np.ndarray, int]:
    """The received factors with the market's private rows, the Gram with theirs added, and
    the rows with a factor counting them.

    The items the market has fewer than ``minimum`` buyers of never leave it; it solves them
    itself (:func:`common.ials_private.solve_private_items`) from its users of the last round it
    trained (kept in ``context.state``) and the federation's user Gram of that round (sent by
    the server as ``user-gram``). Where the server holds a factor (another market sent the
    item), the server's is kept. Without a Gram or kept users (round 1, a restarted node) the
    received factors are used as they are. ``interactions`` are those the users were solved on
    (the market's training ones, or every one in a refit); ``item_side`` the factors, the Gram
    and the rows with a factor the server sent.
    """
    items, gram, item_rows = item_side
    if minimum <= 1 or USER_GRAM_KEY not in msg.content[ARRAYS_RECORD]:
        return items, gram, item_rows
    round_config = msg.content[CONFIG_RECORD]
    server_round = int(round_config.get(SERVER_ROUND_KEY, 0))
    before = server_round - 1 if msg.metadata.message_type == MessageType.TRAIN else server_round
    users = _kept_users(context, market, interactions, before, str(round_config.get(TRAINING_ID_KEY, "")))
    if users is None:
        return items, gram, item_rows
    user_gram = msg.content[ARRAYS_RECORD][USER_GRAM_KEY].numpy().astype(np.float64)
    dim = ials.factors
    if (
        users.shape != (market.split.num_users, dim)
        or user_gram.shape != (dim + 1, dim + 1)
        or not np.isfinite(user_gram).all()
    ):
        raise ValueError(
            f"Market '{market.split.market}': the server's {USER_GRAM_KEY} is {user_gram.shape}, not "
            f"({dim + 1}, {dim + 1}) finite values for als-factors {dim}."
        )
    private = restricted(interactions, shared_items(interactions, minimum), keep=False)
    solved = solve_private_items(private, users, user_gram, ials)
    items, used = merged(items, solved)
    return items, gram + used.gram(), item_rows + used.held_rows()


def _remember_users(
    context: Context,
    market: IALSMarket,
    interactions: MarketInteractions,
    users: np.ndarray,
    server_round: int,
    training_id: str,
) -> None:
    """Keep this round's user factors in the market for its next private item step.

    In ``context.state``, and in a deployed region's ``state-dir``
    (:class:`clients.state_store.UsersStore`). A failed write is reported and the training
    goes on (a later restart then solves as in round 1).
    """
    context.state[PRIVATE_STATE] = ArrayRecord({"users": Array(np.ascontiguousarray(users))})
    context.state[PRIVATE_STATE + "-round"] = ConfigRecord(
        {"round": server_round, "training-id": training_id, "refit": int(interactions is not market.train)}
    )
    directory = state_dir(context) if "market" in context.node_config else None
    if directory is None:
        return
    try:
        UsersStore(directory, market.split.market).save(users, server_round, training_id, _digest(market, interactions))
    except OSError as error:
        log(WARNING, "Market %s: its users of round %d were not kept (%s).", market.split.market, server_round, error)


def _digest(market: IALSMarket, interactions: MarketInteractions) -> str:
    """A digest of the interactions the user factors are solved on (once per market, data and process):
    the training ones, or every one in a refit, so that users of one are never taken for the other's."""
    key = (market.split.market, interactions is market.train)
    cached = _digests.get(key)
    if cached is not None and cached[0] is interactions:
        return cached[1]
    digest = hashlib.sha256(f"{interactions.num_users}:{len(interactions.users)}".encode())
    digest.update(np.ascontiguousarray(interactions.users, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(interactions.items, dtype=np.int64).tobytes())
    _digests[key] = (interactions, digest.hexdigest())
    return digest.hexdigest()


def _kept_users(
    context: Context, market: IALSMarket, interactions: MarketInteractions, before: int, training_id: str
) -> np.ndarray | None:
    """The user factors of the last round up to ``before`` the market trained, or None.

    ``context.state`` holds those of the last round this process trained; a fresh context
    (a restarted SuperNode, or a resumed server's new run) reads them from the state-dir, of
    the same training and the same data. A file that cannot be used is reported and skipped:
    the market then uses the received factors as they are, as in round 1.
    """
    kept = context.state.get(PRIVATE_STATE + "-round")
    if (
        PRIVATE_STATE in context.state
        and kept is not None
        and int(kept["refit"]) == int(interactions is not market.train)
    ):
        return context.state[PRIVATE_STATE]["users"].numpy().astype(np.float64)
    directory = state_dir(context) if "market" in context.node_config else None
    if directory is None:
        return None
    users, skipped = UsersStore(directory, market.split.market).load(before, training_id, _digest(market, interactions))
    for problem in skipped:
        log(WARNING, "Market %s: %s; it is not used.", market.split.market, problem)
    if users is not None and users.shape[0] != market.split.num_users:
        log(
            WARNING,
            "Market %s: its kept users are %d, not its %d; not used.",
            market.split.market,
            *users.shape[:1],
            market.split.num_users,
        )
        return None
    return users


def _market(context: Context) -> tuple[IALSMarket, Catalog, RunConfig]:
    """This node's market as iALS sees it (cached per process), its catalog and the run's settings."""
    config = config_from_context(context)
    split, catalog = resolve_market(context, config)
    # A region whose node config demands DP refuses this run, which trains without it.
    config = config.for_market(split.market, region_policy(context, split.market))
    key = (split.market, config.history_length, config.als_confidence)
    market = _markets.get(key)
    if market is None or market.split is not split:
        ratings = None if config.als_confidence == "binary" else _ratings(context, config, split, catalog)
        market = _markets.put(key, IALSMarket.from_split(split, config.history_length, ratings), split.num_train)
    return market, catalog, config


def _ratings(
    context: Context, config: RunConfig, split: MarketSplit, catalog: Catalog
) -> tuple[np.ndarray, np.ndarray]:
    """The ratings of the market's training and validation interactions, from its own file."""
    node = context.node_config
    if "market" in node:
        interactions = read_interactions(str(node["data-path"]))
    else:
        interactions = MarketSource(config.data_dir, config.synthetic_markets, config.seed).interactions(split.market)
    return interaction_ratings(split, interactions, catalog)


def _received(
    msg: Message, market: IALSMarket, catalog: Catalog, ials: IALSConfig
) -> tuple[ItemFactors, np.ndarray, int]:
    """The item factors of the market's rows, the Gram and the table's rows with a factor the server sent, checked.

    In round 1 of a seeded start the server sends the Gram alone: every catalog row holds its
    seeded factor, so all of them count.

    Raises
    ------
    ValueError
        If the arrays are not what fedals' server sends, have another number of factors than
        ``als-factors``, rows outside the catalog, or values that are not finite.
    """
    name = market.split.market
    arrays = {key: array.numpy() for key, array in msg.content[ARRAYS_RECORD].items() if key != USER_GRAM_KEY}
    initial = parse_bool(INITIAL_ROWS_KEY, msg.content[CONFIG_RECORD].get(INITIAL_ROWS_KEY, False))
    expected = {"gram"} if initial else set(ITEM_SIDE_KEYS)
    if set(arrays) != expected:
        raise ValueError(
            f"Market '{name}' expected the arrays {sorted(expected)} of fedals' server but received "
            f"{sorted(arrays)}; do server and client use the same method?"
        )
    if initial:
        items, gram = initial_rows(market.split.market_items, ials), arrays["gram"].astype(np.float64)
        item_rows = catalog.size
    else:
        try:
            items, gram, item_rows = unpack_item_factors(arrays)
        except ValueError as error:
            raise ValueError(f"Market '{name}': the server's {error}.") from None
        if problem := item_rows_problem(item_rows, items, catalog.size):
            raise ValueError(f"Market '{name}': the server's {problem}.")
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
    if problem := gram_problem(items, gram):
        raise ValueError(f"Market '{name}': {problem}; the market evaluates and trains only on a consistent table.")
    return items, gram, item_rows


def gram_problem(items: ItemFactors, gram: np.ndarray) -> str | None:
    """Why ``gram`` cannot be ``YᵀY`` of a table holding ``items``, or None.

    The server sends a market the factors of its rows and the Gram of the whole table. A Gram
    inconsistent with those factors (not symmetric, or ``G − Y_rᵀY_r`` not positive
    semi-definite) lets the server make the market solve and score on parameters no item table
    has; it is refused. The tolerance covers float32 rounding of the sent arrays.
    """
    gram = np.asarray(gram, dtype=np.float64)
    # float32 rounds each entry by at most 2⁻²⁴ of itself: the sent Gram is within about
    # 1e-7·‖G‖_F of the server's; a tolerance of 1e-6·‖G‖_F covers it with room for the
    # float32 factors, and an entry inflated to widen it is itself out of scale with them.
    own = np.asarray(items.factors, dtype=np.float64)
    own_gram = own.T @ own
    tolerance = 1e-6 * (float(np.linalg.norm(gram)) + 1.0)
    if np.abs(gram - gram.T).max(initial=0.0) > tolerance:
        return "the server's Gram is not symmetric"
    rest = gram - own_gram
    if len(rest) and np.linalg.eigvalsh((rest + rest.T) / 2).min() < -tolerance:
        return "the server's Gram is not YᵀY of a table holding the item factors it sent"
    return None
