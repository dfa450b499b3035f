"""FedALS: federated implicit ALS, one ALS iteration per Flower round.

Each round the server sends every market the item factors of its assortment and the Gram
``YᵀY`` of the whole table; the market solves its users against them and replies with
item-side statistics summed over its users (:func:`common.ials_wire.pack_statistics`) and its
assortment's rows; the server sums the statistics and solves every touched item exactly
(:func:`common.ials.packed.solve_items_packed`: items in blocks, read from the replies' packed
float16 or float32 bytes without a copy). The item factors equal pooled iALS of the same settings
(:func:`common.ials.pooled_ials`) up to the float32 wire. No user-indexed value is sent.

The round loop (:mod:`server.rounds`) keeps the shared state as the encoder's state dict
(:func:`common.ials_model.encoder_state`: ``Y`` dense over the catalog, the tower zero), so
checkpoints, resumes and ``published.pt`` are those of the other methods. A node's rows come
from its previous reply; a node the server has none for gets, in the first round of a
seeded training, the Gram alone and draws its seeded initial rows itself, and otherwise the
whole table (a new node). A resumed server sends what the interrupted one would have: the
nodes' rows and the federation's user Gram are part of the checkpoint
(:meth:`FedALS.state_dict`), so a resumed round evaluates and trains as the lost attempt did.
"""

from collections.abc import Iterable
from logging import INFO
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common.ials.core import IALSConfig, ItemFactors, lookup_rows
from common.ials.dp import private_release_problem, solve_private_items
from common.ials.model import ITEM_TABLE, encoder_state
from common.ials.packed import PackedStatistics, npy_view, solve_items_packed
from common.ials.wire import (
    ASSORTMENT_KEY,
    INITIAL_ROWS_KEY,
    declared_reply_problem,
    npy_header_problem,
    pack_item_factors,
    reply_problem,
)
from common.protocol import ARRAYS_RECORD, CONFIG_RECORD, NUM_EXAMPLES_KEY, SERVER_ROUND_KEY, USER_GRAM_KEY

NUMPY_STYPE = "numpy.ndarray"  # how Flower's Array serialises a numpy array (its .npy bytes)
_GRAM_BLOCK = 65536  # rows per block of the Gram's sum: 64 MB of float64 at 128 factors


