"""ClientApp: a market trains on its private data and shares only the encoder.

The handlers are thin: :mod:`clients.local_model` builds the market's model
from the message and its state, :mod:`clients.privacy_state` keeps its DP
ledger, :mod:`clients.messages` decides what a reply or an error may carry.
Its head (user embeddings, history projection, popularity bias) never enters
a reply. fedals (federated implicit ALS) is handled by :mod:`clients.fedals`:
its markets send item-side statistics summed over their users instead.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from clients import fedals
from clients.local_model import LOCAL_STATE_KEY, OWN_ARRAYS_KEY, build_local_model, persist
from clients.messages import Disclosure, errors_stay_in_region, evaluation_metrics, reply
from clients.privacy_state import (
    MarketPrivacy,
    insecure_marker,
    out_of_budget,
    region_policy,
    released_users,
    released_weight,
    round_ledger,
    training_noise_seed,
)
from clients.served import remember_if_best, write_best_model
from common.config import parse_bool
from common.data.markets import market_seed
from common.methods import FineTuned, fine_tune, get_method, local_round
from common.neural.model import SplitRecommender, get_arrays
from common.neural.train import MarketTensors, TrainConfig, evaluate
from common.privacy.dp_sgd import private_round, train_epochs_private
from common.privacy.ledger import PrivacyBudgetExceeded
from common.protocol import (
    BATCH_SIZE_KEY,
    CONFIG_RECORD,
    EVALUATE_RECEIVED_KEY,
    EVALUATION_METRICS,
    FINAL_ROUND_KEY,
    FINE_TUNE_EPOCHS_KEY,
    FINE_TUNE_PREFIX,
    HEAD_EPOCHS_KEY,
    LEARNING_RATE_KEY,
    LOCAL_EPOCHS_KEY,
    NEGATIVES_KEY,
    NUM_EXAMPLES_KEY,
    RECEIVED_PREFIX,
    SCORE_PENALTY_KEY,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    TRAINED_KEY,
    TRAINING_ID_KEY,
    VAL_HR_KEY,
    VAL_NDCG_KEY,
)
from common.run_config import RunConfig

app = ClientApp()


def train_config_from(record: ConfigRecord) -> TrainConfig:
    """The round's local training settings as the server sent them."""
    return TrainConfig(
        epochs=int(record[LOCAL_EPOCHS_KEY]),
        head_epochs=int(record[HEAD_EPOCHS_KEY]),
        batch_size=int(record[BATCH_SIZE_KEY]),
        learning_rate=float(record[LEARNING_RATE_KEY]),
        negatives=int(record[NEGATIVES_KEY]),
        score_penalty=float(record[SCORE_PENALTY_KEY]),
    )


def local_train_config(record: ConfigRecord, config: RunConfig) -> TrainConfig:
    """The server's settings for the round, with DP-SGD's own batch size and step size under DP."""
    train = train_config_from(record)
    if config.dp_epsilon > 0:
        return replace(
            train,
            batch_size=config.dp_batch_size,
            learning_rate=config.dp_learning_rate,
            user_positives=config.dp_user_positives,
        )
    return train


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; replies with the shared arrays and metrics only."""
    with errors_stay_in_region("training", _deployed_market(context)):
        return _family(context).train(msg, context)


@app.evaluate()
def evaluate_market(msg: Message, context: Context) -> Message:
    """Validation and test metrics with the received encoder and the local head.

    When the server asks for it (``fine-tune-epochs`` > 0, after the last
    round of fedper-ft), the market also fine-tunes a private fork and reports
    the fork's metrics at its best epoch on validation.
    """
    with errors_stay_in_region("evaluation", _deployed_market(context)):
        return _family(context).evaluate(msg, context)


def _deployed_market(context: Context) -> str | None:
    """The market a deployed region's node config names; None in simulation."""
    market = context.node_config.get("market")
    return str(market) if market is not None else None


@dataclass(frozen=True)
class ClientFamily:
    """A market's handlers of one method family (:mod:`common.methods`); the server's side is ``server.families``."""

    train: Callable[[Message, Context], Message]  # one round of local work; the reply to send
    evaluate: Callable[[Message, Context], Message]  # metrics of the received model; the reply to send


