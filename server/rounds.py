"""The federated round loop: train, aggregate, evaluate, record, checkpoint.

Flower's ``Strategy.start`` runs rounds 1..N from scratch, waits for replies
in 3-second polls and sends a separate evaluation message every round. This
loop uses the same strategy methods but can start after a checkpointed
round, polls as often as asked, and folds the evaluation of the previous
round's model into the next training message: a market evaluates the
received encoder with its stored head before training on it, which is
exactly what a separate evaluation of that round would have computed.

Every reply passes :class:`server.replies.ReplyScreen` before it is recorded
or averaged, and the strategy waits for nodes through a
:class:`server.node_wait.DeadlineGrid`, so neither a bad reply nor a missing
node can stall or crash the ServerApp. Each round's entry in the history
records, per market, the bytes of the arrays its training message carried
(``download-bytes``) and of its reply (``upload-bytes``).
"""

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.protocol import (
    ARRAYS_RECORD,
    CONTINUES_KEY,
    EVALUATE_RECEIVED_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    RECEIVED_PREFIX,
    TRAINING_ID_KEY,
)
from common.runtime.names import printable
from server.history import Checkpoint, RunHistory, market_of
from server.node_wait import DeadlineGrid
from server.replies import ArraysProblem, MarketBinding, ReplyScreen, weight_of
from server.strategy import aggregation_weight_key, market_dp_epsilon, required_nodes


class AllMarketsFailedError(RuntimeError):
    """Every market that was asked replied with an error or a refused reply: the run cannot go on."""


@dataclass(frozen=True)
class RoundSettings:
    """How the loop talks to the markets."""

    num_rounds: int  # the last round of the training
    timeout: float  # seconds to wait for a round's replies before going on without the missing markets
    poll_interval: float  # seconds between checks for replies
    fold_evaluation: bool  # evaluate each round's model inside the next round's training message
    training_id: str  # sent with every message; markets key their privacy ledgers on it
    # sent with every message: the training whose published part this one started from (init-from), or ""
    continues: str = ""
    budgeted_markets: frozenset[str] = frozenset()  # markets dp-market-epsilons names; checked against the replies
    node_timeout: float = 600.0  # seconds a round waits for the strategy's minimum of nodes to connect
    fingerprint: Mapping[str, Any] = field(default_factory=dict)  # stored in each checkpoint (server.resume)
    # False: no evaluation but the last round's (a refit for serving, which holds nothing out to evaluate on)
    evaluate_each_round: bool = True
    label: str = "ROUND"  # the log's name of a round: "[ROUND 3/15]"; a refit's are "[REFIT ROUND 3/6]"


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, poll_interval: float, binding: MarketBinding | None = None
) -> list[Message]:
    """Push ``messages`` and collect the replies until all arrived or ``timeout`` passed.

    The markets that did not reply in time are named in a WARNING, by market
    where ``binding`` knows their node's, else by node id.
    """
    return _send_and_receive(grid, messages, timeout, poll_interval, binding)[0]


def _send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, poll_interval: float, binding: MarketBinding | None
) -> tuple[list[Message], dict[str, int]]:
    """:func:`send_and_receive`, and the node each pushed message (by id) went to."""
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    destination = {message_id: message.metadata.dst_node_id for message_id, message in zip(ids, messages, strict=True)}
    pending = set(ids)
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
        names = sorted(_name(binding, destination[message_id]) for message_id in pending if message_id in destination)
        log(
            WARNING,
            "%d of %d markets did not reply within %.0f s; going on without them: %s.",
            len(pending),
            asked,
            timeout,
            ", ".join(names),
        )
    return replies, destination


def _name(binding: MarketBinding | None, node: int) -> str:
    """``node`` by its market where ``binding`` knows it, else by its id."""
    return binding.name_of(node) if binding is not None else f"node {node}"


def check_replies(
    server_round: int,
    asked: int,
    replies: list[Message],
    refused: Iterable[str] = (),
    binding: MarketBinding | None = None,
    destination: Mapping[str, int] | None = None,
) -> list[Message]:
    """The replies without errors; each error is logged, and all of them failing is fatal.

    ``refused`` names the replies :class:`server.replies.ReplyScreen` dropped:
    they count as failures, so a round in which every market failed or was
    refused stops the run with every reason. A failed node is logged by the
    market ``binding`` ties it to (it replied in an earlier round), else by
    its id; a deployed region's error reason names its market itself. The
    SuperLink answers for a node it lost (missed heartbeats) as node 1, its
    own id: ``destination`` (message id -> node it was sent to) names the node
    such an error is about.
    """
    failed = [reply for reply in replies if reply.has_error()]
    refused = list(refused)
    for reply in failed:
        node = (destination or {}).get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        log(WARNING, "round %d: %s failed: %s", server_round, _name(binding, node), printable(reply.error.reason))
    if asked and len(failed) + len(refused) == asked:
        reasons = "; ".join(sorted({printable(reply.error.reason) for reply in failed} | set(refused)))
        raise AllMarketsFailedError(
            f"Round {server_round}: every market replied with an error or a refused reply: {reasons}"
        )
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
    binding: MarketBinding | None = None,
    arrays_problem: ArraysProblem | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round``..``num_rounds``; return the final shared arrays.

    Round ``first_round - 1``'s model (the starting point when 1) is evaluated
    too: folded into the first training message, or separately. ``binding``
    ties nodes to the markets they speak for (from the checkpoint when
    resuming); it is saved with every checkpoint. ``arrays_problem`` checks
    train replies' arrays when the markets do not return the arrays they were
    sent (:class:`server.replies.ReplyScreen`).
    """
    weight_key = aggregation_weight_key(strategy)
    binding = binding if binding is not None else MarketBinding()
    screen = ReplyScreen(binding, (NUM_EXAMPLES_KEY, weight_key), arrays_problem)
    base_config = {TRAINING_ID_KEY: settings.training_id, CONTINUES_KEY: settings.continues}
    separate = not settings.fold_evaluation and settings.evaluate_each_round  # an evaluate message every round
    folded = settings.fold_evaluation and settings.evaluate_each_round
    if separate:
        _evaluate(grid, strategy, history, settings, screen, first_round - 1, arrays, ConfigRecord(base_config))
    for server_round in range(first_round, settings.num_rounds + 1):
        started = time.perf_counter()
        log(INFO, "[%s %d/%d]", settings.label, server_round, settings.num_rounds)
        config = ConfigRecord({**train_config, **base_config, EVALUATE_RECEIVED_KEY: folded})
        messages = list(strategy.configure_train(server_round, arrays, config, _waiting(grid, strategy, settings)))
        replies = _receive(grid, settings, screen, server_round, messages, sent=arrays, history=history)
        _record_traffic(history, server_round, messages, replies)
        if folded:
            history.record(server_round - 1, replies, strip=RECEIVED_PREFIX)
            history.log_round(server_round - 1)
        history.record(server_round, replies, prefix="local/")
        if server_round == first_round:
            warn_unanswered_budgets(settings.budgeted_markets, replies)
        # A market out of privacy budget replies with weight 0: it did not
        # train, and when no market trained the encoder stays as it was.
        trained = [reply for reply in replies if weight_of(reply) > 0 and weight_of(reply, weight_key) > 0]
        aggregated = None
        if trained:
            aggregated = strategy.aggregate_train(server_round, _for_aggregation(trained, weight_key))[0]
        if aggregated is None:
            log(INFO, "round %d: nothing was aggregated; the shared arrays are unchanged", server_round)
        else:
            arrays = aggregated
        last = server_round == settings.num_rounds
        if last or separate:
            final = final_evaluate_config if last else ConfigRecord()
            evaluate_config = ConfigRecord({**base_config, **final})
            _evaluate(grid, strategy, history, settings, screen, server_round, arrays, evaluate_config)
        history.annotate(server_round, seconds=time.perf_counter() - started)
        if (epsilon := market_dp_epsilon(strategy)) is not None:
            history.annotate(server_round, **{"market-dp-epsilon": epsilon})
        history.write()
        history.save_checkpoint(
            Checkpoint(
                server_round=server_round,
                training_id=settings.training_id,
                continues=settings.continues,
                arrays=arrays.to_torch_state_dict(),
                strategy_state=strategy_state(strategy),
                fingerprint=dict(settings.fingerprint),
                markets=screen.binding.state(),
            )
        )
    return arrays


def _waiting(grid: Grid, strategy: Strategy, settings: RoundSettings) -> Grid:
    """``grid`` with a deadline on the strategy's wait for its minimum of nodes."""
    return DeadlineGrid(grid, required_nodes(strategy), settings.node_timeout)


