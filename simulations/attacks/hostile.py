"""The attacker's side of the wire: a server that sends the real ClientApp whatever it chooses.

Flower's SuperLink only relays messages; what a market receives is whatever the ServerApp
(or whoever submits a run) put in them. :class:`HostileServer` builds those messages by hand
and hands them to :data:`clients.client_app.app` in this process, with the Context a
SuperNode would give it: a simulated partition, or a deployed region's node config (its
market, data file, catalog and state directory). Nothing of the market's side is replaced.
"""

from collections.abc import Mapping
from typing import Any
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app


class MarketRefused(RuntimeError):
    """The market answered with an error reply instead of content."""


class HostileServer:
    """Send crafted messages to real markets, one :class:`flwr.app.Context` per node.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        The run config the attacker submits (every key of the app config).
    node_configs : list[dict[str, Any]]
        One node config per market, as its SuperNode would be started with.
    """

    def __init__(self, run_config: Mapping[str, Any], node_configs: list[dict[str, Any]]) -> None:
        if not node_configs:
            raise ValueError("A hostile server needs at least one market to attack.")
        # Flower stamps a message with the sending task's identity, which a ServerApp process has.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.run_config = dict(run_config)
        self.contexts = [
            Context(
                run_id=1, node_id=node + 1, node_config=dict(config), state=RecordDict(), run_config=self.run_config
            )
            for node, config in enumerate(node_configs)
        ]

    @classmethod
    def simulated(cls, run_config: Mapping[str, Any], markets: int) -> "HostileServer":
        """Markets as the simulation engine starts them: a partition id each."""
        return cls(run_config, [{"partition-id": p, "num-partitions": markets} for p in range(markets)])

    def ask(self, node: int, message_type: str, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> Message:
        """Send market ``node`` (0-based) one message; its reply.

        ``message_type`` is ``"train"`` or ``"evaluate"``. A market that raises (which Flower's
        runtime would send back as an error reply) raises :class:`MarketRefused` with the reason.
        """
        content = RecordDict(
            {
                "arrays": ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()}),
                "config": ConfigRecord(dict(config)),
            }
        )
        message = Message(content, self.contexts[node].node_id, message_type)
        message.metadata.__dict__["_message_id"] = uuid4().hex  # what a SuperLink does
        try:
            return client_app(message, self.contexts[node])
        except Exception as error:  # noqa: BLE001 - Flower's runtime turns it into an error reply
            raise MarketRefused(str(error)) from error

    def metrics(
        self, node: int, message_type: str, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The metrics of the reply to one message; :class:`MarketRefused` if it is an error."""
        reply = self.ask(node, message_type, arrays, config)
        if reply.has_error():
            raise MarketRefused(reply.error.reason)
        records = reply.content.metric_records
        return dict(next(iter(records.values()))) if records else {}

    def arrays(
        self, node: int, message_type: str, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays and metrics of the reply to one message; :class:`MarketRefused` if it is an error."""
        reply = self.ask(node, message_type, arrays, config)
        if reply.has_error():
            raise MarketRefused(reply.error.reason)
        records = reply.content.array_records
        sent = {name: array.numpy() for name, array in next(iter(records.values())).items()} if records else {}
        metric_records = reply.content.metric_records
        return sent, (dict(next(iter(metric_records.values()))) if metric_records else {})


class InProcessGrid(Grid):
    """A grid whose nodes answer at once in this process, for the real ServerApp; it keeps every message sent.

    A SuperLink with the simulation engine costs ~30 s per training; an attack (or a test) that
    needs a training's messages, not the transport, runs the same apps through this grid.
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = list(node_ids)
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def answer(self, message: Message) -> Message | None:
        """The node's reply to ``message``, or None when it stays silent."""
        raise NotImplementedError

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # what a SuperLink does
            self.sent.append(message)
            reply = self.answer(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError
