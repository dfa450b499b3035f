"""A simulated market's head when a training continues from an earlier one (the app config's ``init-from``).

``init-from`` names the ``published.pt`` an earlier training wrote, or the
directory holding it. In simulation that directory is ``OUT/models/<method>``,
beside each market's served model ``OUT/models/<method>/<market>/``
(:mod:`clients.served`). The ServerApp starts from the published shared arrays;
each simulated market restores its head from its served model there, so both
parts of the model continue where the earlier training left them:

* The head is what the market does not share under this run's method
  (:func:`common.model.shared_parameter_names`). The per-user table
  (``user-embeddings``) is carried over by user ID: a user the served model
  knew gets their row back, a user new in the grown file a new row. Any other
  array of another shape starts new, named in a WARNING.
* A market whose served model is missing, does not load against the run's
  catalog or serves another market starts with a new head, with a WARNING
  saying why.
* Under DP a market always starts with a new head: a served model may have
  been trained without DP (and fedper-ft serves a fork fine-tuned after the
  last round), and a head that seeds a training shapes what the market sends.
* The served model is the market's best validation round, which need not be
  the round the shared part was published after (the last one).

Deployed regions never read ``init-from``: a region takes no filesystem path
from the server: the server names the training it continues in every message,
and the region starts from the head it kept of that training in its own
``state-dir`` (:func:`clients.local_model._restore_saved_state`). There
``init-from`` is read by the ServerApp alone.
"""

from collections.abc import Sequence
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Context
from flwr.common import log

from common.data.catalog import Catalog
from common.data.split import MarketSplit
from common.neural.model import SplitRecommender
from common.serving.format import ServedModelError
from common.serving.published import published_path
from common.serving.query import load_served_model

USER_TABLE = "head.user_embedding.weight"  # the head's per-user rows (user-embeddings = true)


def _init_from_dir(context: Context) -> Path | None:
    """The directory of the published training a simulated market continues from, or None.

    None without ``init-from`` and for a deployed region (``market`` in its node config).
    """
    init_from = str(context.run_config.get("init-from", ""))
    if not init_from or "market" in context.node_config:
        return None
    return published_path(init_from).parent


def published_head(
    context: Context,
    model: SplitRecommender,
    split: MarketSplit,
    catalog: Catalog,
    shared: Sequence[str],
    private: bool,
) -> dict[str, torch.Tensor] | None:
    """The head a simulated market starts an ``init-from`` training with: its served model's where it fits.

    Parameters
    ----------
    context : Context
        The market's context: run config (``init-from``) and node config.
    model : SplitRecommender
        The market's model with a freshly seeded head.
    split : MarketSplit
        The market's data, with the user IDs the per-user table is matched by.
    catalog : Catalog
        The run's catalog; a served model over another one is not used.
    shared : Sequence[str]
        The arrays the method shares: everything else is the head.
    private : bool
        The market trains under DP: it starts with a new head.

    Returns
    -------
    dict[str, torch.Tensor] or None
        Every head array, restored or freshly seeded; None when there is
        nothing to restore (no ``init-from``, a deployed region, or a method
        that leaves the market no head).
    """
    directory = _init_from_dir(context)
    head = {name: value.detach().clone() for name, value in model.state_dict().items() if name not in shared}
    if directory is None or not head:
        return None
    market = split.market
    served_dir = directory / market
    if private:
        log(
            WARNING,
            "Market %s trains under DP: it starts with a new head, not the one in %s (init-from), "
            "which need not have been trained under DP.",
            market,
            served_dir,
        )
        return head
    try:
        served = load_served_model(served_dir, catalog)
    except ServedModelError as error:
        log(WARNING, "Market %s starts with a new head: %s", market, error)
        return head
    if served.market != market:
        log(
            WARNING,
            "Market %s starts with a new head: %s is the served model of market %s.",
            market,
            served_dir,
            served.market,
        )
        return head
    saved = served.model.state_dict()
    restored, skipped = [], []
    for name, fresh in head.items():
        old = saved.get(name)
        if old is None or old.dtype != fresh.dtype or old.shape[1:] != fresh.shape[1:]:
            skipped.append(f"{name} {tuple(old.shape) if old is not None else 'missing'} vs {tuple(fresh.shape)}")
        elif name == USER_TABLE:
            rows = _saved_rows(served.user_ids, split.user_ids)
            if rows is None:
                skipped.append(f"{name} (this market's user IDs are unknown)")
                continue
            known = rows >= 0
            fresh[torch.as_tensor(known)] = old[torch.as_tensor(rows[known])]
            restored.append(f"{name} ({int(known.sum())} of {len(rows)} users)")
        elif old.shape == fresh.shape:
            head[name] = old.detach().clone()
            restored.append(name)
        else:
            skipped.append(f"{name} {tuple(old.shape)} vs {tuple(fresh.shape)}")
    log(
        INFO,
        "Market %s continues with the head of its served model %s (%s, round %s): %s",
        market,
        served_dir,
        served.manifest.get("method"),
        served.manifest.get("round"),
        ", ".join(restored) or "nothing fits",
    )
    if skipped:
        log(
            WARNING,
            "Market %s: arrays of the served model in %s that do not fit this model start new: %s",
            market,
            served_dir,
            ", ".join(skipped),
        )
    return head


def _saved_rows(saved_users: Sequence[str], users: Sequence[str]) -> np.ndarray | None:
    """For each of ``users``, its row among ``saved_users`` (-1 for a new user); None without user IDs."""
    if not users:
        return None
    return pd.Index(list(saved_users)).get_indexer(list(users))
