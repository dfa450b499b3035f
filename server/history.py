"""What a federated run keeps on disk: per-market metrics per round and a checkpoint to resume from."""

import json
import os
import pickle
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.common import log

MARKET_KEY = "market"  # ConfigRecord in each reply naming the market (see clients.client_app)
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoint:
    """The state after a completed round: enough to continue the training from it."""

    server_round: int  # the last completed round
    training_id: str  # names the training across server restarts; markets key their ledgers on it
    arrays: dict[str, torch.Tensor]  # the aggregated shared parameters after that round
    strategy_state: dict[str, Any]  # e.g. the market-level DP accountant


class RunHistory:
    """Each market's metrics per round, written to ``history.json`` after every round.

    Parameters
    ----------
    out_dir : Path
        Where ``history.json`` and ``checkpoint.pt`` are written.
    run_config : dict[str, Any]
        Stored in the history so a run can be reproduced from its output.
    """

    def __init__(self, out_dir: Path, run_config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_config = dict(run_config)
        self.rounds: dict[int, dict[str, Any]] = {}

    def record(self, server_round: int, replies: list[Message], prefix: str = "", strip: str = "") -> None:
        """Keep each market's metrics from ``replies`` under ``server_round``.

        Metric names starting with ``strip`` are kept without it; with
        ``strip`` set, other metrics are ignored. ``prefix`` is put in front
        of every kept name (``local/`` for metrics measured before averaging).
        """
        entry = self.rounds.setdefault(server_round, {"round": server_round, "per_market": {}})
        for reply in replies:
            market = market_of(reply)
            if market is None:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            slot = entry["per_market"].setdefault(market, {})
            for key, value in metrics.items():
                if key.startswith(strip):
                    slot[prefix + key.removeprefix(strip)] = value

    def annotate(self, server_round: int, **values: Any) -> None:
        """Round-level values: ``seconds`` (from sending the round to having aggregated it) and the like."""
        self.rounds.setdefault(server_round, {"round": server_round, "per_market": {}}).update(values)

    def log_round(self, server_round: int) -> None:
        """One line per market with the round's evaluation."""
        for market, metrics in sorted(self.rounds.get(server_round, {}).get("per_market", {}).items()):
            if "test-ndcg" not in metrics:
                continue
            log(
                INFO,
                "round %d market %s: val NDCG@10 %.4f HR@10 %.4f | test NDCG@10 %.4f HR@10 %.4f",
                server_round,
                market,
                metrics["val-ndcg"],
                metrics["val-hr"],
                metrics["test-ndcg"],
                metrics["test-hr"],
            )

    def write(self) -> None:
        """Rewrite ``history.json`` atomically: a reader never sees half a file."""
        history = {"config": self.run_config, "rounds": [self.rounds[r] for r in sorted(self.rounds)]}
        _atomic_write(self.out_dir / HISTORY_FILE, json.dumps(history, indent=1).encode())

    def save_checkpoint(
        self, server_round: int, training_id: str, arrays: ArrayRecord, strategy_state: dict[str, Any]
    ) -> None:
        """Save a completed round's arrays and strategy state as ``checkpoint.pt``, atomically."""
        path = self.out_dir / CHECKPOINT_FILE
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "round": server_round,
                "training-id": training_id,
                "arrays": arrays.to_torch_state_dict(),
                "strategy-state": strategy_state,
            },
            tmp,
        )
        os.replace(tmp, path)

    def load_checkpoint(self) -> Checkpoint | None:
        """The last completed round saved in ``out_dir`` with its history, or None if there is none."""
        path = self.out_dir / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            saved = torch.load(path, weights_only=True)
            checkpoint = Checkpoint(
                server_round=int(saved["round"]),
                training_id=str(saved["training-id"]),
                arrays=dict(saved["arrays"]),
                strategy_state=dict(saved["strategy-state"]),
            )
        except (KeyError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path}: not a checkpoint this version can resume from ({error}).") from error
        history_path = self.out_dir / HISTORY_FILE
        if history_path.exists():
            saved_rounds = json.loads(history_path.read_text())["rounds"]
            # Rounds after the checkpoint were never completed: drop them so
            # that the resumed run writes them afresh.
            self.rounds = {r["round"]: r for r in saved_rounds if r["round"] <= checkpoint.server_round}
        log(INFO, "Resuming training %s after round %d from %s", checkpoint.training_id, checkpoint.server_round, path)
        return checkpoint


def market_of(reply: Message) -> str | None:
    """The market a reply names, or None for an error or a reply without one."""
    if reply.has_error() or MARKET_KEY not in reply.content.config_records:
        return None
    return str(reply.content.config_records[MARKET_KEY]["name"])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
