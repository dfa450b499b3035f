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
from logging import ERROR
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from common.data import InteractionFileError
from common.train import RankingMetrics

MARKET_KEY = "market"  # the ConfigRecord naming the replying market
RECEIVED_PREFIX = "received-"  # train reply metrics of the received model, before training (see server.rounds)

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")  # a value quoted in a message, e.g. a bad rating
_PATH = re.compile(r"(?<![\w.~-])(?:~|\.{1,2})?/(?:[\w.-]+/)*([\w.-]+)")  # an absolute or ./ path: keep its last part


class RegionError(RuntimeError):
    """An error whose text may leave the region: no raw value of a data file, no directory of the region."""


def reply(msg: Message, market: str, metrics: dict[str, Any], arrays: ArrayRecord | None = None) -> Message:
    """The reply to ``msg``: numbers, the market's name and, for training, the shared arrays."""
    content = RecordDict({"metrics": MetricRecord(metrics), MARKET_KEY: ConfigRecord({"name": market})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def evaluation_metrics(valid: RankingMetrics, test: RankingMetrics) -> dict[str, Any]:
    """The metrics of an evaluation reply: sampled and full-ranking, on validation and test."""
    return {
        "num-examples": test.users,
        "val-ndcg": valid.ndcg,
        "val-hr": valid.hit_rate,
        "val-full-ndcg": valid.full_ndcg,
        "val-full-recall": valid.full_recall,
        "test-ndcg": test.ndcg,
        "test-hr": test.hit_rate,
        "test-full-ndcg": test.full_ndcg,
        "test-full-recall": test.full_recall,
    }


def public_reason(error: BaseException) -> str:
    """What the server may learn of ``error``: the file, the line and the kind of problem.

    A data file's error keeps its file name and line and loses every quoted
    value (the bad value itself, a user ID say). Any other error is about
    settings or shapes, and keeps its type and text; every path in it is cut
    to its last part, so that the region's directories stay unknown.
    """
    if isinstance(error, InteractionFileError):
        where = error.path.name if error.line is None else f"{error.path.name} {error.unit} {error.line}"
        problem = _QUOTED.sub("'…'", error.problem)
        return f"{where}: {_without_directories(problem)}"
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
