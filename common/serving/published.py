"""The shared part a training publishes when it ends: the ``published.pt`` format, read and checked.

The ServerApp (:mod:`server.history`) writes it in its out-dir, and in
simulation also as ``OUT/models/<method>/published.pt`` beside the markets'
served models. A market that joins late fits its head on it
(:mod:`clients.join`); a new training may start from it (the app config's
``init-from``). It lives here, below both apps, because the server writes it
and the clients read it, and neither may import the other.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.data.catalog import Catalog
from common.methods import get_method

PUBLISHED_FILE = "published.pt"
PUBLISHED_FORMAT = "xmarket-fl published shared part"
PUBLISHED_VERSION = 1
# What a reader checks the published arrays against, beside them in published.pt.
PUBLISHED_KEYS = (
    "method",
    "embedding-dim",
    "history-length",
    "user-embeddings",
    "catalog-fingerprint",
    "training-id",
    "round",
)


@dataclass(frozen=True)
class Published:
    """The shared part a training published, and what it must match."""

    path: Path
    method: str
    embedding_dim: int
    history_length: int
    user_embeddings: bool
    catalog_fingerprint: str
    training_id: str
    round: int
    arrays: dict[str, torch.Tensor]


# Key in published.pt -> (the Published field, the type it must have)
_PUBLISHED_ENTRIES = {
    "method": ("method", str),
    "embedding-dim": ("embedding_dim", int),
    "history-length": ("history_length", int),
    "user-embeddings": ("user_embeddings", bool),
    "catalog-fingerprint": ("catalog_fingerprint", str),
    "training-id": ("training_id", str),
    "round": ("round", int),
    "arrays": ("arrays", dict),
}


def published_path(path: str | Path) -> Path:
    """The ``published.pt`` that ``path`` names: the file itself, or the one in the directory ``path``."""
    path = Path(path)
    return path / PUBLISHED_FILE if path.is_dir() else path


def load_published(path: str | Path) -> Published:
    """Read a ``published.pt`` the ServerApp wrote at the end of a training.

    Raises
    ------
    ValueError
        If the file cannot be read or is not a published shared part of this
        format version, naming the file and what is wrong.
    """
    path = Path(path)
    try:
        saved = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist: a training publishes {PUBLISHED_FILE} in its out-dir "
            "(and in simulation in OUT/models/<method>/) when it ends."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is not a published shared part this version can read ({error}).") from error
    if not isinstance(saved, dict) or saved.get("format") != PUBLISHED_FORMAT:
        raise ValueError(f"{path} is not a published shared part (written by the ServerApp at the end of a training).")
    if saved.get("format-version") != PUBLISHED_VERSION:
        raise ValueError(
            f"{path} has format version {saved.get('format-version')!r}; this version reads {PUBLISHED_VERSION} only."
        )
    values: dict[str, Any] = {}
    for key, (name, kind) in _PUBLISHED_ENTRIES.items():
        value = saved.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(
                f"{path}: '{key}' is {type(value).__name__ if key in saved else 'missing'}, not a {kind.__name__}."
            )
        values[name] = value
    arrays = values["arrays"]
    if not arrays or not all(isinstance(n, str) and torch.is_tensor(a) for n, a in arrays.items()):
        raise ValueError(f"{path}: 'arrays' must map array names to tensors.")
    non_finite = sorted(name for name, array in arrays.items() if not torch.isfinite(array).all())
    if non_finite:
        raise ValueError(f"{path}: the published arrays {non_finite} hold NaN or infinite values.")
    get_method(values["method"])
    return Published(path=path, **values)


def check_catalog(published: Published, catalog: Catalog, catalog_path: str | Path) -> None:
    """Refuse a catalog other than the one the published arrays were trained over."""
    if catalog.fingerprint() != published.catalog_fingerprint:
        raise ValueError(
            f"{catalog_path} is not the catalog training {published.training_id} was trained with: its fingerprint "
            f"is '{catalog.fingerprint()}', {published.path} needs '{published.catalog_fingerprint}'. "
            "Join with the company catalog the federation uses."
        )
