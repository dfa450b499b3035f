"""What the server accepts from a market's reply before it reaches the average or the history.

A reply comes from a node the server does not control, so nothing in it is
trusted: the arrays must be the ones the server sent (same names, dtypes and
shapes) and finite, or pass the method's own check when its markets reply with
something else (fedals' item statistics: :meth:`server.fedals.FedALS.reply_problem`);
the aggregation weights must be bounded whole numbers, and the market name it
declares must be the one its node declared first. A reply that breaks any of
these is dropped from the round with a WARNING naming its node and market; it
never crashes the ServerApp. Metric names are bounded in number and form, and
the server escapes and bounds a region's error text before logging it.

What the screen does not do: a weight is the market's own claim, so a market
may claim up to :data:`MAX_WEIGHT` and dominate a weighted average, and a
fedals reply inside its shape checks still steers the items it names; a
screened reply is well-formed, not honest.
"""

import math
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from common.protocol import MARKET_KEY, MARKET_NAME_KEY, NUM_EXAMPLES_KEY, TRAINED_KEY
from common.runtime.names import check_metric_name, check_name, printable

MAX_WEIGHT = 1e9  # no market holds a billion users or interactions: a larger weight is an attempt to dominate
MAX_NAME = 64  # the longest market name common.names.check_name accepts; longer ones are cut in the log
MAX_METRICS = 64  # metrics in one reply: a market sends about 20; more is an attempt to flood the history

# (a train reply's arrays, the arrays the server sent) -> what is wrong with the reply's, or None
ArraysProblem = Callable[[ArrayRecord, ArrayRecord], str | None]


class MarketBinding:
    """Which node speaks for which market: fixed by a node's first accepted reply in the training.

    Parameters
    ----------
    bound : Mapping[int, str] or None
        Node id to market name, as :meth:`state` returned it (from a checkpoint).
    """

    def __init__(self, bound: Mapping[int, str] | None = None) -> None:
        self._market_of: dict[int, str] = {}
        self._node_of: dict[str, int] = {}
        for node, market in (bound or {}).items():
            if market in self._node_of:
                raise ValueError(f"Market {market!r} is bound to two nodes, {self._node_of[market]} and {node}.")
            self._market_of[int(node)], self._node_of[market] = market, int(node)

    def conflict(self, node: int, market: str) -> str | None:
        """Why ``node`` may not speak for ``market``, or None if it may (the first time, or as before)."""
        reasons = []
        if (bound := self._market_of.get(node)) is not None and bound != market:
            reasons.append(f"node {node} named itself market {bound!r} before, now {market!r}")
        if (owner := self._node_of.get(market)) is not None and owner != node:
            reasons.append(f"market {market!r} is bound to node {owner}, not node {node}")
        return "; ".join(reasons) or None

    def bind(self, node: int, market: str) -> None:
        """Tie ``node`` and ``market`` together (a no-op when they already are)."""
        if (reason := self.conflict(node, market)) is not None:
            raise ValueError(f"Cannot bind node {node} to market {market!r}: {reason}.")
        self._market_of[node], self._node_of[market] = market, node

    def name_of(self, node: int) -> str:
        """``node`` as logs should name it: by its market once it has named one, else by its id."""
        market = self._market_of.get(node)
        return f"node {node}" if market is None else f"market {market} (node {node})"

    def state(self) -> dict[int, str]:
        """Node id to market name, for the checkpoint."""
        return dict(self._market_of)


class ReplyScreen:
    """Drops the replies a round must not use, with a WARNING each.

    Parameters
    ----------
    binding : MarketBinding
        The node-to-market binding of the training; accepted replies extend it.
    weight_keys : Iterable[str]
        Metrics the average is weighted by (``num-examples``, and the strategy's own key).
    arrays_problem : ArraysProblem, optional
        The check of a train reply's arrays; by default :func:`same_arrays_problem`, the
        arrays the server sent, changed in value only.
    """

    def __init__(
        self,
        binding: MarketBinding,
        weight_keys: Iterable[str] = (NUM_EXAMPLES_KEY,),
        arrays_problem: ArraysProblem | None = None,
    ) -> None:
        self.binding = binding
        self.weight_keys = tuple(dict.fromkeys((NUM_EXAMPLES_KEY, *weight_keys)))
        self.arrays_problem = arrays_problem or same_arrays_problem

    def screen(
        self, server_round: int, replies: list[Message], sent: ArrayRecord | None
    ) -> tuple[list[Message], list[str]]:
        """The acceptable ``replies`` and the reasons the others were refused.

        Parameters
        ----------
        server_round : int
            For the log.
        replies : list[Message]
            Replies without errors.
        sent : ArrayRecord or None
            The arrays the server sent (a train round): each reply's arrays must
            pass the screen's ``arrays_problem`` check against them. None for
            evaluation replies, which carry no arrays and no aggregation weight.
        """
        accepted: list[Message] = []
        refused: list[str] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            market = _declared_market(reply.content)
            reason = _content_problem(reply.content, market, sent, self.weight_keys, self.arrays_problem)
            if reason is None:
                reason = self.binding.conflict(node, market)
            if reason is not None:
                reason = printable(reason)  # it may quote what the sender declared
                shown = repr(market) if market is None or len(market) <= MAX_NAME else repr(market[:MAX_NAME] + "...")
                refused.append(f"node {node} (market {shown}): {reason}")
                log(
                    WARNING, "round %d: refused the reply of node %d (market %s): %s", server_round, node, shown, reason
                )
                continue
            self.binding.bind(node, market)
            accepted.append(reply)
        return accepted, refused


