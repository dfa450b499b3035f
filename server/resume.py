"""What a resumed training must share with the training it continues.

A checkpoint stores a fingerprint of every run setting that fixes what the
markets' privacy guarantees mean or what shape the shared arrays have.
Resuming with one of them changed would silently mix two trainings under one
training id, and so under one privacy ledger per market: refused, naming each
changed key with its old and new value.
"""

from collections.abc import Mapping
from typing import Any

from common.data.catalog import Catalog
from common.methods import METHODS

# Run-config keys a resume must not change. Privacy: the user-level DP-SGD
# settings every market calibrates its noise and ledger with (dp-*), and the
# market-level DP on the server (market-dp-*, on when the noise multiplier is
# not 0). Shapes and meaning of the shared arrays: the method (what is
# shared), user-embeddings, embedding-dim and history-length. The catalog is
# fingerprinted by content under CATALOG_KEY, wherever its file lies.
# init-from is not: a resume starts from the checkpoint and never reads it (the checkpoint's
# arrays already descend from where the training started), so changing or clearing it cannot
# change the resumed shared arrays, and what they must match is fingerprinted above.
FINGERPRINT_KEYS = (
    "method",
    "user-embeddings",
    "embedding-dim",
    "history-length",
    "dp-epsilon",
    "dp-market-epsilons",
    "dp-delta",
    "dp-max-grad-norm",
    "dp-batch-size",
    "dp-learning-rate",
    "dp-user-positives",
    "dp-popularity-share",
    "dp-accountant",
    "dp-global-weight",
    "market-dp-noise-multiplier",
    "market-dp-clipping-norm",
    "market-dp-markets",
    "market-dp-delta",
    "market-dp-max-epsilon",
)
# fedals' settings (shape and meaning of its item factors), fingerprinted when the method is fedals
# only: a checkpoint of another method, made before these keys existed, stays resumable.
ALS_FINGERPRINT_KEYS = ("als-factors", "als-regularization", "als-alpha", "als-nu", "als-confidence")
CATALOG_KEY = "catalog"  # the fingerprint's entry for the catalog's content
# A family's own keys a resume must not change, beyond FINGERPRINT_KEYS (common.methods' families).
# The SGD methods' aggregation rule: a resume may not switch it mid-training.
FAMILY_FINGERPRINT_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": ("aggregation", "aggregation-malicious"),
    "als": ALS_FINGERPRINT_KEYS,
}
# Keys fingerprinted since a later version, with the value a checkpoint made before them was trained with.
ADDED_LATER: dict[str, Any] = {"aggregation": "fedavg", "aggregation-malicious": 1.0}


def catalog_digest(catalog: Catalog) -> str:
    """The catalog's rows and a hash of its item ids in order: :meth:`Catalog.fingerprint`."""
    return catalog.fingerprint()


def run_fingerprint(run_config: Mapping[str, Any], catalog: Catalog) -> dict[str, Any]:
    """The values of :data:`FINGERPRINT_KEYS` in ``run_config`` (None when absent) and the catalog's digest;
    for fedals also those of :data:`ALS_FINGERPRINT_KEYS`."""
    method = METHODS.get(str(run_config.get("method")))
    keys = FINGERPRINT_KEYS + FAMILY_FINGERPRINT_KEYS.get(method.family if method is not None else "", ())
    fingerprint = {key: _normalised(run_config.get(key)) for key in keys}
    fingerprint[CATALOG_KEY] = catalog_digest(catalog)
    return fingerprint


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str) -> None:
    """Refuse to resume when a fingerprinted setting changed.

    Parameters
    ----------
    saved : Mapping[str, Any]
        The fingerprint stored in the checkpoint.
    current : Mapping[str, Any]
        :func:`run_fingerprint` of this run.
    checkpoint : str
        The checkpoint's path, for the message.

    Raises
    ------
    ValueError
        Naming every changed key with its value in the checkpoint and now.
    """
    saved = {**{key: value for key, value in ADDED_LATER.items() if key in current}, **saved}
    changed = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if changed:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the run config changes settings the training was made with "
            f"({'; '.join(changed)}). Resume with the checkpoint's values, or start a new training (resume=false)."
        )


def _normalised(value: Any) -> Any:
    # A TOML default 8.0 and an override "dp-epsilon=8" mean the same budget.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value.strip() if isinstance(value, str) else value
    return float(value)
