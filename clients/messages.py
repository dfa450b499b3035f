"""What a market's messages may carry out of its region: replies and error reasons.

Flower turns an exception raised in a ClientApp into an error reply whose
reason is the exception's text, and sends it to the server. A market's errors
can hold raw data (a bad line's user ID) or the region's paths, so the
handlers raise :class:`RegionError` instead: its text names the file, the line
and the kind of problem only, while the full error stays in the region's log.
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import ERROR
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from common.data.interactions import InteractionFileError
from common.neural.train import RankingMetrics
from common.privacy.ledger import PrivacyBudgetExceeded
from common.privacy.region import RegionPolicy
from common.protocol import (
    ARRAYS_RECORD,
    EXACT_METRICS_MARKER,
    INSECURE_NOISE_MARKER,
    MARKET_KEY,
    MARKET_NAME_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    TEST_FULL_NDCG_KEY,
    TEST_FULL_RECALL_KEY,
    TEST_HR_KEY,
    TEST_NDCG_KEY,
    TRAINED_KEY,
    VAL_FULL_NDCG_KEY,
    VAL_FULL_RECALL_KEY,
    VAL_HR_KEY,
    VAL_NDCG_KEY,
)
from common.run_config import RunConfig

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")  # a value quoted in a message, e.g. a bad rating
_PATH = re.compile(r"(?<![\w.~-])(?:~|\.{1,2})?/(?:[\w.-]+/)*([\w.-]+)")  # an absolute or ./ path: keep its last part


class RegionError(RuntimeError):
    """An error whose text may leave the region: no raw value of a data file, no directory of the region."""


# What a market under DP reports unless its region chose exact metrics: the weight (the user
# count the ledger released, or 0), whether it trained, what it spent (a function of its noise
# calibration and the released count), and the insecure-noise flag. Every other number
# (validation and test metrics, losses, seconds) is computed from its users on parameters the
# server chose: a query the server could steer, so it is not sent.
# epsilon and delta are the keys of common.privacy.ledger.PrivacyLedger.spent.
DP_REPORTED = frozenset({NUM_EXAMPLES_KEY, TRAINED_KEY, "epsilon", "delta", INSECURE_NOISE_MARKER})


@dataclass(frozen=True)
class Disclosure:
    """What a market's replies may carry: everything without DP; under DP :data:`DP_REPORTED` only,
    unless its region set ``dp-exact-metrics`` in its node config."""

    private: bool  # the market trains under DP
    exact_metrics: bool  # its region chose to send exact metrics under DP (outside the guarantee)
    # Under DP, the weight an evaluation reply carries in place of its count of evaluated users:
    # the user count the ledger released (0 before any release); None keeps the reply's own.
    weight: int | None = None

    @classmethod
    def of(cls, config: RunConfig, policy: RegionPolicy, weight: int | None = None) -> "Disclosure":
        """The disclosure of a market training with ``config`` in a region with ``policy``."""
        return cls(private=config.dp_epsilon > 0, exact_metrics=policy.exact_metrics, weight=weight)

    def filter(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` as they may leave the market."""
        if not self.private:
            return dict(metrics)
        if self.exact_metrics:
            return {**metrics, EXACT_METRICS_MARKER: 1}
        kept = {key: value for key, value in metrics.items() if key in DP_REPORTED}
        if self.weight is not None:
            kept[NUM_EXAMPLES_KEY] = self.weight
        return kept


def reply(
    msg: Message,
    market: str,
    metrics: dict[str, Any],
    arrays: ArrayRecord | None = None,
    *,
    disclosure: Disclosure,
) -> Message:
    """The reply to ``msg``: numbers as ``disclosure`` allows, the market's name, for training the shared arrays."""
    content = RecordDict(
        {METRICS_RECORD: MetricRecord(disclosure.filter(metrics)), MARKET_KEY: ConfigRecord({MARKET_NAME_KEY: market})}
    )
    if arrays is not None:
        content[ARRAYS_RECORD] = arrays
    return Message(content=content, reply_to=msg)


def evaluation_metrics(valid: RankingMetrics, test: RankingMetrics) -> dict[str, Any]:
    """The metrics of an evaluation reply: sampled and full-ranking, on validation and test."""
    return {
        NUM_EXAMPLES_KEY: test.users,
        VAL_NDCG_KEY: valid.ndcg,
        VAL_HR_KEY: valid.hit_rate,
        VAL_FULL_NDCG_KEY: valid.full_ndcg,
        VAL_FULL_RECALL_KEY: valid.full_recall,
        TEST_NDCG_KEY: test.ndcg,
        TEST_HR_KEY: test.hit_rate,
        TEST_FULL_NDCG_KEY: test.full_ndcg,
        TEST_FULL_RECALL_KEY: test.full_recall,
    }


def public_reason(error: BaseException) -> str:
    """What the server may learn of ``error``: the file, the line and the kind of problem.

    A data file's error keeps its file name and line and loses every quoted
    value (the bad value itself, a user ID say). A privacy-budget error leaves
    as a fixed text (its numbers depend on the users). Any other error is about
    settings or shapes, and keeps its type and text; every path in it is cut
    to its last part, so that the region's directories stay unknown.
    """
    if isinstance(error, InteractionFileError):
        where = error.path.name if error.line is None else f"{error.path.name} {error.unit} {error.line}"
        problem = _QUOTED.sub("'…'", error.problem)
        return f"{where}: {_without_directories(problem)}"
    if isinstance(error, PrivacyBudgetExceeded):
        # Its text counts steps and epsilon, which depend on the market's users: a fixed text leaves.
        return "PrivacyBudgetExceeded: the market's privacy budget does not allow this"
    return f"{type(error).__name__}: {_without_directories(str(error))}"


@contextmanager
def errors_stay_in_region(action: str, market: str | None = None) -> Iterator[None]:
    """Log an error of ``action`` in full here and let only its :func:`public_reason` leave.

    ``market`` (a deployed region's node config names it) starts the reason, so that the
    server can name a region that fails before it ever replied.
    """
    try:
        yield
    except RegionError:
        raise
    except Exception as error:
        log(ERROR, "The market's %s failed: %s", action, error, exc_info=error)
        where = f"market {market}: " if market else ""
        raise RegionError(f"{where}{action} failed: {public_reason(error)} (details in the region's log)") from None


def _without_directories(text: str) -> str:
    return _PATH.sub(lambda match: match.group(1), text)
