"""The model a market serves after a training: its best validation round, written where the region keeps it.

Every evaluation (folded into the next training message, or separate) the
market compares the model it just evaluated with the best so far, by the
rule the results use (:func:`simulations.results.select_on_validation`:
rounds from 1, the first highest validation NDCG@10), and keeps the better
one in ``context.state``. When the server sends the last round's evaluation,
the market writes that model as a served-model directory
(:func:`common.serving.write_served_model`):

* a deployed region into ``<state-dir>/model`` (never a path from the server);
* in simulation into the run config's ``models-dir``, ``<models-dir>/<method>/<market>``;
  fedper-ft also writes its best federated round as its base method's model
  (``<models-dir>/fedper/<market>``), since one run yields both.

A deployed region also keeps the best round so far in
``<state-dir>/<market>.best.pt``, replaced whenever a round beats it: a
SuperNode restarted in the middle of a training still serves the best round of
the whole training, not the best since the restart.

Nothing of it is sent: the served model stays in the region.
"""

import pickle
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log

from common.catalog import Catalog
from common.durable import atomic_torch_save
from common.methods import Method
from common.model import SplitRecommender, set_arrays
from common.serving import write_served_model
from common.train import MarketTensors

from clients.privacy_state import state_dir

BEST_MODEL_KEY = "best-model"  # the whole model (shared part and head) at the best validation round so far
BEST_INFO_KEY = "best-model-info"  # that round, its metrics and the privacy spent then
BEST_FILE_SUFFIX = ".best.pt"  # <state-dir>/<market>.best.pt: the two above, kept across a SuperNode restart
FINAL_KEY = "final-round"  # evaluate config: the last evaluation of the training
KEPT_METRICS = (  # the evaluation metrics a served model's manifest carries
    "val-ndcg", "val-hr", "val-full-ndcg", "val-full-recall", "test-ndcg", "test-hr", "test-full-ndcg", "test-full-recall"
)


def remember_if_best(
    context: Context, model: SplitRecommender, market: str, server_round: int, metrics: dict[str, Any],
    training_id: str,
) -> None:
    """Keep ``model`` as the market's served candidate if it beats the best validation round so far."""
    if server_round < 1:
        return  # round 0 is the starting point, not a trained model
    _restore_best(context, market)
    info = context.state[BEST_INFO_KEY] if BEST_INFO_KEY in context.state else None
    same_training = info is not None and str(info["training-id"]) == training_id
    if same_training and float(metrics["val-ndcg"]) <= float(info["val-ndcg"]):
        return
    context.state[BEST_MODEL_KEY] = ArrayRecord(model.state_dict())
    context.state[BEST_INFO_KEY] = ConfigRecord(
        {"training-id": training_id, "round": server_round}
        | {key: float(metrics[key]) for key in KEPT_METRICS}
        | {key: float(metrics[key]) for key in ("epsilon", "delta") if key in metrics}
    )
    path = best_file(context, market)
    if path is not None:
        atomic_torch_save(path, {"info": dict(context.state[BEST_INFO_KEY]), "state": model.state_dict()})


def best_file(context: Context, market: str) -> Path | None:
    """``<state-dir>/<market>.best.pt`` of a deployed region with a state-dir; None otherwise."""
    if "market" not in context.node_config:
        return None
    directory = state_dir(context)
    return Path(directory) / f"{market}{BEST_FILE_SUFFIX}" if directory else None


def _restore_best(context: Context, market: str) -> None:
    """Put the best round a restarted SuperNode saved back into a fresh ``context.state``.

    An unreadable file is only a lost serving candidate, never a reason to stop
    training: it is reported and ignored.
    """
    path = best_file(context, market)
    if BEST_INFO_KEY in context.state or path is None or not path.exists():
        return
    try:
        saved = torch.load(path, weights_only=True)
        info, state = ConfigRecord(saved["info"]), ArrayRecord(saved["state"])
    except (RuntimeError, OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as error:
        log(WARNING, "Market %s: %s is unreadable (%s); it keeps the best round from here on.", market, path, error)
        return
    context.state[BEST_MODEL_KEY], context.state[BEST_INFO_KEY] = state, info


def served_model_dir(context: Context, market: str, method: str) -> Path | None:
    """Where the market writes its served model for ``method``, or None when it has nowhere to."""
    if "market" in context.node_config:
        directory = state_dir(context)
        return Path(directory) / "model" if directory else None
    models_dir = str(context.run_config.get("models-dir", ""))
    return Path(models_dir) / method / market if models_dir else None


def write_best_model(
    context: Context, model: SplitRecommender, data: MarketTensors, catalog: Catalog, method: Method,
    fork: dict[str, Any] | None = None,
) -> None:
    """Write the best round kept so far as the served model; fedper-ft serves its fine-tuned ``fork``.

    Parameters
    ----------
    fork : dict, optional
        ``{"state": state_dict, "round": r, "metrics": {...}, "spent": {...}}`` of
        fedper-ft's fine-tuned model, served in place of the best round; in
        simulation the best round is then written as ``method.base``'s model.
    """
    market = data.split.market
    _restore_best(context, market)
    best = _best_round(context)
    if fork is not None:
        _write(served_model_dir(context, market, method.name), model, data, catalog, method.name, fork)
        if best is not None and method.base and "market" not in context.node_config:
            _write(served_model_dir(context, market, method.base), model, data, catalog, method.base, best)
    elif best is not None:
        _write(served_model_dir(context, market, method.name), model, data, catalog, method.name, best)


def _best_round(context: Context) -> dict[str, Any] | None:
    if BEST_MODEL_KEY not in context.state:
        return None
    info = dict(context.state[BEST_INFO_KEY])
    return {
        "state": context.state[BEST_MODEL_KEY].to_torch_state_dict(),
        "round": int(info["round"]),
        "metrics": {key: info[key] for key in KEPT_METRICS},
        "spent": {key: info[key] for key in ("epsilon", "delta") if key in info},
    }


def _write(
    directory: Path | None, model: SplitRecommender, data: MarketTensors, catalog: Catalog, method: str,
    chosen: dict[str, Any],
) -> None:
    if directory is None:
        return
    set_arrays(model, chosen["state"])
    manifest = {
        "method": method,
        "market": data.split.market,
        "round": chosen["round"],
        "metrics": chosen["metrics"],
        "epsilon": chosen["spent"].get("epsilon"),
        "delta": chosen["spent"].get("delta"),
    }
    write_served_model(directory, model, data, catalog, manifest)
    log(INFO, "Market %s wrote its served model (%s, round %s) to %s",
        data.split.market, method, chosen["round"], directory)