class FedALS(FedAvg):
    """Federated implicit ALS over the markets' item statistics.

    Parameters
    ----------
    config : IALSConfig
        The iALS settings (d, λ, α, ν) every market uses too.
    num_items : int
        Rows of the item table (catalog plus overflow).
    seeded_start : bool
        True when round 1 starts from the seeded initial table
        (:func:`common.ials_model.initial_encoder_state`), which markets draw themselves;
        False when it starts from other arrays (``init-from``).
    min_nodes : int
        Markets that must be connected before a round starts.
    private : bool
        The markets train under DP and reply with private releases (:mod:`common.ials.dp`),
        which the server solves with DP-fedals' item step; exact statistics are then refused.
    """

    def __init__(
        self, config: IALSConfig, num_items: int, seeded_start: bool, min_nodes: int = 2, private: bool = False
    ) -> None:
        if num_items < 1:
            raise ValueError(f"FedALS needs an item table of at least one row, got {num_items}.")
        if min_nodes < 1:
            raise ValueError(f"FedALS needs at least one market per round, got min_nodes={min_nodes}.")
        super().__init__(
            weighted_by_key=NUM_EXAMPLES_KEY,
            arrayrecord_key=ARRAYS_RECORD,
            configrecord_key=CONFIG_RECORD,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_nodes,
        )
        self.config = config
        self.num_items = num_items
        self.seeded_start = seeded_start
        self.private = private
        self._rows: dict[int, np.ndarray] = {}  # node id -> its assortment rows, from its last reply
        # Σ_m of the markets' augmented user Grams of the last aggregated round (non-DP): sent back so
        # that a market can solve the items it keeps to itself (common.ials.private).
        self._user_gram: np.ndarray | None = None
        # The arrays of the current shared state, their non-zero rows (float32) and their Gram:
        # the rows alone, not a second dense copy of a table that can have a million rows.
        self._state: tuple[ArrayRecord, _Held, np.ndarray] | None = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed server needs to send the next round as this one would: each node's
        rows and the user Gram of the last aggregated round, as tensors (``checkpoint.pt``).

        A node whose rows are the whole table (under DP without a product list, the catalog)
        is listed under ``whole-table`` instead of carrying them: a checkpoint of a thousand
        markets over a million rows stays small.
        """
        whole = [node for node, rows in self._rows.items() if len(rows) == self.num_items]
        state: dict[str, Any] = {
            "rows": {str(node): torch.from_numpy(rows) for node, rows in self._rows.items() if node not in whole},
            "whole-table": torch.tensor(whole, dtype=torch.int64),
        }
        if self._user_gram is not None:
            state[USER_GRAM_KEY] = torch.from_numpy(np.array(self._user_gram, dtype=np.float64))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put :meth:`state_dict`'s output back.

        Raises
        ------
        ValueError
            If ``state`` is not shaped as :meth:`state_dict` writes it for these settings
            (rows inside the table, a (d + 1)² finite Gram), naming what is wrong.
        """
        rows, gram = state.get("rows", {}), state.get(USER_GRAM_KEY)
        whole = state.get("whole-table", torch.zeros(0, dtype=torch.int64))
        if not isinstance(rows, dict) or not torch.is_tensor(whole) or whole.dtype != torch.int64 or whole.ndim != 1:
            raise ValueError("The checkpoint's fedals state is not a map of node rows and a list of nodes.")
        dim = self.config.factors
        kept = {int(node): np.arange(self.num_items, dtype=np.int64) for node in whole.tolist()}
        for node, value in rows.items():
            if not (str(node).isdigit() and _row_tensor(value, self.num_items)):
                raise ValueError(
                    f"The checkpoint's fedals state holds rows for node {node!r} that are not rows of this table."
                )
            kept[int(node)] = value.numpy().copy()
        if gram is not None and not (
            torch.is_tensor(gram)
            and gram.dtype == torch.float64
            and tuple(gram.shape) == (dim + 1, dim + 1)
            and bool(torch.isfinite(gram).all())
        ):
            raise ValueError(f"The checkpoint's fedals user Gram is not ({dim + 1}, {dim + 1}) finite float64 values.")
        self._rows = kept
        self._user_gram = None if gram is None else gram.numpy().copy()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled market the item factors of its rows and the Gram, for its user step."""
        if self.fraction_train == 0.0:
            return []
        return self._configure(
            server_round, arrays, config, grid, MessageType.TRAIN, self.fraction_train, self.min_train_nodes
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled market the item factors of its rows and the Gram, to evaluate them."""
        if self.fraction_evaluate == 0.0:
            return []
        return self._configure(
            server_round, arrays, config, grid, MessageType.EVALUATE, self.fraction_evaluate, self.min_evaluate_nodes
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the markets' statistics and solve the items: the new encoder state, or None without replies.

        The replies passed :meth:`reply_problem` (through the round loop's reply screen);
        each one also tells the server its node's rows for the next message.
        """
        statistics, releases, users, received = [], [], 0, 0
        for reply in replies:
            record = next(iter(reply.content.array_records.values()))
            # Statistics as views of the message's bytes, not copies: at a million-user market the
            # packed factors alone are gigabytes (the reply screen has checked every header, .npy
            # 1.0 or 2.0). A DP release, whose headers the screen does not read, is decoded as before.
            payload = {name: array.numpy() if self.private else npy_view(array.data) for name, array in record.items()}
            received += sum(len(array.data) for array in record.values())
            rows = payload.pop(ASSORTMENT_KEY).astype(np.int64)
            self._rows[reply.metadata.src_node_id] = rows
            if self.private:
                releases.append((rows, payload))
                metrics = next(iter(reply.content.metric_records.values()))
                users += int(metrics.get(NUM_EXAMPLES_KEY, 0))
            else:
                statistics.append(PackedStatistics.from_payload(payload))
        if not statistics and not releases:
            return None, None
        solved = (
            solve_private_items(releases, max(users, 1), self.config)
            if self.private
            else solve_items_packed(statistics, self.config)
        )
        if not self.private:
            self._user_gram = sum(part.gram for part in statistics)
        table = np.zeros((self.num_items, self.config.factors), dtype=np.float32)
        table[solved.rows] = solved.factors
        arrays = ArrayRecord(encoder_state(table))
        del table  # the arrays hold it now; the rows below are all the server keeps besides
        # A row solved to exactly zero (all its buyers' factors zero) holds no factor: it is left
        # out here as a resumed server, reading the table, leaves it out, so |I| is the same.
        factors = solved.factors.astype(np.float32)
        held = factors.any(axis=1)
        self._state = (arrays, *_nonzero_rows_and_gram(solved.rows[held], factors[held]))
        log(
            INFO,
            "fedals round %d: solved %d item rows from %d markets' %s (%d bytes received)",
            server_round,
            len(solved.rows),
            len(releases) if self.private else len(statistics),
            "DP releases" if self.private else "statistics",
            received,
        )
        return arrays, None

    def reply_problem(self, arrays: ArrayRecord, sent: ArrayRecord) -> str | None:
        """What is wrong with a train reply's arrays, or None: the reply screen's check for fedals.

        Parameters
        ----------
        arrays : ArrayRecord
            The reply's arrays.
        sent : ArrayRecord
            The encoder state the round started from (unused: markets reply with statistics).
        """
        if not self.private:  # sizes from the declarations first: nothing is decoded before they pass
            declared = {name: (array.dtype, tuple(array.shape), len(array.data)) for name, array in arrays.items()}
            if (problem := declared_reply_problem(declared, self.num_items, self.config.factors)) is not None:
                return problem
            for name, array in arrays.items():  # ... and the bytes hold what is declared, header first
                if array.stype != NUMPY_STYPE:
                    return f"array {name!r} is not serialised as a numpy array"
                if (problem := npy_header_problem(array.data, array.dtype, tuple(array.shape))) is not None:
                    return f"array {name!r}: {problem}"
        try:
            payload = {name: array.numpy() for name, array in arrays.items()}
        except Exception as error:  # noqa: BLE001 - any undecodable payload is the sender's fault
            return f"its arrays cannot be decoded ({type(error).__name__}: {error})"
        if self.private:
            return private_release_problem(payload, self.num_items, self.config.factors)
        return reply_problem(payload, self.num_items, self.config.factors)

    def _configure(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
        fraction: float,
        minimum: int,
    ) -> list[Message]:
        sample_size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
        held, gram = self._table(arrays)
        messages = []
        for node in node_ids:
            initial = node not in self._rows and self.seeded_start and server_round <= 1
            if initial:
                payload = {"gram": gram.astype(np.float32)}
            else:
                rows = self._rows.get(node, held.rows)
                factors = ItemFactors(rows, lookup_rows(held.rows, held.factors, rows))
                payload = pack_item_factors(factors, gram, len(held.rows))
                if self._user_gram is not None:
                    payload[USER_GRAM_KEY] = self._user_gram.astype(np.float32)
            node_config = ConfigRecord({**config, SERVER_ROUND_KEY: server_round, INITIAL_ROWS_KEY: initial})
            content = RecordDict(
                {ARRAYS_RECORD: ArrayRecord({k: Array(v) for k, v in payload.items()}), CONFIG_RECORD: node_config}
            )
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        log(INFO, "fedals %s round %d: item factors for %d markets", message_type, server_round, len(messages))
        return messages

    def _table(self, arrays: ArrayRecord) -> tuple["_Held", np.ndarray]:
        """The non-zero rows of the item table in ``arrays`` and its Gram (kept from the aggregation that made them)."""
        if self._state is None or self._state[0] is not arrays:
            table = arrays[ITEM_TABLE].numpy()
            if table.shape != (self.num_items, self.config.factors):
                raise ValueError(
                    f"FedALS solves {self.config.factors} factors of {self.num_items} rows, but the shared "
                    f"state's {ITEM_TABLE} is {table.shape}."
                )
            rows = np.flatnonzero(table.any(axis=1))
            factors = table if len(rows) == len(table) else table[rows]  # no copy of a table with no zero row
            del table
            self._state = (arrays, *_nonzero_rows_and_gram(rows, factors))
        return self._state[1], self._state[2]


def _row_tensor(value: Any, num_items: int) -> bool:
    """Whether ``value`` is a dense 1-D int64 tensor of rows inside a table of ``num_items`` rows."""
    if not torch.is_tensor(value) or value.layout != torch.strided or value.dtype != torch.int64 or value.ndim != 1:
        return False
    return len(value) == 0 or (int(value.min()) >= 0 and int(value.max()) < num_items)


class _Held(NamedTuple):
    """The non-zero rows of the shared item table (sorted) and their float32 factors."""

    rows: np.ndarray
    factors: np.ndarray


def _nonzero_rows_and_gram(rows: np.ndarray, factors: np.ndarray) -> tuple[_Held, np.ndarray]:
    """The table's non-zero ``rows`` with their float32 ``factors``, and ``YᵀY`` over them in float64.

    The Gram is summed in blocks of rows, so that a table of a million rows never has a float64 copy.
    """
    dim = factors.shape[1]
    gram = np.zeros((dim, dim))
    for start in range(0, len(rows), _GRAM_BLOCK):
        block = factors[start : start + _GRAM_BLOCK].astype(np.float64)
        gram += block.T @ block
    return _Held(rows.astype(np.int64), factors), gram