def _family(context: Context) -> ClientFamily:
    """The handlers of the run's method, chosen once per message by its family."""
    return CLIENT_FAMILIES[get_method(str(context.run_config["method"])).family]


def _train(msg: Message, context: Context) -> Message:
    model, data, config, shared, _ = build_local_model(msg, context)
    round_config = msg.content[CONFIG_RECORD]
    market = data.split.market
    policy = region_policy(context, market)
    server_round = int(round_config[SERVER_ROUND_KEY])
    training_id = str(round_config.get(TRAINING_ID_KEY, ""))
    seed = market_seed(market, config.seed) + 1000 * server_round
    method = get_method(config.method)
    train_config = local_train_config(round_config, config)
    privacy = MarketPrivacy(context, market)
    examples = data.split.num_train
    metrics: dict[str, Any] = {}
    if parse_bool(EVALUATE_RECEIVED_KEY, round_config.get(EVALUATE_RECEIVED_KEY, False)):
        # The previous round's evaluation, folded into this message: the
        # received encoder with the head as the previous round left it.
        received = _evaluation_metrics(model, data, privacy.spent(config))
        metrics.update({RECEIVED_PREFIX + key: value for key, value in received.items()})
        remember_if_best(context, model, market, server_round - 1, received, training_id)
    before = get_arrays(model, shared)
    started = time.perf_counter()
    if config.dp_epsilon > 0:
        # The average's weight must not be a private count: the number of
        # interactions moves with one user's history, and every market
        # receives the average. The number of users is public already (it
        # sets the sample rate, the steps and the default delta).
        with privacy.hold():
            loss, entry = float("nan"), privacy.load()
            try:
                entry = round_ledger(privacy, config, model, data, train_config, training_id, policy)
                examples = released_users(entry)
                data = replace(data, released_users=examples)  # DP-SGD's rate and steps: the released count
                loss = private_round(
                    model,
                    data,
                    method,
                    train_config,
                    entry.ledger,
                    seed,
                    training_noise_seed(policy, config, market, server_round),
                )
            except PrivacyBudgetExceeded as error:
                # Out of budget: the market neither trains nor keeps or sends what
                # it trained; it still evaluates, and its weight in the average is 0.
                out_of_budget(entry, error, market)
                loss, examples = float("nan"), 0
            if entry is not None:
                privacy.save(entry)
            metrics.update(privacy.spent(config))
        metrics.update(insecure_marker(policy, market))
    else:
        loss = local_round(model, data, method, train_config, seed)
    train_seconds = time.perf_counter() - started
    sent = get_arrays(model, shared) if examples > 0 else before
    if examples > 0:
        local = [name for name in model.state_dict() if name not in shared]
        context.state[LOCAL_STATE_KEY] = ArrayRecord(get_arrays(model, local))
        if config.starting_weight() < 1:
            context.state[OWN_ARRAYS_KEY] = ArrayRecord(sent)
        persist(context, market, training_id, server_round, private=config.dp_epsilon > 0)
    valid = evaluate(model, data, full=False)  # the server reads only the sampled metrics of a training reply
    metrics.update(
        {
            NUM_EXAMPLES_KEY: examples,
            TRAINED_KEY: int(examples > 0),
            TRAIN_LOSS_KEY: loss,
            TRAIN_SECONDS_KEY: train_seconds,
            VAL_NDCG_KEY: valid.ndcg,
            VAL_HR_KEY: valid.hit_rate,
        }
    )
    return reply(msg, market, metrics, ArrayRecord(sent), disclosure=Disclosure.of(config, policy))


