"""A market's durable state in its region's ``state-dir``: its model state and its privacy ledger.

``context.state`` lives only as long as one run on one SuperNode process. A
deployed region sets ``state-dir`` in its node config; two files per market
live there:

* ``<market>.pt``: the head, the market's own copy of the shared arrays, the
  training and round they come from (:class:`MarketStateStore`). Losing it
  loses a trained head, nothing more. When a new training first saves its head,
  the head of the training before moves to ``<market>.heads/<training-id>.pt``:
  heads are kept per training (the latest :data:`KEPT_HEADS`), so a later
  training that continues an earlier one (``init-from``) starts from that
  training's head, whatever ran between.
* ``<market>.ledger.json``: the region's lifetime privacy ledger
  (:class:`LedgerStore`): every DP release the market ever made, whatever
  training or server it was for. It is keyed by the region's market alone,
  never by anything the server sends, and it is never reset by the code: an
  operator starts a new budget period on purpose (``python -m clients.ledger``).

fedals without DP adds ``<market>.fedals-users-<round>.pt`` (:class:`UsersStore`): the
market's user factors of a round it trained, for its step over the items it keeps to itself
after a restart or a resumed server. At most two are kept, and they never leave the region.

Both are written through :mod:`common.runtime.durable` (a unique 0600 temp file,
fsync, rename, fsync of the directory) under a lock per file.
"""

import glob
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.privacy.ledger import PrivacyLedger
from common.runtime.durable import atomic_torch_save, atomic_write_bytes, locked
from common.runtime.names import check_name

LEDGER_FORMAT = 1  # version of <market>.ledger.json
# Earlier trainings' heads kept beside the latest: the oldest beyond these are removed, so that a server naming
# ever new trainings cannot fill the region's disk with heads (each up to the market's users times d floats).
KEPT_HEADS = 8
JOIN_TRAINING_PREFIX = "join-"  # training id of a head clients.join wrote: join-<the published training's id>


@dataclass(frozen=True)
class MarketState:
    """What a market keeps of its model after each round."""

    training_id: str  # the server's training the head was last trained in
    last_round: int  # the last round the market trained in
    head: dict[str, torch.Tensor]  # local parameters, never shared
    own_arrays: dict[str, torch.Tensor] | None = None  # its last trained shared arrays, when global weight < 1
    private: bool = False  # the head and own arrays were trained under DP only: a DP training may start from them
    ledger: bool = False  # the market kept a DP ledger when this was saved: a ledger must exist beside it


@dataclass
class LedgerEntry:
    """The lifetime ledger and the training whose calibration it currently holds."""

    ledger: PrivacyLedger  # history and releases over the region's lifetime; noise and rate of the current training
    training_id: str  # the training the calibration was made for
    calibration: dict[str, Any]  # the settings the calibration depends on; another value means recalibrate
    periods: list[dict[str, Any]]  # earlier budget periods an operator closed (see clients.ledger)


class CorruptStateError(ValueError):
    """A file in ``state-dir`` exists but cannot be used; the message names it and what is lost."""


