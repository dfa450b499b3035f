"""The federated round loop: train, aggregate, evaluate, record, checkpoint.

Flower's ``Strategy.start`` runs rounds 1..N from scratch, waits for replies
in 3-second polls and sends a separate evaluation message every round. This
loop uses the same strategy methods but can start after a checkpointed
round, polls as often as asked, and folds the evaluation of the previous
round's model into the next training message: a market evaluates the
received encoder with its stored head before training on it, which is
exactly what a separate evaluation of that round would have computed.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.history import RunHistory, market_of
from server.strategy import market_dp_epsilon

EVALUATE_RECEIVED_KEY = "evaluate-received"  # train config: evaluate the received model before training
RECEIVED_PREFIX = "received-"  # train reply metrics measured on the received model
WEIGHT_KEY = "num-examples"  # a market out of privacy budget replies with 0


class AllMarketsFailedError(RuntimeError):
    """Every market that was asked replied with an error: the run cannot go on."""


@dataclass(frozen=True)
class RoundSettings:
    """How the loop talks to the markets."""

    num_rounds: int  # the last round of the training
    timeout: float  # seconds to wait for a round's replies before going on without the missing markets
    poll_interval: float  # seconds between checks for replies
    fold_evaluation: bool  # evaluate each round's model inside the next round's training message
    training_id: str  # sent with every message; markets key their privacy ledgers on it
    budgeted_markets: frozenset[str] = frozenset()  # markets dp-market-epsilons names; checked against the replies


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float, poll_interval: float) -> list[Message]:
    """Push ``messages`` and collect the replies until all arrived or ``timeout`` passed."""
    pending = set(grid.push_messages(messages))
    asked = len(pending)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        if pending:
            time.sleep(poll_interval)
    if pending:
        log(WARNING, "%d of %d markets did not reply within %.0f s; going on without them.", len(pending), asked, timeout)
    return replies


def check_replies(server_round: int, asked: int, replies: list[Message]) -> list[Message]:
    """The replies without errors; each error is logged, and all of them failing is fatal."""
    failed = [reply for reply in replies if reply.has_error()]
    for reply in failed:
        log(WARNING, "round %d: node %d failed: %s", server_round, reply.metadata.src_node_id, reply.error.reason)
    if asked and len(failed) == asked:
        reasons = "; ".join(sorted({reply.error.reason for reply in failed}))
        raise AllMarketsFailedError(f"Round {server_round}: every market replied with an error: {reasons}")
    return [reply for reply in replies if not reply.has_error()]


def warn_unanswered_budgets(budgeted_markets: frozenset[str], replies: list[Message]) -> None:
    """Log the markets ``dp-market-epsilons`` names that none of ``replies`` came from.

    The server learns the market names only from the replies, so this is a
    warning: such a market may just be offline, or its name misspelt, in which
    case the market it was meant for trains with ``dp-epsilon``.
    """
    replied = {market for market in map(market_of, replies) if market is not None}
    unanswered = sorted(budgeted_markets - replied)
    if unanswered:
        log(
            WARNING,
            "dp-market-epsilons names %s, but no such market replied (replied: %s); "
            "a misspelt name leaves its market on dp-epsilon.",
            unanswered,
            sorted(replied),
        )


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    history: RunHistory,
    settings: RoundSettings,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    final_evaluate_config: ConfigRecord,
    first_round: int = 1,
) -> ArrayRecord:
    """Run rounds ``first_round``..``num_rounds``; return the final shared arrays.

    Round ``first_round - 1``'s model (the starting point when 1) is evaluated
    too: folded into the first training message, or separately.
    """
    base_config = {"training-id": settings.training_id}
    if not settings.fold_evaluation:
        _evaluate(grid, strategy, history, settings, first_round - 1, arrays, ConfigRecord(base_config))
    for server_round in range(first_round, settings.num_rounds + 1):
        started = time.perf_counter()
        log(INFO, "[ROUND %d/%d]", server_round, settings.num_rounds)
        config = ConfigRecord({**train_config, **base_config, EVALUATE_RECEIVED_KEY: settings.fold_evaluation})
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        replies = check_replies(
            server_round, len(messages), send_and_receive(grid, messages, settings.timeout, settings.poll_interval)
        )
        if settings.fold_evaluation:
            history.record(server_round - 1, replies, strip=RECEIVED_PREFIX)
            history.log_round(server_round - 1)
        history.record(server_round, replies, prefix="local/")
        if server_round == first_round:
            warn_unanswered_budgets(settings.budgeted_markets, replies)
        # A market out of privacy budget replies with weight 0: it did not
        # train, and when no market trained the encoder stays as it was.
        trained = [reply for reply in replies if next(iter(reply.content.metric_records.values()))[WEIGHT_KEY] > 0]
        aggregated = strategy.aggregate_train(server_round, trained)[0] if trained else None
        if aggregated is None:
            log(INFO, "round %d: nothing was aggregated; the shared arrays are unchanged", server_round)
        else:
            arrays = aggregated
        last = server_round == settings.num_rounds
        if last or not settings.fold_evaluation:
            final = final_evaluate_config if last else ConfigRecord()
            _evaluate(grid, strategy, history, settings, server_round, arrays, ConfigRecord({**base_config, **final}))
        history.annotate(server_round, seconds=time.perf_counter() - started)
        if (epsilon := market_dp_epsilon(strategy)) is not None:
            history.annotate(server_round, **{"market-dp-epsilon": epsilon})
        history.write()
        history.save_checkpoint(server_round, settings.training_id, arrays, strategy_state(strategy))
    return arrays


def _evaluate(
    grid: Grid,
    strategy: Strategy,
    history: RunHistory,
    settings: RoundSettings,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
) -> None:
    messages = list(strategy.configure_evaluate(server_round, arrays, config, grid))
    replies = check_replies(
        server_round, len(messages), send_and_receive(grid, messages, settings.timeout, settings.poll_interval)
    )
    history.record(server_round, replies)
    history.log_round(server_round)
    history.write()


def strategy_state(strategy: Strategy) -> dict:
    """What a resumed server needs of the strategy: the market-level DP accountant, if any."""
    accountant = getattr(strategy, "accountant", None)
    return {"accountant": accountant.state_dict()} if accountant is not None else {}


def restore_strategy_state(strategy: Strategy, state: dict) -> None:
    """Put a checkpoint's strategy state back."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and "accountant" in state:
        accountant.load_state_dict(state["accountant"])
