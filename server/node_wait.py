"""A deadline on FedAvg's wait for nodes to connect.

Flower's ``FedAvg.configure_train`` and ``configure_evaluate`` call
``sample_nodes``, which polls ``grid.get_node_ids()`` once a second until
enough nodes are connected, with no time limit: a run whose markets never
connect waits forever. Rather than reimplement FedAvg's sampling, the round
loop hands it a :class:`DeadlineGrid`, which answers like the real grid until
the deadline and then raises :class:`NodesUnavailableError` from inside that
wait.
"""

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class NodesUnavailableError(RuntimeError):
    """Fewer nodes than the run needs connected within ``node-timeout``."""


class DeadlineGrid(Grid):
    """``grid``, except that listing the nodes fails once ``timeout`` passed with fewer than ``needed`` connected.

    Parameters
    ----------
    grid : Grid
        The real grid; every other call goes straight to it.
    needed : int
        Nodes the strategy waits for (``min-nodes``, or the markets per round under market-level DP).
    timeout : float
        Seconds from creating this object (one configure call) to giving up.
    """

    def __init__(self, grid: Grid, needed: int, timeout: float) -> None:
        if needed < 1:
            raise ValueError(f"A round needs at least one node, got {needed}.")
        if timeout <= 0:
            raise ValueError(f"The node timeout must be positive, got {timeout}.")
        self.grid, self.needed, self.timeout = grid, needed, timeout
        self.deadline = time.monotonic() + timeout

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes; raises :class:`NodesUnavailableError` past the deadline with too few of them."""
        node_ids = list(self.grid.get_node_ids())
        if len(node_ids) < self.needed and time.monotonic() >= self.deadline:
            raise NodesUnavailableError(
                f"Only {len(node_ids)} of the {self.needed} nodes this run needs (min-nodes, or market-dp-markets "
                f"under market-level DP) connected within node-timeout ({self.timeout:g} s): start the missing "
                "SuperNodes, or lower min-nodes."
            )
        return node_ids

    def set_run(self, run: Run) -> None:
        """Delegated to the real grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The real grid's run."""
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Delegated to the real grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated to the real grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated to the real grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Delegated to the real grid."""
        return self.grid.send_and_receive(messages, timeout=timeout)