def _receive(
    grid: Grid,
    settings: RoundSettings,
    screen: ReplyScreen,
    server_round: int,
    messages: list[Message],
    sent: ArrayRecord | None,
    history: RunHistory,
) -> list[Message]:
    """Send ``messages``; the replies that neither failed nor were refused.

    Every market asked whose reply failed, was refused or did not come is
    noted in the round's ``failed`` list in the history (by market, or by node
    id where it never named one), for the summary at the end of the training.
    """
    replies, destination = _send_and_receive(grid, messages, settings.timeout, settings.poll_interval, screen.binding)
    without_errors = [reply for reply in replies if not reply.has_error()]
    accepted, refused = screen.screen(server_round, without_errors, sent)
    check_replies(server_round, len(messages), replies, refused, screen.binding, destination)
    answered = {reply.metadata.src_node_id for reply in accepted}
    missing = {message.metadata.dst_node_id for message in messages} - answered
    history.note_failed(server_round, [screen.binding.state().get(node, f"node {node}") for node in missing])
    return accepted


def _array_bytes(content: RecordDict) -> int:
    """Bytes of the serialised arrays a message carries (what its ArrayRecords put on the wire)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def _record_traffic(history: RunHistory, server_round: int, messages: list[Message], replies: list[Message]) -> None:
    """Note and log each replying market's bytes down (its training message) and up (its reply)."""
    sent = {message.metadata.dst_node_id: _array_bytes(message.content) for message in messages}
    traffic = {}
    for reply in replies:
        market = market_of(reply)
        if market is not None:
            traffic[market] = {
                "download-bytes": sent.get(reply.metadata.src_node_id, 0),
                "upload-bytes": _array_bytes(reply.content),
            }
            history.note(server_round, market, **traffic[market])
    log(
        INFO,
        "round %d: bytes down/up per market: %s",
        server_round,
        ", ".join(f"{market} {t['download-bytes']}/{t['upload-bytes']}" for market, t in sorted(traffic.items())),
    )


def _for_aggregation(replies: list[Message], weight_key: str) -> list[Message]:
    """The replies as aggregation needs them: their arrays and the weight only.

    FedAvg refuses (raises on) replies whose metric names differ; the
    metrics were recorded already, and only the arrays and the weight enter
    the average, so every other metric is dropped from the content here.
    """
    for reply in replies:
        arrays = next(iter(reply.content.array_records.values()))
        weight = MetricRecord({weight_key: weight_of(reply, weight_key)})
        reply.content = RecordDict({ARRAYS_RECORD: arrays, METRICS_RECORD: weight})
    return replies


def _evaluate(
    grid: Grid,
    strategy: Strategy,
    history: RunHistory,
    settings: RoundSettings,
    screen: ReplyScreen,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
) -> None:
    messages = list(strategy.configure_evaluate(server_round, arrays, config, _waiting(grid, strategy, settings)))
    replies = _receive(grid, settings, screen, server_round, messages, sent=None, history=history)
    history.record(server_round, replies)
    history.log_round(server_round)
    history.write()


def strategy_state(strategy: Strategy) -> dict:
    """What a resumed server needs of the strategy: the market-level DP accountant, if any, and
    the strategy's own state where it keeps one (fedals: the nodes' rows and the user Gram)."""
    accountant = getattr(strategy, "accountant", None)
    state = {"accountant": accountant.state_dict()} if accountant is not None else {}
    if callable(getattr(strategy, "state_dict", None)):
        state["strategy"] = strategy.state_dict()
    return state


def restore_strategy_state(strategy: Strategy, state: dict) -> None:
    """Put a checkpoint's strategy state back.

    A checkpoint without the strategy's own state (written before it was kept) resumes
    as a restarted server did: fedals then sends each node the whole table once.

    Raises
    ------
    ValueError
        If the strategy keeps a market-level DP accountant and ``state`` has
        none: resuming would restart epsilon from 0.
    """
    if callable(getattr(strategy, "load_state_dict", None)) and isinstance(state.get("strategy"), dict):
        strategy.load_state_dict(state["strategy"])
    accountant = getattr(strategy, "accountant", None)
    if accountant is None:
        return
    if "accountant" not in state:
        raise ValueError(
            "The checkpoint holds no market-level DP accountant, but this run accounts market-level DP: "
            "resuming would restart epsilon from 0."
        )
    accountant.load_state_dict(state["accountant"])
