"""ClientApp: a market trains on its private data and shares only the encoder.

The handlers are thin: :mod:`clients.local_model` builds the market's model
from the message and its state, :mod:`clients.privacy_state` keeps its DP
ledger, :mod:`clients.messages` decides what a reply or an error may carry.
Its head (user embeddings, history projection, popularity bias) never enters
a reply. fedals (federated implicit ALS) is handled by :mod:`clients.fedals`:
its markets send item-side statistics summed over their users instead.
"""

import time
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from clients import fedals
from clients.local_model import LOCAL_STATE_KEY, OWN_ARRAYS_KEY, build_local_model, persist
from clients.messages import RECEIVED_PREFIX, Disclosure, errors_stay_in_region, evaluation_metrics, reply
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
from clients.served import FINAL_KEY, remember_if_best, write_best_model
from common.config import parse_bool
from common.data.markets import market_seed
from common.market_config import MarketConfig
from common.methods import FineTuned, fine_tune, get_method, local_round
from common.neural.model import SplitRecommender, get_arrays
from common.neural.train import MarketTensors, TrainConfig, evaluate
from common.privacy.dp_sgd import private_round, train_epochs_private
from common.privacy.ledger import PrivacyBudgetExceeded

app = ClientApp()


def train_config_from(record: ConfigRecord) -> TrainConfig:
    """The round's local training settings as the server sent them."""
    return TrainConfig(
        epochs=int(record["local-epochs"]),
        head_epochs=int(record["head-epochs"]),
        batch_size=int(record["batch-size"]),
        learning_rate=float(record["learning-rate"]),
        negatives=int(record["negatives"]),
        score_penalty=float(record["score-penalty"]),
    )


def local_train_config(record: ConfigRecord, config: MarketConfig) -> TrainConfig:
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
        return fedals.train(msg, context) if _solved_by_als(context) else _train(msg, context)


@app.evaluate()
def evaluate_market(msg: Message, context: Context) -> Message:
    """Validation and test metrics with the received encoder and the local head.

    When the server asks for it (``fine-tune-epochs`` > 0, after the last
    round of fedper-ft), the market also fine-tunes a private fork and reports
    the fork's metrics at its best epoch on validation.
    """
    with errors_stay_in_region("evaluation", _deployed_market(context)):
        return fedals.evaluate(msg, context) if _solved_by_als(context) else _evaluate(msg, context)


def _deployed_market(context: Context) -> str | None:
    """The market a deployed region's node config names; None in simulation."""
    market = context.node_config.get("market")
    return str(market) if market is not None else None


def _solved_by_als(context: Context) -> bool:
    return get_method(str(context.run_config["method"])).solver == "als"


def _train(msg: Message, context: Context) -> Message:
    model, data, config, shared, _ = build_local_model(msg, context)
    round_config = msg.content["config"]
    market = data.split.market
    policy = region_policy(context, market)
    server_round = int(round_config["server-round"])
    training_id = str(round_config.get("training-id", ""))
    seed = market_seed(market, config.seed) + 1000 * server_round
    method = get_method(config.method)
    train_config = local_train_config(round_config, config)
    privacy = MarketPrivacy(context, market)
    examples = data.split.num_train
    metrics: dict[str, Any] = {}
    if parse_bool("evaluate-received", round_config.get("evaluate-received", False)):
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
            "num-examples": examples,
            "trained": int(examples > 0),
            "train-loss": loss,
            "train-seconds": train_seconds,
            "val-ndcg": valid.ndcg,
            "val-hr": valid.hit_rate,
        }
    )
    return reply(msg, market, metrics, ArrayRecord(sent), disclosure=Disclosure.of(config, policy))


def _evaluate(msg: Message, context: Context) -> Message:
    model, data, config, _, catalog = build_local_model(msg, context)
    market = data.split.market
    privacy = MarketPrivacy(context, market)
    metrics = _evaluation_metrics(model, data, privacy.spent(config))
    round_config = msg.content["config"]
    server_round = int(round_config.get("server-round", 0))
    remember_if_best(context, model, market, server_round, metrics, str(round_config.get("training-id", "")))
    fork = None
    # The fork is fedper-ft's alone, and never longer than the run's fine-tune-epochs, for which
    # the budget was calibrated: the server's message cannot make a market spend more.
    epochs = min(int(round_config.get("fine-tune-epochs", 0)), config.fine_tune_epochs)
    if get_method(config.method).fine_tune and epochs > 0:
        tuned_metrics, tuned = _fine_tune(msg, context, model, data, config, privacy, epochs)
        metrics.update(tuned_metrics)
        fork = {
            "state": tuned.state or model.state_dict(),
            "round": server_round,
            "metrics": {
                key.removeprefix("ft-"): value
                for key, value in tuned_metrics.items()
                if key.startswith(("ft-val", "ft-test"))
            },
            "spent": privacy.spent(config),
        }
    if parse_bool(FINAL_KEY, round_config.get(FINAL_KEY, False)):
        write_best_model(context, model, data, catalog, get_method(config.method), fork)
    weight = released_weight(privacy) if config.dp_epsilon > 0 else None
    return reply(msg, market, metrics, disclosure=Disclosure.of(config, region_policy(context, market), weight))


def _fine_tune(
    msg: Message,
    context: Context,
    model: SplitRecommender,
    data: MarketTensors,
    config: MarketConfig,
    privacy: MarketPrivacy,
    epochs: int,
) -> tuple[dict[str, Any], FineTuned]:
    """fedper-ft's private fork, trained for ``epochs`` after the last round; its metrics and itself at the best
    validation epoch. Under DP an epoch the budget cannot pay for is not trained."""
    round_config = msg.content["config"]
    market = data.split.market
    seed = market_seed(market, config.seed) + 999_999
    train_config = local_train_config(round_config, config)
    if config.dp_epsilon <= 0:
        tuned = fine_tune(model, data, train_config, epochs, seed)
        return _fine_tune_metrics(tuned), tuned
    training_id = str(round_config.get("training-id", ""))
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
    persist(context, market, training_id, int(round_config.get("server-round", 0)), private=True)
    return _fine_tune_metrics(tuned) | entry.ledger.spent() | insecure_marker(policy, market), tuned


def _fine_tune_metrics(tuned: FineTuned) -> dict[str, Any]:
    return {
        "ft-epochs": tuned.epochs,
        "ft-val-ndcg": tuned.valid.ndcg,
        "ft-val-hr": tuned.valid.hit_rate,
        "ft-val-full-ndcg": tuned.valid.full_ndcg,
        "ft-val-full-recall": tuned.valid.full_recall,
        "ft-test-ndcg": tuned.test.ndcg,
        "ft-test-hr": tuned.test.hit_rate,
        "ft-test-full-ndcg": tuned.test.full_ndcg,
        "ft-test-full-recall": tuned.test.full_recall,
    }


def _evaluation_metrics(model: SplitRecommender, data: MarketTensors, privacy: dict[str, float]) -> dict[str, Any]:
    """Validation and test metrics of the model as it stands, with the privacy spent under DP."""
    return privacy | evaluation_metrics(evaluate(model, data), evaluate(model, data, on_test=True))