class MarketStateStore:
    """``<state-dir>/<market>.pt``, replaced atomically after every round; earlier trainings' heads beside it."""

    def __init__(self, state_dir: str | Path, market: str) -> None:
        self.path = Path(state_dir) / f"{check_name(market)}.pt"
        self.kept = Path(state_dir) / f"{check_name(market)}.heads"  # <training-id>.pt: a head per earlier training

    def load(self) -> MarketState | None:
        """The saved state of the latest training, or None when the market has none yet.

        Raises
        ------
        CorruptStateError
            If the file cannot be read or does not hold a market state.
        """
        return self._read(self.path)

    def load_training(self, training_id: str, latest: MarketState | None = None) -> MarketState | None:
        """The head the market saved in ``training_id`` (or joined from its published part), or None.

        Raises
        ------
        CorruptStateError
            If the file holding it cannot be read or does not hold a market state.
        """
        wanted = {training_id, f"{JOIN_TRAINING_PREFIX}{training_id}"}
        latest = latest or self.load()  # the caller's copy of <market>.pt, when it has read it already
        if latest is not None and latest.training_id in wanted:
            return latest
        for name in sorted(wanted):
            path = self.kept / f"{check_name(name, 'training')}.pt"
            if path.exists():
                return self._read(path)
        return None

    def trainings(self) -> list[str]:
        """The trainings whose heads are kept beside the latest one."""
        return sorted(path.stem for path in self.kept.glob("*.pt")) if self.kept.is_dir() else []

    def _read(self, path: Path, mmap: bool = False) -> MarketState | None:
        if not path.exists():
            return None
        try:
            saved = torch.load(path, weights_only=True, mmap=mmap)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise self._corrupt(f"cannot be read ({error})", path) from error
        if not isinstance(saved, dict):
            raise self._corrupt(f"holds a {type(saved).__name__}, not a market state", path)
        try:
            state = MarketState(
                training_id=str(saved["training-id"]),
                last_round=int(saved["last-round"]),
                head=_tensors(saved["head"]),
                own_arrays=_tensors(saved["own-arrays"]) if saved.get("own-arrays") is not None else None,
                private=bool(saved.get("private", False)),
                ledger=bool(saved.get("has-ledger", saved.get("private", False) or saved.get("ledger") is not None)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise self._corrupt(f"is not a market state ({type(error).__name__}: {error})", path) from error
        return state

    def legacy_ledger(self) -> dict[str, Any] | None:
        """The ledger an earlier version kept inside ``<market>.pt``, if any (read once, to migrate it)."""
        if not self.path.exists():
            return None
        saved = torch.load(self.path, weights_only=True)
        return saved.get("ledger") if isinstance(saved, dict) else None

    def save(self, state: MarketState) -> None:
        """Write the state so that a crash leaves either the old or the new file, never half of one.

        A head of another training in ``<market>.pt`` is first moved to ``<market>.heads/``; an
        unreadable one is left there for the operator, and the new head is not saved.
        """
        payload = {
            "training-id": state.training_id,
            "last-round": state.last_round,
            "head": state.head,
            "own-arrays": state.own_arrays,
            "private": state.private,
            "has-ledger": state.ledger,
        }
        with locked(self.path):
            # Memory-mapped: after every round only the earlier head's training id is wanted, not its tensors.
            earlier = self._read(self.path, mmap=True)
            if earlier is not None and earlier.training_id != state.training_id:
                self.kept.mkdir(parents=True, exist_ok=True)
                os.replace(self.path, self.kept / f"{check_name(earlier.training_id, 'training')}.pt")
                kept = sorted(self.kept.glob("*.pt"), key=lambda path: path.stat().st_mtime_ns)
                for path in kept[:-KEPT_HEADS]:
                    path.unlink(missing_ok=True)
            atomic_torch_save(self.path, payload)

    def _corrupt(self, problem: str, path: Path) -> CorruptStateError:
        return CorruptStateError(
            f"{path}: the saved market state {problem}. Move it away to start the market with a new head; "
            "its privacy ledger is kept apart and is not affected."
        )


class LedgerStore:
    """``<state-dir>/<market>.ledger.json``: the market's lifetime privacy ledger."""

    def __init__(self, state_dir: str | Path, market: str) -> None:
        self.market = check_name(market)
        self.path = Path(state_dir) / f"{self.market}.ledger.json"
        # Written beside the ledger at its first save and never removed by the code: a ledger
        # missing beside it was lost, not never made, whatever method the market trained.
        self.marker = Path(state_dir) / f"{self.market}.ledger.started"

    def exists(self) -> bool:
        return self.path.exists()

    def lock(self):
        """Hold the ledger for a read, spend and write: one market's trainings never interleave."""
        return locked(self.path)

    def load(self) -> LedgerEntry | None:
        """The ledger, or None when the market never trained under DP with this state-dir.

        Raises
        ------
        CorruptStateError
            If the file exists but cannot be read: its spending is then unknown,
            and the market must not train under DP until an operator acts.
        """
        if not self.path.exists():
            if self.marker.exists():
                raise self.unusable(
                    f"is missing although this state-dir shows the market kept one before ({self.marker.name})"
                )
            return None
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("format") != LEDGER_FORMAT or saved.get("market") != self.market:
                raise ValueError(f"format {saved.get('format')!r} of market {saved.get('market')!r}")
            return LedgerEntry(
                ledger=PrivacyLedger.from_state(saved["ledger"]),
                training_id=str(saved["training-id"]),
                calibration=dict(saved["calibration"]),
                periods=list(saved.get("periods", [])),
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise self.unusable(f"cannot be read ({type(error).__name__}: {error})") from error

    def save(self, entry: LedgerEntry) -> None:
        """Replace the ledger atomically and durably (the caller holds :meth:`lock`)."""
        saved = {
            "format": LEDGER_FORMAT,
            "market": self.market,
            "ledger": entry.ledger.state(),
            "training-id": entry.training_id,
            "calibration": entry.calibration,
            "periods": entry.periods,
        }
        if not self.marker.exists():
            atomic_write_bytes(self.marker, f"{self.market}: a DP ledger was kept in this state-dir\n".encode())
        atomic_write_bytes(self.path, json.dumps(saved, indent=1).encode())

    def unusable(self, problem: str) -> CorruptStateError:
        """The error that stops DP training when the ledger is missing or unreadable."""
        return CorruptStateError(
            f"{self.path}: the market's privacy ledger {problem}. Everything the market spent before is "
            "unknown, so it does not train under DP: restore the file from a backup, or start a new budget "
            f"period on purpose with `python -m clients.ledger new-period --state-dir {self.path.parent} "
            f"--market {self.market}`, which records that the earlier spending is no longer counted."
        )


class UsersStore:
    """``<state-dir>/<market>.fedals-users-<round>.pt``: a market's user factors of its last two rounds.

    Each file holds the training's id and a digest of the data the factors were solved on, so
    that a file of another training or of data the market has since changed is never used.
    """

    MAX_ROUND = 1_000_000  # a round number beyond any training's; no file is named after one

    def __init__(self, state_dir: str | Path, market: str) -> None:
        self.directory = Path(state_dir)
        self.prefix = f"{check_name(market)}.fedals-users-"

    def save(self, users: np.ndarray, server_round: int, training_id: str, data: str) -> None:
        """Keep ``users`` of ``server_round``; of the other files only the latest earlier round stays.

        Whatever rounds a server names, the market keeps at most two files; a round outside
        ``1 … MAX_ROUND`` is not written.
        """
        if not 1 <= server_round <= self.MAX_ROUND:
            return
        saved = {"training-id": training_id, "round": server_round, "data": data}
        atomic_torch_save(self._path(server_round), saved | {"users": torch.from_numpy(np.array(users))})
        files = self._files()
        earlier = max((kept for _, kept in files if kept < server_round), default=None)
        for path, kept in files:
            if kept not in (server_round, earlier):
                path.unlink(missing_ok=True)

    def load(self, before: int, training_id: str, data: str) -> tuple[np.ndarray | None, list[str]]:
        """The users of the latest round up to ``before`` of this training and data (or None),
        and why each file passed over could not be used (unreadable, or of other data)."""
        skipped: list[str] = []
        for path, kept in self._files():
            if kept > before:
                continue
            try:
                saved = torch.load(path, weights_only=True)
                users = saved["users"].numpy().astype(np.float64)
                same = str(saved["training-id"]) == training_id and int(saved["round"]) == kept
                same_data = str(saved["data"]) == data
            except (RuntimeError, OSError, EOFError, KeyError, TypeError, ValueError, AttributeError) as error:
                skipped.append(f"{path} is unreadable ({error})")
                continue
            if same and not same_data:
                skipped.append(f"{path} holds users of other data than the market's now")
            elif same:
                return users, skipped
        return None, skipped

    def _path(self, server_round: int) -> Path:
        return self.directory / f"{self.prefix}{server_round}.pt"

    def _files(self) -> list[tuple[Path, int]]:
        """The market's files with their rounds, latest first."""
        found = []
        for path in self.directory.glob(f"{glob.escape(self.prefix)}*.pt"):
            number = path.name[len(self.prefix) : -len(".pt")]
            if number.isdigit():
                found.append((path, int(number)))
        return sorted(found, key=lambda entry: -entry[1])


def _tensors(value: Any) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items()
    ):
        raise TypeError("expected a mapping of parameter names to tensors")
    return dict(value)