def _evaluate(msg: Message, context: Context) -> Message:
    model, data, config, _, catalog = build_local_model(msg, context)
    market = data.split.market
    privacy = MarketPrivacy(context, market)
    metrics = _evaluation_metrics(model, data, privacy.spent(config))
    round_config = msg.content[CONFIG_RECORD]
    server_round = int(round_config.get(SERVER_ROUND_KEY, 0))
    remember_if_best(context, model, market, server_round, metrics, str(round_config.get(TRAINING_ID_KEY, "")))
    fork = None
    # The fork is fedper-ft's alone, and never longer than the run's fine-tune-epochs, for which
    # the budget was calibrated: the server's message cannot make a market spend more.
    epochs = min(int(round_config.get(FINE_TUNE_EPOCHS_KEY, 0)), config.fine_tune_epochs)
    if get_method(config.method).fine_tune and epochs > 0:
        tuned_metrics, tuned = _fine_tune(msg, context, model, data, config, privacy, epochs)
        metrics.update(tuned_metrics)
        fork = {
            "state": tuned.state or model.state_dict(),
            "round": server_round,
            "metrics": {
                key.removeprefix(FINE_TUNE_PREFIX): value
                for key, value in tuned_metrics.items()
                if key.removeprefix(FINE_TUNE_PREFIX) in EVALUATION_METRICS
            },
            "spent": privacy.spent(config),
        }
    if parse_bool(FINAL_ROUND_KEY, round_config.get(FINAL_ROUND_KEY, False)):
        training_id = str(round_config.get(TRAINING_ID_KEY, ""))
        write_best_model(context, model, data, catalog, get_method(config.method), training_id, fork)
    weight = released_weight(privacy) if config.dp_epsilon > 0 else None
    return reply(msg, market, metrics, disclosure=Disclosure.of(config, region_policy(context, market), weight))


def _fine_tune(
    msg: Message,
    context: Context,
    model: SplitRecommender,
    data: MarketTensors,
    config: RunConfig,
    privacy: MarketPrivacy,
    epochs: int,
) -> tuple[dict[str, Any], FineTuned]:
    """fedper-ft's private fork, trained for ``epochs`` after the last round; its metrics and itself at the best
    validation epoch. Under DP an epoch the budget cannot pay for is not trained."""
    round_config = msg.content[CONFIG_RECORD]
    market = data.split.market
    seed = market_seed(market, config.seed) + 999_999
    train_config = local_train_config(round_config, config)
    if config.dp_epsilon <= 0:
        tuned = fine_tune(model, data, train_config, epochs, seed)
        return _fine_tune_metrics(tuned), tuned
    training_id = str(round_config.get(TRAINING_ID_KEY, ""))
    policy = region_policy(context, market)
    noise_seed = training_noise_seed(policy, config, market, 999_999)
    with privacy.hold():
        entry = round_ledger(privacy, config, model, data, train_config, training_id, policy)
        data = replace(data, released_users=released_users(entry))

        def train_epoch(fork: SplitRecommender, one_epoch: TrainConfig, epoch_seed: int) -> float:
            try:
                loss = train_epochs_private(
                    fork,
                    data,
                    one_epoch,
                    entry.ledger,
                    epoch_seed,
                    noise_seed=None if noise_seed is None else noise_seed + epoch_seed,
                )
            except PrivacyBudgetExceeded as error:
                out_of_budget(entry, error, market)
                return float("nan")
            privacy.save(entry)
            return loss

        tuned = fine_tune(model, data, train_config, epochs, seed, train_epoch)
        privacy.save(entry)
    persist(context, market, training_id, int(round_config.get(SERVER_ROUND_KEY, 0)), private=True)
    return _fine_tune_metrics(tuned) | entry.ledger.spent() | insecure_marker(policy, market), tuned


def _fine_tune_metrics(tuned: FineTuned) -> dict[str, Any]:
    """The fork's reply metrics: its epochs and its evaluation at the best one, each under ``ft-``."""
    metrics = {"epochs": tuned.epochs} | evaluation_metrics(tuned.valid, tuned.test)
    del metrics[NUM_EXAMPLES_KEY]  # the reply carries the evaluation's count already
    return {FINE_TUNE_PREFIX + key: value for key, value in metrics.items()}


def _evaluation_metrics(model: SplitRecommender, data: MarketTensors, privacy: dict[str, float]) -> dict[str, Any]:
    """Validation and test metrics of the model as it stands, with the privacy spent under DP."""
    return privacy | evaluation_metrics(evaluate(model, data), evaluate(model, data, on_test=True))


CLIENT_FAMILIES: dict[str, ClientFamily] = {
    "sgd": ClientFamily(train=_train, evaluate=_evaluate),
    "als": ClientFamily(train=fedals.train, evaluate=fedals.evaluate),
}
