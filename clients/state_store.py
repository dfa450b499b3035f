"""A market's durable state: its head, its privacy ledger, its last round (and, when
it keeps one, its own copy of the shared arrays), in the region's state directory.

``context.state`` lives only as long as one run on one SuperNode process. A
deployed region sets ``state-dir`` in its node config so that a restarted
SuperNode rejoins with its head and ledger, and a new run starts from the
saved head.
"""

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class MarketState:
    """What a market keeps after each round."""

    training_id: str  # the server's training the ledger belongs to (stable across server resumes)
    last_round: int  # the last round the market trained in
    head: dict[str, torch.Tensor]  # local parameters, never shared
    ledger: dict[str, Any] | None  # PrivacyLedger.state() of this training, None without DP
    own_arrays: dict[str, torch.Tensor] | None = None  # its last trained shared arrays, when global weight < 1


class MarketStateStore:
    """One file per market, ``<state-dir>/<market>.pt``, replaced atomically after every round."""

    def __init__(self, state_dir: str | Path, market: str) -> None:
        self.path = Path(state_dir) / f"{market}.pt"

    def load(self) -> MarketState | None:
        """The saved state, or None when the market has none yet."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, weights_only=True)
            return MarketState(
                training_id=str(saved["training-id"]),
                last_round=int(saved["last-round"]),
                head=dict(saved["head"]),
                ledger=saved["ledger"],
                own_arrays=saved.get("own-arrays"),
            )
        except (KeyError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"{self.path}: the saved market state cannot be read ({error}); move it away to start the "
                "market afresh (its privacy ledger goes with it)."
            ) from error

    def save(self, state: MarketState) -> None:
        """Write the state so that a crash leaves either the old or the new file, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(
            {
                "training-id": state.training_id,
                "last-round": state.last_round,
                "head": state.head,
                "ledger": state.ledger,
                "own-arrays": state.own_arrays,
            },
            tmp,
        )
        os.replace(tmp, self.path)
