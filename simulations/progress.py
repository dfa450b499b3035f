"""What a user watching a simulation sees: a bar with ETA, one line per round, every warning.

A federated run's log lines (streamed by :class:`simulations.flower_runtime.SimulationSuperLink`)
become one summary line per evaluated round: the macro validation and test
NDCG@10 of the markets that replied, the markets that did not (they failed, or
did not answer in time), and the seconds since the run began. Per-market lines
show with ``--verbose`` only; every WARNING and ERROR line of Flower, the
ServerApp or a market is always shown (a line repeated at once, once). The bars (tqdm) go to stderr and show
only on a terminal; lines go to stdout, flushed, so that a log file gets them
as they happen.
"""

import re
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Flower's log format, "LEVEL :   message", possibly after a timestamp.
LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(.*)$")
ROUND_START = re.compile(r"\[ROUND (\d+)/(\d+)\]")
MARKET_EVALUATION = re.compile(
    r"round (\d+) market (\S+): val NDCG@10 ([0-9.]+) HR@10 [0-9.]+ \| test NDCG@10 ([0-9.]+)"
)
SHOWN_LEVELS = ("WARNING", "ERROR", "CRITICAL")
# Flower's warnings that are not the user's concern: the harness sets the federation's size
# itself (the first), and stops the simulation's actors at the end of every run (the second).
NOT_SHOWN = ("default simulated SuperNodes changed", "Manually terminating ClientAppActor")


def say(message: str) -> None:
    """A line on stdout, flushed, without breaking a progress bar on the terminal."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def bar(total: int, description: str, unit: str) -> tqdm:
    """A progress bar with ETA on stderr; off when stderr is not a terminal."""
    return tqdm(
        total=total, desc=description, unit=unit, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True
    )


def over(items: Iterable[Item], total: int, description: str, unit: str) -> Iterator[Item]:
    """``items``, one step of a :func:`bar` each."""
    with bar(total, description, unit) as progress:
        for item in items:
            yield item
            progress.update(1)


def split_level(line: str) -> tuple[str, str]:
    """``(level, message)`` of a log line without colours; level ``""`` for a line without one."""
    text = ANSI.sub("", line).strip()
    found = LEVEL.search(text)
    return (found.group(1), found.group(2).strip()) if found else ("", text)


class RoundProgress:
    """Turns one federated run's log lines into a bar over its rounds and a line per round.

    Parameters
    ----------
    method : str
        The federated method, for the bar's label.
    rounds : int
        Rounds of the run.
    markets : list[str]
        Markets asked to take part: a summary line names those that did not reply.
    verbose : bool
        Also pass on each market's line and the app's per-round lines.

    Use it as ``on_line``, inside ``with``: leaving the block prints what is pending
    and closes the bar.
    """

    def __init__(self, method: str, rounds: int, markets: list[str], verbose: bool = False) -> None:
        self.rounds = rounds
        self.markets = list(markets)
        self.verbose = verbose
        self.last_shown = ""
        self.bar = bar(rounds, method, "round")
        self.began = time.monotonic()
        self.pending: dict[int, dict[str, tuple[float, float]]] = {}  # round -> market -> (val, test) NDCG@10

    def __enter__(self) -> "RoundProgress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __call__(self, line: str) -> None:
        """Take one log line of the run."""
        level, message = split_level(line)
        if (evaluation := MARKET_EVALUATION.search(message)) is not None:
            server_round, market = int(evaluation.group(1)), evaluation.group(2)
            self.pending.setdefault(server_round, {})[market] = (float(evaluation.group(3)), float(evaluation.group(4)))
            if self.verbose:
                say("    " + message)
            return
        self.flush()  # a round's market lines come together: any other line ends them
        if level in SHOWN_LEVELS and not any(text in message for text in NOT_SHOWN):
            shown = f"    {level}: {message}"
            if shown != self.last_shown:  # Ray logs a market's error twice
                say(shown)
            self.last_shown = shown
        elif self.verbose and (ROUND_START.search(message) or " market " in message or message.startswith("round ")):
            say("    " + message)

    def flush(self) -> None:
        """One summary line per round whose market lines have come."""
        for server_round in sorted(self.pending):
            evaluated = self.pending.pop(server_round)
            valid = statistics.fmean(scores[0] for scores in evaluated.values())
            test = statistics.fmean(scores[1] for scores in evaluated.values())
            silent = [market for market in self.markets if market not in evaluated]
            missing = f"; failed or silent: {', '.join(silent)}" if silent else ""
            say(
                f"    round {server_round}/{self.rounds}: macro val NDCG@10 {valid:.4f}, test NDCG@10 {test:.4f} "
                f"({len(evaluated)} of {len(self.markets)} markets replied{missing}), "
                f"{time.monotonic() - self.began:.0f} s in"
            )
            if server_round > self.bar.n:
                self.bar.update(server_round - self.bar.n)

    def close(self) -> None:
        """Print what is pending and close the bar."""
        self.flush()
        self.bar.close()
