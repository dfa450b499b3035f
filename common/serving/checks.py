"""What a served model's files must satisfy before anything of the sizes they declare is allocated.

A model directory may come from anywhere (copied between machines, handed to a region): its
manifest and files are checked against each other and against the catalog before a model of
the manifest's sizes is built, and its tensors are read memory-mapped (:mod:`common.serving.query`),
so a small file can make the loader allocate no more than what it holds and what its catalog
and market justify.
"""

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.neural.model import ModelConfig
from common.serving.format import ServedModelError

MARKET_ENTRIES = {"user_ids", "history_offsets", "history_items", "test_held_out", "assortment"}
MAX_DIM = 65_536  # an embedding wider than any model this package trains: a manifest claiming more is not one
MAX_HISTORY = 1_000_000  # likewise for the history length
# What reading a damaged or foreign file raises: a torch.load of a damaged pickle fails in many ways (a fuzz of
# the files, tests/common/serving/test_checks.py, found IndexError and UnpicklingError besides the usual ones).
LOAD_ERRORS = (OSError, KeyError, TypeError, ValueError, RuntimeError, EOFError, IndexError, pickle.UnpicklingError)


def read_mapped(path: Path, entries: set[str] | None = None) -> dict[str, Any]:
    """A dict ``torch.save`` wrote, memory-mapped: a tensor is the bytes the file holds, never a size it only declares.

    Raises
    ------
    ValueError
        If the file does not hold a dict (of exactly ``entries``, when given).
    """
    saved = torch.load(path, weights_only=True, mmap=True)
    if not isinstance(saved, dict) or (entries is not None and set(saved) != entries):
        raise ValueError(f"{path.name} does not hold {sorted(entries) if entries else 'a dict'}")
    return saved


def model_config(values: Any, catalog_rows: int, users: int) -> ModelConfig:
    """The manifest's model config, checked before a model of its sizes is allocated.

    Raises
    ------
    ValueError
        If it is not the fields of :class:`ModelConfig` with sizes that fit the catalog
        (``catalog_rows`` item rows), the market's ``users`` and the package's bounds.
    """
    fields = {"num_items", "num_users", "dim", "history_length", "user_embeddings"}
    if not isinstance(values, dict) or set(values) != fields:
        raise ValueError(f"the manifest's model_config is not {sorted(fields)}")
    sizes = {key: values[key] for key in fields - {"user_embeddings"}}
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in sizes.values()):
        raise ValueError(f"the manifest's model sizes {sizes} are not all integers")
    if not isinstance(values["user_embeddings"], bool):
        raise ValueError("the manifest's user_embeddings is not true or false")
    if sizes["num_items"] != catalog_rows or sizes["num_users"] != users:
        raise ValueError(
            f"the manifest's model has {sizes['num_items']} item rows and {sizes['num_users']} users, its catalog "
            f"{catalog_rows} rows and its market {users} users"
        )
    if not (1 <= sizes["dim"] <= MAX_DIM and 1 <= sizes["history_length"] <= MAX_HISTORY):
        raise ValueError(
            f"the manifest's dim {sizes['dim']} or history_length {sizes['history_length']} is out of range"
        )
    return ModelConfig(**values)


def check_market_data(
    directory: Path,
    user_ids: Any,
    history_offsets: Any,
    history_items: Any,
    test_held_out: Any,
    assortment: Any,
) -> None:
    """Refuse market data of the wrong types, or history offsets that are not 0 and then ascending.

    Raises
    ------
    ServedModelError
        Naming ``directory`` and what is wrong.
    """
    for name, array in (
        ("history offsets", history_offsets),
        ("history items", history_items),
        ("held-out test items", test_held_out),
    ):
        if not torch.is_tensor(array) or array.dim() != 1 or array.dtype.is_floating_point or array.is_complex():
            raise ServedModelError(f"The served model {directory} has {name} that are not a 1-d integer tensor.")
    if not isinstance(user_ids, list) or not isinstance(assortment, list):
        raise ServedModelError(f"The served model {directory} has user IDs or an assortment that is not a list.")
    offsets = history_offsets.numpy()
    if len(offsets) == 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise ServedModelError(f"The served model {directory} has history offsets that are not 0, then ascending.")
