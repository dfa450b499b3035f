"""A market's split kept on disk and memory-mapped: one copy for every process of a simulation.

Flower's simulation engine hands each market to whichever Ray worker is free, so a split cached
in process memory ends up in every worker: at a million users a market's split is about 2 GB
(its evaluation candidates alone are 1.6 GB) and reading its file takes minutes and 7 GiB.
Here the split is made once, written as one ``.npy`` file per array, and read back with
``numpy.load(mmap_mode="c")``: the pages are the file's, shared by the processes that map it and
counted once in their proportional memory, and the operating system can drop them under
pressure. Copy-on-write rather than read-only, so that torch takes the arrays as they are
and a caller that writes to one changes its own copy of a page, never the file. numpy's own
format is used because a memory-mapped array is what numpy offers and the readers are numpy;
the few lines here are the directory layout, the key and the lock.

The store is used only where the node's environment names a directory
(:data:`SPLIT_STORE_ENV`, which the simulation harness sets to a directory of its own for the
run): never from the run config, so that whoever submits a run cannot make a region write or
read files.
"""

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.data.split import EvalSet, MarketSplit

SPLIT_STORE_ENV = "XMFL_SPLIT_STORE"  # a directory of the node's own; unset: splits stay in process memory
FORMAT = 1  # the layout below; a stored split of another format is made again
_ARRAYS = (
    "train_users",
    "train_items",
    "market_items",
    "valid_users",
    "valid_candidates",
    "test_users",
    "test_candidates",
)


def split_store() -> Path | None:
    """The directory the node's environment names for stored splits, or None."""
    value = os.environ.get(SPLIT_STORE_ENV, "")
    return Path(value) if value else None


def split_key(*parts: object) -> str:
    """A file name for the split made from ``parts`` (the source file's identity, market, seed, catalog)."""
    digest = hashlib.sha256(json.dumps([FORMAT, *map(str, parts)]).encode("utf-8"))
    return digest.hexdigest()[:32]


def stored_split(directory: Path, key: str, make: Callable[[], MarketSplit]) -> MarketSplit:
    """The split stored under ``key`` in ``directory``, made with ``make`` and stored first if absent.

    Processes asking for the same split at once wait on one lock, so a large market is read
    and split once; what is stored is written under a temporary name and renamed, so a process
    stopped while writing leaves nothing that is read back.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / key
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "split.json").is_file():
            _write(make(), directory, target)
    return _read(target)


def _write(split: MarketSplit, directory: Path, target: Path) -> None:
    partial = directory / f"{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    arrays = {
        "train_users": split.train_users,
        "train_items": split.train_items,
        "market_items": split.market_items,
        "valid_users": split.valid.users,
        "valid_candidates": split.valid.candidates,
        "test_users": split.test.users,
        "test_candidates": split.test.candidates,
        "user_ids": np.asarray(split.user_ids, dtype=str),
    }
    try:
        for name, array in arrays.items():
            np.save(partial / f"{name}.npy", np.ascontiguousarray(array))
        # Written last: a directory without it is not a stored split.
        (partial / "split.json").write_text(json.dumps({"market": split.market, "num-users": split.num_users}))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a full disk leaves nothing half-written behind
        raise


def _read(target: Path) -> MarketSplit:
    meta = json.loads((target / "split.json").read_text())
    arrays = {name: np.load(target / f"{name}.npy", mmap_mode="c") for name in (*_ARRAYS, "user_ids")}
    return MarketSplit(
        market=str(meta["market"]),
        num_users=int(meta["num-users"]),
        train_users=arrays["train_users"],
        train_items=arrays["train_items"],
        market_items=arrays["market_items"],
        valid=EvalSet(users=arrays["valid_users"], candidates=arrays["valid_candidates"]),
        test=EvalSet(users=arrays["test_users"], candidates=arrays["test_candidates"]),
        user_ids=arrays["user_ids"],
    )
