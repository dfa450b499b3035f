"""What a federated run keeps on disk: per-market metrics per round, a checkpoint to resume from and,
when the training ends, its published shared part (:mod:`common.serving.published`) for markets that join later
and trainings that continue.

Both files are replaced through :mod:`common.runtime.durable`: a uniquely named 0600
temporary file, flushed to disk and renamed over the old one, so a crash
leaves the previous round's file or the new one. Loading checks their
structure and names the file and what is wrong instead of failing on a
missing key deep inside the resume.
"""

import json
import math
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.common import log

from common.protocol import MARKET_KEY, MARKET_NAME_KEY, TEST_HR_KEY, TEST_NDCG_KEY, VAL_HR_KEY, VAL_NDCG_KEY
from common.runtime.durable import atomic_torch_save, atomic_write_bytes
from common.selection import best_by
from common.serving.published import PUBLISHED_FILE, PUBLISHED_FORMAT, PUBLISHED_KEYS, PUBLISHED_VERSION

HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoint:
    """The state after a completed round: enough to continue the training from it."""

    server_round: int  # the last completed round
    training_id: str  # names the training across server restarts; markets key their ledgers on it
    arrays: dict[str, torch.Tensor]  # the aggregated shared parameters after that round
    strategy_state: dict[str, Any] = field(default_factory=dict)  # e.g. the market-level DP accountant
    fingerprint: dict[str, Any] = field(default_factory=dict)  # settings a resume must not change (server.resume)
    markets: dict[int, str] = field(default_factory=dict)  # node id -> the market it speaks for
    continues: str = ""  # the training whose published part this one started from (init-from), or ""


