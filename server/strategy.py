"""FedAvg over the shared encoder that keeps per-market metrics and a checkpoint."""

import json
import os
import time
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

MARKET_KEY = "market"  # ConfigRecord in each reply naming the market (see clients.client_app)


class MarketFedAvg(FedAvg):
    """Plain FedAvg weighted by ``num-examples`` that also records each market.

    Markets reply with their encoder arrays and a few numbers; this strategy
    averages the arrays exactly as :class:`flwr.serverapp.strategy.FedAvg`
    does and, beside it, keeps every market's own metrics per round, logs
    them, and rewrites ``history.json`` in ``out_dir`` after each round.

    Parameters
    ----------
    out_dir : Path
        Where ``history.json`` and ``checkpoint.pt`` are written.
    run_config : dict[str, Any]
        Stored in the history so a run can be reproduced from its output.
    num_rounds : int
        The run's last round, whose evaluation gets ``final_evaluate_config``.
    final_evaluate_config : ConfigRecord
        Added to the evaluate config of the last round (fedper-ft fine-tuning).
    **kwargs
        Passed to :class:`FedAvg`.
    """

    def __init__(
        self,
        out_dir: Path,
        run_config: dict[str, Any],
        num_rounds: int,
        final_evaluate_config: ConfigRecord,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.final_evaluate_config = final_evaluate_config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_config = dict(run_config)
        self.rounds: dict[int, dict[str, Any]] = {}
        self._round_started: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample markets as FedAvg does and start the round's clock."""
        self._round_started[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate on every market; the last round also carries the final settings."""
        if server_round == self.num_rounds:
            config = ConfigRecord({**config, **self.final_evaluate_config})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the encoder and keep each market's training metrics.

        A market out of privacy budget replies with ``num-examples`` 0: it
        carries no weight, and when no market trained the encoder stays as it was.
        """
        replies = list(replies)
        self._record(server_round, replies, prefix="local/")
        trained = [
            reply for reply in replies
            if reply.has_error() or next(iter(reply.content.metric_records.values()))[self.weighted_by_key] > 0
        ]
        if not trained:
            log(INFO, "round %d: no market trained; the encoder is unchanged", server_round)
            return None, None
        return super().aggregate_train(server_round, trained)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the metrics, keep each market's, log them and write the history."""
        replies = list(replies)
        self._record(server_round, replies, prefix="")
        started = self._round_started.get(server_round)
        if started is not None:
            self.rounds[server_round]["seconds"] = time.perf_counter() - started
        for market, metrics in sorted(self.rounds.get(server_round, {}).get("per_market", {}).items()):
            log(
                INFO,
                "round %d market %s: val NDCG@10 %.4f HR@10 %.4f | test NDCG@10 %.4f HR@10 %.4f",
                server_round,
                market,
                metrics.get("val-ndcg", float("nan")),
                metrics.get("val-hr", float("nan")),
                metrics.get("test-ndcg", float("nan")),
                metrics.get("test-hr", float("nan")),
            )
        self.write_history()
        return super().aggregate_evaluate(server_round, replies)

    def _record(self, server_round: int, replies: list[Message], prefix: str) -> None:
        entry = self.rounds.setdefault(server_round, {"round": server_round, "per_market": {}})
        for reply in replies:
            if reply.has_error() or MARKET_KEY not in reply.content.config_records:
                continue
            market = str(reply.content.config_records[MARKET_KEY]["name"])
            metrics = next(iter(reply.content.metric_records.values()))
            slot = entry["per_market"].setdefault(market, {})
            for key, value in metrics.items():
                slot[prefix + key] = value

    def write_history(self) -> None:
        """Rewrite ``history.json`` atomically: a reader never sees half a file."""
        history = {"config": self.run_config, "rounds": [self.rounds[r] for r in sorted(self.rounds)]}
        _atomic_write(self.out_dir / "history.json", json.dumps(history, indent=1).encode())

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """Save the aggregated arrays of ``server_round`` as ``checkpoint.pt``."""
        path = self.out_dir / "checkpoint.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"round": server_round, "arrays": arrays.to_torch_state_dict()}, tmp)
        os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