def metrics_of(content: RecordDict) -> MetricRecord:
    """The one MetricRecord of an accepted reply."""
    return next(iter(content.metric_records.values()))


def weight_of(reply: Message, key: str = NUM_EXAMPLES_KEY) -> float:
    """The aggregation weight ``key`` of an accepted reply."""
    return float(metrics_of(reply.content)[key])


def _declared_market(content: RecordDict) -> str | None:
    record = content.config_records.get(MARKET_KEY)
    name = record.get(MARKET_NAME_KEY) if record is not None else None
    return name if isinstance(name, str) else None


def _content_problem(
    content: RecordDict,
    market: str | None,
    sent: ArrayRecord | None,
    weight_keys: tuple[str, ...],
    arrays_problem: ArraysProblem,
) -> str | None:
    """What is wrong with a reply's content, or None."""
    if market is None:
        return f"it names no market (a ConfigRecord {MARKET_KEY!r} with a string {MARKET_NAME_KEY!r})"
    if len(market) > MAX_NAME:
        return f"its market name is longer than {MAX_NAME} characters"
    try:
        check_name(market)
    except ValueError as error:
        return str(error)
    if len(content.metric_records) != 1:
        return f"it holds {len(content.metric_records)} MetricRecords, not one"
    metrics = metrics_of(content)
    if len(metrics) > MAX_METRICS:
        return f"it holds {len(metrics)} metrics, more than {MAX_METRICS}"
    for key, value in metrics.items():
        if (problem := check_metric_name(key)) is not None:
            return problem
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {key!r} is not a number"
    if TRAINED_KEY in metrics and metrics[TRAINED_KEY] not in (0, 1):
        # An equal-weight average (market-level DP) weighs every market by it: one market is one.
        return f"its {TRAINED_KEY!r} is {metrics[TRAINED_KEY]!r}, not 0 or 1"
    if sent is None:
        return None
    for key in weight_keys:
        if (problem := _weight_problem(metrics.get(key))) is not None:
            return f"its aggregation weight {key!r} {problem}"
    if len(content.array_records) != 1:
        return f"it holds {len(content.array_records)} ArrayRecords, not one"
    return arrays_problem(next(iter(content.array_records.values())), sent)


def _weight_problem(weight: object) -> str | None:
    if weight is None:
        return "is missing"
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return f"is not a number ({printable(repr(weight), 80)})"
    if not math.isfinite(weight) or weight != int(weight) or not 0 <= weight <= MAX_WEIGHT:
        return f"is {weight!r}, not a whole number from 0 to {MAX_WEIGHT:.0e}"
    return None


def same_arrays_problem(arrays: ArrayRecord, sent: ArrayRecord) -> str | None:
    """What is wrong with ``arrays``, or None: they must be those ``sent``, same names, dtypes and shapes, finite."""
    if set(arrays.keys()) != set(sent.keys()):
        missing, extra = sorted(set(sent.keys()) - set(arrays.keys())), sorted(set(arrays.keys()) - set(sent.keys()))
        return f"its arrays differ from those sent: missing {missing}, unexpected {extra}"
    for name, array in arrays.items():
        expected = sent[name]
        if array.dtype != expected.dtype or tuple(array.shape) != tuple(expected.shape):
            return (
                f"array {name!r} is {array.dtype} {tuple(array.shape)}, "
                f"but the server sent {expected.dtype} {tuple(expected.shape)}"
            )
        try:
            values = array.numpy()
        except Exception as error:  # noqa: BLE001 - any undecodable payload is the sender's fault
            return f"array {name!r} cannot be decoded ({type(error).__name__}: {error})"
        if str(values.dtype) != expected.dtype or values.shape != tuple(expected.shape):
            return f"array {name!r} decodes to {values.dtype} {values.shape}, not what it declares"
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return f"array {name!r} holds {int((~np.isfinite(values)).sum())} non-finite values"
    return None