# Key in checkpoint.pt -> (the Checkpoint field, the type it must have, what it is)
_CHECKPOINT_ENTRIES = {
    "round": ("server_round", int, "the last completed round"),
    "training-id": ("training_id", str, "the training's id"),
    "arrays": ("arrays", dict, "the shared arrays"),
    "strategy-state": ("strategy_state", dict, "the strategy's state"),
    "fingerprint": ("fingerprint", dict, "the settings fingerprint"),
    "markets": ("markets", dict, "the node-to-market binding"),
}


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
        A non-finite value is left out, with a WARNING naming the node and
        market: JSON has no NaN, and a reader would take it for a number.
        """
        entry = self.rounds.setdefault(server_round, {"round": server_round, "per_market": {}})
        for reply in replies:
            market = market_of(reply)
            if market is None:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            slot = entry["per_market"].setdefault(market, {})
            non_finite = []
            for key, value in metrics.items():
                if not key.startswith(strip):
                    continue
                if not _finite(value):
                    non_finite.append(f"{key!r}={value}")
                    continue
                slot[prefix + key.removeprefix(strip)] = value
            if non_finite:
                log(
                    WARNING,
                    "round %d: node %d (market %s) sent non-finite metrics, left out of the history: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    market,
                    ", ".join(non_finite),
                )

    def note(self, server_round: int, market: str, **values: Any) -> None:
        """Values the server measured itself about ``market`` in ``server_round`` (its traffic, say)."""
        entry = self.rounds.setdefault(server_round, {"round": server_round, "per_market": {}})
        entry["per_market"].setdefault(market, {}).update(values)

    def annotate(self, server_round: int, **values: Any) -> None:
        """Round-level values: ``seconds`` (from sending the round to having aggregated it) and the like."""
        self.rounds.setdefault(server_round, {"round": server_round, "per_market": {}}).update(values)

    def note_failed(self, server_round: int, names: Iterable[str]) -> None:
        """Add ``names`` (markets, or ``node N`` for a node that never named its market) to the round's
        ``failed`` list: asked, but no usable reply came (an error, a refused reply or none in time)."""
        names = set(names)
        if names:
            entry = self.rounds.setdefault(server_round, {"round": server_round, "per_market": {}})
            entry["failed"] = sorted(names | set(entry.get("failed", [])))

    def log_round(self, server_round: int) -> None:
        """One line per market with the round's evaluation."""
        for market, metrics in sorted(self.rounds.get(server_round, {}).get("per_market", {}).items()):
            if not {VAL_NDCG_KEY, VAL_HR_KEY, TEST_NDCG_KEY, TEST_HR_KEY} <= set(metrics):
                continue
            log(
                INFO,
                "round %d market %s: val NDCG@10 %.4f HR@10 %.4f | test NDCG@10 %.4f HR@10 %.4f",
                server_round,
                market,
                metrics[VAL_NDCG_KEY],
                metrics[VAL_HR_KEY],
                metrics[TEST_NDCG_KEY],
                metrics[TEST_HR_KEY],
            )

    def write(self) -> None:
        """Rewrite ``history.json`` atomically and durably: a reader never sees half a file."""
        history = {"config": self.run_config, "rounds": [self.rounds[r] for r in sorted(self.rounds)]}
        atomic_write_bytes(self.out_dir / HISTORY_FILE, json.dumps(history, indent=1).encode())

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Save a completed round as ``checkpoint.pt``, atomically and durably."""
        atomic_torch_save(
            self.out_dir / CHECKPOINT_FILE,
            {
                "round": checkpoint.server_round,
                "training-id": checkpoint.training_id,
                "arrays": dict(checkpoint.arrays),
                "strategy-state": dict(checkpoint.strategy_state),
                "fingerprint": dict(checkpoint.fingerprint),
                "markets": {int(node): str(market) for node, market in checkpoint.markets.items()},
                "continues": checkpoint.continues,
            },
        )

    def publish(self, arrays: ArrayRecord, about: Mapping[str, Any], copies: Iterable[Path] = ()) -> list[Path]:
        """Write the training's final shared arrays as ``published.pt``, for a market that joins later.

        Parameters
        ----------
        arrays : ArrayRecord
            The aggregated shared arrays after the last round.
        about : Mapping[str, Any]
            What a joining market checks them against: every key of
            :data:`PUBLISHED_KEYS` (method, embedding-dim, history-length,
            user-embeddings, catalog-fingerprint, training-id, round).
        copies : Iterable[Path]
            Further files to write the same content to (simulation:
            ``<models-dir>/<method>/published.pt``, beside the markets' models).

        Returns
        -------
        list[Path]
            ``<out_dir>/published.pt`` and the copies, each written atomically and durably.
        """
        missing = [key for key in PUBLISHED_KEYS if key not in about]
        if missing:
            raise ValueError(f"The published shared part needs {list(PUBLISHED_KEYS)}; {missing} were not given.")
        published = {
            "format": PUBLISHED_FORMAT,
            "format-version": PUBLISHED_VERSION,
            **{key: about[key] for key in PUBLISHED_KEYS},
            "arrays": arrays.to_torch_state_dict(),
        }
        paths = [self.out_dir / PUBLISHED_FILE, *map(Path, copies)]
        for path in paths:
            atomic_torch_save(path, published)
        log(
            INFO,
            "Published the shared arrays of training %s after round %d to %s",
            about["training-id"],
            about["round"],
            ", ".join(map(str, paths)),
        )
        return paths

    def load_checkpoint(self) -> Checkpoint | None:
        """The last completed round saved in ``out_dir`` with its history, or None if there is none.

        Raises
        ------
        ValueError
            If ``checkpoint.pt`` or ``history.json`` cannot be read or is not
            shaped as this version writes it, naming the file and the problem.
        """
        path = self.out_dir / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            saved = torch.load(path, weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path}: not a checkpoint this version can resume from ({error}).") from error
        checkpoint = _checkpoint_from(saved, path)
        history_path = self.out_dir / HISTORY_FILE
        if history_path.exists():
            # Rounds after the checkpoint were never completed: drop them so
            # that the resumed run writes them afresh.
            saved_rounds = _rounds_from(history_path)
            self.rounds = {r["round"]: r for r in saved_rounds if r["round"] <= checkpoint.server_round}
        log(INFO, "Resuming training %s after round %d from %s", checkpoint.training_id, checkpoint.server_round, path)
        return checkpoint


def check_new_training(out_dir: Path) -> None:
    """Refuse to start a new training in an ``out_dir`` holding an earlier training's files.

    A new training (``resume=false``) would overwrite them; ``resume=true``
    continues the training they belong to, in the same folder.

    Raises
    ------
    ValueError
        In one line naming the folder, the files it holds and the two ways out.
    """
    found = [name for name in (HISTORY_FILE, CHECKPOINT_FILE, PUBLISHED_FILE) if (Path(out_dir) / name).exists()]
    if found:
        raise ValueError(
            f"out-dir {out_dir} already holds a training's {', '.join(found)}, which a new training would overwrite: "
            "give this training a new out-dir, or set resume=true to continue that training."
        )


def summary_lines(
    history: RunHistory, num_rounds: int, markets: Iterable[str] = (), serves_a_round: bool = True
) -> list[str]:
    """What a finished training did, for its last lines in the log.

    Parameters
    ----------
    history : RunHistory
        The training's history, with the rounds of earlier runs when it was resumed.
    num_rounds : int
        The training's last round.
    markets : Iterable[str]
        Markets known to take part (the node-to-market binding); those in the history count too.
    serves_a_round : bool, default True
        Whether a market serves one of the training's rounds (not so for fedper-ft and
        fedals-pt, which serve a fit made after the last round): then the summary names it.

    Returns
    -------
    list[str]
        Rounds completed; per round the markets that replied, those asked that failed or
        stayed silent, and those absent (not connected when it started), rounds alike
        grouped; the best round by macro validation NDCG@10 over the markets evaluated in
        it, with its macro test NDCG@10; where history.json, checkpoint.pt and published.pt are.
    """
    rounds = {r: entry for r, entry in history.rounds.items() if r >= 1}
    known = set(markets) | {market for entry in rounds.values() for market in entry["per_market"]}
    lines = [f"Training summary: {len(rounds)} of {num_rounds} rounds completed, {len(known)} markets known"]
    groups: list[tuple[list[int], str]] = []
    for r in sorted(rounds):
        replied = sorted(m for m, metrics in rounds[r]["per_market"].items() if "upload-bytes" in metrics)
        failed = rounds[r].get("failed", [])
        absent = sorted(known - set(replied) - set(failed))  # not connected when the round started
        if not failed and not absent:
            outcome = f"all {len(known)} markets replied"
        else:
            outcome = "; ".join(
                f"{what}: {', '.join(names)}"
                for what, names in (("replied", replied or ["none"]), ("failed or silent", failed), ("absent", absent))
                if names
            )
        if groups and groups[-1][1] == outcome and groups[-1][0][-1] == r - 1:
            groups[-1][0].append(r)
        else:
            groups.append(([r], outcome))
    for numbers, outcome in groups:
        span = f"round {numbers[0]}" if len(numbers) == 1 else f"rounds {numbers[0]}-{numbers[-1]}"
        lines.append(f"  {span}: {outcome}")
    macro = macro_by_round(history)
    if macro:
        best = best_by(sorted(macro), lambda r: macro[r][0])
        val, test, count = macro[best]
        lines.append(
            f"  best round by macro validation NDCG@10: {best} (validation {val:.4f}, "
            f"test {test:.4f}, over the {count} markets evaluated)"
        )
    served = served_rounds(history) if serves_a_round else {}
    if served:
        lines.append(
            "  round each market serves (its best by its own validation NDCG@10): "
            + ", ".join(f"{market} {served[market]}" for market in sorted(served))
        )
    files = [history.out_dir / name for name in (HISTORY_FILE, CHECKPOINT_FILE, PUBLISHED_FILE)]
    lines.append(f"  files: {', '.join(str(path) for path in files if path.exists()) or 'none'}")
    return lines


def macro_by_round(history: RunHistory) -> dict[int, tuple[float, float, int]]:
    """Per trained round, the mean validation and test NDCG@10 over the markets that reported both, and their count."""
    macro = {}
    for r, entry in history.rounds.items():
        evaluated = [
            metrics for metrics in entry["per_market"].values() if {VAL_NDCG_KEY, TEST_NDCG_KEY} <= set(metrics)
        ]
        if r >= 1 and evaluated:
            macro[r] = (
                sum(m[VAL_NDCG_KEY] for m in evaluated) / len(evaluated),
                sum(m[TEST_NDCG_KEY] for m in evaluated) / len(evaluated),
                len(evaluated),
            )
    return macro


def best_macro_round(history: RunHistory) -> int | None:
    """The trained round with the best macro validation NDCG@10 (the first of equals), None before any."""
    macro = macro_by_round(history)
    return best_by(sorted(macro), lambda r: macro[r][0]) if macro else None


def served_rounds(history: RunHistory) -> dict[str, int]:
    """Per market, the trained round it serves: the first with its highest reported validation NDCG@10.

    The rule each market applies to its own validation (:mod:`common.selection`); under DP a
    market reports noisy metrics while it keeps its served round by the exact ones, so there
    the two may differ.
    """
    scores: dict[str, dict[int, float]] = {}
    for r, entry in sorted(history.rounds.items()):
        if r < 1:
            continue
        for market, metrics in entry["per_market"].items():
            if VAL_NDCG_KEY in metrics:
                scores.setdefault(market, {})[r] = metrics[VAL_NDCG_KEY]
    return {market: best_by(rounds, lambda r, rounds=rounds: rounds[r]) for market, rounds in scores.items()}


def market_of(reply: Message) -> str | None:
    """The market a reply names, or None for an error or a reply without one."""
    if reply.has_error() or MARKET_KEY not in reply.content.config_records:
        return None
    return str(reply.content.config_records[MARKET_KEY][MARKET_NAME_KEY])


def _finite(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(not isinstance(v, float) or math.isfinite(v) for v in values)


def _checkpoint_from(saved: Any, path: Path) -> Checkpoint:
    """``saved`` (what ``torch.load`` returned) as a Checkpoint, or a ValueError naming ``path``."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a checkpoint: it holds a {type(saved).__name__}, not a dict.")
    missing = [key for key in _CHECKPOINT_ENTRIES if key not in saved]
    if missing:
        raise ValueError(
            f"{path}: not a checkpoint this version can resume from: it lacks {missing} "
            "(written by an older version, or not by this server); start a new training with resume=false."
        )
    values = {}
    for key, (name, kind, what) in _CHECKPOINT_ENTRIES.items():
        value = saved[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{path}: '{key}' ({what}) is a {type(value).__name__}, not a {kind.__name__}.")
        values[name] = value
    if values["server_round"] < 0 or not values["training_id"]:
        raise ValueError(
            f"{path}: round {values['server_round']} and training id {values['training_id']!r} "
            "are not a completed round of a named training."
        )
    bad = [name for name, array in values["arrays"].items() if not isinstance(name, str) or not torch.is_tensor(array)]
    if not values["arrays"] or bad:
        raise ValueError(f"{path}: 'arrays' must map array names to tensors; wrong entries: {bad or 'none at all'}.")
    markets = values["markets"]
    if not all(isinstance(n, int) and isinstance(m, str) for n, m in markets.items()) or len(
        set(markets.values())
    ) != len(markets):
        raise ValueError(f"{path}: 'markets' must map node ids to distinct market names, got {markets!r}.")
    if not all(isinstance(key, str) for key in values["fingerprint"]):
        raise ValueError(f"{path}: 'fingerprint' must map setting names to values.")
    continues = saved.get("continues", "")  # absent in checkpoints of earlier versions: a training from scratch
    if not isinstance(continues, str):
        raise ValueError(
            f"{path}: 'continues' (the training it started from) is a {type(continues).__name__}, not a str."
        )
    return Checkpoint(**values, continues=continues)


def _rounds_from(path: Path) -> list[dict[str, Any]]:
    """The rounds of ``history.json``, or a ValueError naming ``path`` and what is wrong."""
    try:
        history = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            "was it cut short or edited? Restore it, or delete it to resume without the earlier rounds' metrics."
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error}).") from error
    rounds = history.get("rounds") if isinstance(history, dict) else None
    if not isinstance(rounds, list):
        raise ValueError(f"{path}: not a run history: no list of 'rounds' at the top level.")
    for index, entry in enumerate(rounds):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("round"), int)
            or isinstance(entry.get("round"), bool)
            or not isinstance(entry.get("per_market"), dict)
        ):
            raise ValueError(
                f"{path}: rounds[{index}] is not a round entry "
                "(an object with an integer 'round' and a 'per_market' object)."
            )
    return rounds
