"""The server's reply handling: failed markets are logged and left out; all failing stops the run."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from common.runtime.names import MAX_TEXT
from server.replies import MarketBinding, ReplyScreen
from server.rounds import AllMarketsFailedError, check_replies, warn_unanswered_budgets

pytestmark = pytest.mark.usefixtures("server_task_identity")


def _sent(node: int) -> Message:
    return Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type=MessageType.TRAIN
    )


def _ok(node: int) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=_sent(node))


def _from_market(node: int, market: str) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 5}), "market": ConfigRecord({"name": market})})
    return Message(content, reply_to=_sent(node))


def _failed(node: int, reason: str) -> Message:
    return Message(Error(code=2, reason=reason), reply_to=_sent(node))


def test_failed_markets_are_left_out_and_the_rest_go_on():
    replies = [_ok(1), _failed(2, "bad.txt line 3: rating 'lots' is not a number"), _ok(3)]

    kept = check_replies(1, asked=3, replies=replies)

    assert kept == [replies[0], replies[2]]


def test_every_market_failing_stops_the_run_with_every_reason():
    replies = [_failed(1, "catalog mismatch"), _failed(2, "bad.txt line 3")]

    with pytest.raises(
        AllMarketsFailedError, match="catalog mismatch; bad.txt line 3|bad.txt line 3; catalog mismatch"
    ):
        check_replies(4, asked=2, replies=replies)


def test_markets_that_did_not_reply_in_time_are_not_failures():
    reply = _ok(1)

    assert check_replies(2, asked=3, replies=[reply]) == [reply]


def test_a_budgeted_market_no_reply_came_from_is_named_in_a_warning(flower_warnings):
    replies = [_from_market(1, "de"), _from_market(2, "jp")]

    warn_unanswered_budgets(frozenset({"de", "jpn"}), replies)

    assert len(flower_warnings) == 1
    message = flower_warnings[0].getMessage()
    assert "['jpn']" in message and "['de', 'jp']" in message


def test_budgeted_markets_that_all_replied_raise_no_warning(flower_warnings):
    warn_unanswered_budgets(frozenset({"de"}), [_from_market(1, "de"), _from_market(2, "jp")])

    assert flower_warnings == []


SENT = ArrayRecord({"encoder.w": Array(np.zeros(2, dtype=np.float32))})


def _train_reply(node: int, market: ConfigRecord | None) -> Message:
    content = RecordDict({"arrays": SENT, "metrics": MetricRecord({"num-examples": 5})})
    if market is not None:
        content["market"] = market
    return Message(content, reply_to=_sent(node))


@pytest.mark.parametrize(
    ("market", "reason"),
    [
        (None, "names no market"),
        (ConfigRecord({"name": 7}), "names no market"),
        (ConfigRecord({"name": "../../etc"}), "is not allowed"),
    ],
)
def test_a_reply_without_a_usable_market_name_is_refused(market, reason):
    screen = ReplyScreen(MarketBinding())

    accepted, refused = screen.screen(1, [_train_reply(3, market)], SENT)

    assert accepted == [] and len(refused) == 1 and "node 3" in refused[0] and reason in refused[0]


def test_a_binding_restored_from_a_checkpoint_keeps_a_market_with_its_node():
    screen = ReplyScreen(MarketBinding({1: "de"}))
    replies = [_train_reply(2, ConfigRecord({"name": "de"})), _train_reply(1, ConfigRecord({"name": "de"}))]

    accepted, refused = screen.screen(4, replies, SENT)

    assert accepted == [replies[1]]
    assert refused == ["node 2 (market 'de'): market 'de' is bound to node 1, not node 2"]
    assert screen.binding.state() == {1: "de"}


def test_a_binding_with_one_market_on_two_nodes_is_refused():
    with pytest.raises(ValueError, match="Market 'de' is bound to two nodes, 1 and 2"):
        MarketBinding({1: "de", 2: "de"})


def test_replies_refused_by_the_screen_count_as_failures_when_none_is_left():
    with pytest.raises(AllMarketsFailedError, match="node 2 .*non-finite"):
        check_replies(3, asked=2, replies=[_failed(1, "crashed")], refused=["node 2 (market 'jp'): non-finite"])


def test_a_failed_node_is_named_by_the_market_it_replied_for_before(flower_warnings):
    # Prepare: node 2 replied as jp in an earlier round and has since died: the SuperLink (node 1) answers
    # for it, as Flower does; node 4 never replied, but its error names its market.
    binding = MarketBinding({2: "jp"})
    to_jp = _sent(2)
    to_jp.metadata.__dict__["_message_id"] = to_jp.object_id  # what pushing it does
    lost = create_message_error_unavailable_res_message(to_jp.metadata, "node_unavail")
    replies = [_ok(1), lost, _failed(4, "market bad: training failed: bad.txt line 3")]

    # Execute
    kept = check_replies(3, asked=3, replies=replies, binding=binding, destination={to_jp.metadata.message_id: 2})

    # Assert
    assert lost.metadata.src_node_id == 1 and kept == [replies[0]]
    messages = [record.getMessage() for record in flower_warnings]
    assert f"round 3: market jp (node 2) failed: {lost.error.reason}" in messages
    assert "round 3: node 4 failed: market bad: training failed: bad.txt line 3" in messages


def test_a_regions_error_reason_reaches_the_log_escaped_and_bounded(flower_warnings):
    # Prepare: a reason that would forge a log line and fill the log.
    forged = "x\nINFO : round 9 market de: val NDCG@10 0.99\x1b[2J" + "y" * 10_000

    # Execute
    with pytest.raises(AllMarketsFailedError) as stopped:
        check_replies(1, asked=1, replies=[_failed(2, forged)])

    # Assert: one line each, no control character, at most MAX_TEXT characters of the reason.
    logged = [record.getMessage() for record in flower_warnings]
    for text in [*logged, str(stopped.value)]:
        assert "\n" not in text and "\x1b" not in text
        assert len(text) < MAX_TEXT + 200
    assert f"({len(forged)} characters)" in logged[0]


def test_a_refusal_quoting_what_the_sender_declared_is_escaped_and_bounded():
    # Prepare: an array whose declared dtype forges a log line and runs to 100,000 characters.
    forged = "float32\n2099 INFO round 9: forged" + "A" * 100_000
    arrays = ArrayRecord({"encoder.w": Array(dtype=forged, shape=(3,), stype="numpy.ndarray", data=b"")})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})})
    content["market"] = ConfigRecord({"name": "de"})

    # Execute
    accepted, refused = ReplyScreen(MarketBinding()).screen(1, [Message(content, reply_to=_sent(3))], SENT)

    # Assert: refused, in one bounded line.
    assert accepted == [] and "\n" not in refused[0] and len(refused[0]) < MAX_TEXT + 100


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"num-examples": 5, "val-ndcg\nINFO : forged": 0.5}, "metric name"),
        ({"num-examples": 5, "v" * 65: 0.5}, "metric name"),
        ({"num-examples": 5, **{f"m{i}": 0.0 for i in range(64)}}, "more than 64"),
        ({"num-examples": 5, "val-ndcg": [0.5, 0.9]}, "is not a number"),
        ({"num-examples": 5, "trained": 10**9}, "not 0 or 1"),
    ],
    ids=["control character", "too long", "too many", "a list", "trained claims more than one market"],
)
def test_a_reply_with_metric_names_the_history_should_not_keep_is_refused(metrics, reason):
    # Prepare: an evaluation reply (no arrays) from a named market.
    content = RecordDict({"metrics": MetricRecord(metrics), "market": ConfigRecord({"name": "de"})})
    reply = Message(content, reply_to=_sent(3))

    # Execute
    accepted, refused = ReplyScreen(MarketBinding()).screen(1, [reply], None)

    # Assert
    assert accepted == [] and len(refused) == 1 and reason in refused[0] and "\n" not in refused[0]
