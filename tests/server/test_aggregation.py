"""The aggregation rules: FedAvg follows the weights markets claim; Flower's robust rules do not."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.run_config import AGGREGATIONS
from server.strategy import AGGREGATION_STRATEGIES, MarketDPConfig, build_strategy

pytestmark = pytest.mark.usefixtures("server_task_identity")


def _reply(node: int, value: float, weight: float) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"encoder.w": Array(np.full(3, value, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": weight, "trained": 1}),
        }
    )
    return Message(content, reply_to=sent)


def _aggregate(aggregation: str, hostile: float = 1000.0) -> np.ndarray:
    # Four honest markets near 1.0 with 100 interactions each; one hostile market sends `hostile`
    # and claims a billion interactions.
    replies = [_reply(node, 1.0 + 0.01 * node, 100) for node in range(1, 5)] + [_reply(5, hostile, 1e9)]
    strategy = build_strategy(min_nodes=5, market_dp=None, aggregation=aggregation, malicious=1)
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["encoder.w"].numpy()


def test_fedavg_follows_a_claimed_weight():
    # Execute and Assert: the hostile market is the average (the reason for the robust rules).
    np.testing.assert_allclose(_aggregate("fedavg"), 1000.0, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_a_robust_rule_keeps_the_result_among_the_honest_markets(aggregation):
    # Execute
    result = _aggregate(aggregation)

    # Assert: within the honest markets' range, whatever the hostile one claims or sends.
    assert np.all((result >= 1.01 - 1e-6) & (result <= 1.04 + 1e-6)), result


@pytest.mark.parametrize("aggregation", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_a_claimed_weight_moves_no_robust_rule(aggregation):
    # Prepare: the hostile update inside the honest range, where every rule may select it.
    expected = {
        "fedmedian": 1.025,  # the coordinate-wise median of 1.01, 1.02, 1.025, 1.03, 1.04
        "fedtrimmedavg": (1.02 + 1.025 + 1.03) / 3,  # one market cut per side, then the plain mean
        # Krum scores each update by its squared distances to its n - f - 2 = 2 nearest: 1.025
        # scores lowest (it is chosen alone); MultiKrum keeps the n - f = 4 lowest, 1.025, 1.02,
        # 1.03 and the first of the tied 1.01 and 1.04, each weighing one: their plain mean.
        "krum": 1.025,
        "multikrum": (1.025 + 1.02 + 1.03 + 1.01) / 4,
    }[aggregation]

    # Execute
    result = _aggregate(aggregation, hostile=1.025)

    # Assert: the billion claimed interactions count as one market (weighted, MultiKrum would give ~1.025).
    np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_every_configurable_aggregation_has_a_strategy_and_market_dp_needs_fedavg():
    # Assert: the run config's names are exactly the server's.
    assert tuple(AGGREGATION_STRATEGIES) == AGGREGATIONS
    market_dp = MarketDPConfig(1.0, 1.0, 5, 1e-5, 0.0)
    with pytest.raises(ValueError, match="fedavg only"):
        build_strategy(5, market_dp, "fedmedian")
