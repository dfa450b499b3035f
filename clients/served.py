"""The model a market serves after a training: its best validation round, written where the region keeps it.

Every evaluation (folded into the next training message, or separate) the
market compares the model it just evaluated with the best so far, by the
rule the results use (:mod:`common.selection`, as
:func:`simulations.results.select_on_validation` applies it: rounds from 1,
the first highest validation NDCG@10), and keeps the better
one in ``context.state``. When the server sends the last round's evaluation,
the market writes that model as a served-model directory
(:func:`common.serving.write_served_model`):

* a deployed region into ``<state-dir>/models/<training-id>`` (never a path from the
  server; the training's id is a checked name): one served model per training, so a
  later training never replaces the model a region serves. Which one ``recommend``
  and ``score`` use is the operator's choice, ``<state-dir>/current``, set with
  ``xmfl models --use`` (:mod:`clients.models`), never by a training;
* in simulation into the run config's ``models-dir``, ``<models-dir>/<method>/<market>``;
  fedper-ft also writes its best federated round as its base method's model
  (``<models-dir>/fedper/<market>``), since one run yields both.

The best round so far lives in a file where the market has a place for one,
replaced whenever a round beats it, and ``context.state`` holds only its round
and metrics: a deployed region keeps ``<state-dir>/<market>.best.pt``, so a
SuperNode restarted in the middle of a training still serves the best round of
the whole training, not the best since the restart; a simulated market keeps
``<models-dir>/<method>/<market>.best.pt`` until it writes its served model,
so that a simulation of many markets over a large catalog does not hold every
market's whole model in the engine's memory. Item tables whose rows are mostly
zero (fedals' factors outside a market's assortment) are stored by their
non-zero rows. Without such a place the model stays in ``context.state``.

Nothing of it is sent: the served model stays in the region.
"""

import pickle
import shutil
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log

from clients.privacy_state import state_dir
from common.data.catalog import Catalog
from common.methods import Method
from common.neural.model import SplitRecommender, set_arrays
from common.neural.train import MarketTensors
from common.protocol import EVALUATION_METRICS, VAL_NDCG_KEY
from common.runtime.durable import atomic_torch_save
from common.runtime.names import check_name
from common.selection import improves
from common.serving.format import write_served_model
from common.serving.sparse_state import compact_state, expand_state

BEST_MODEL_KEY = "best-model"  # the whole model (shared part and head) at the best validation round so far
BEST_INFO_KEY = "best-model-info"  # that round, its metrics and the privacy spent then
BEST_FILE_SUFFIX = ".best.pt"  # <state-dir>/<market>.best.pt: the two above, kept across a SuperNode restart
MODELS_DIR = "models"  # <state-dir>/models/<training-id>: a deployed region's served model of each training
CURRENT = "current"  # <state-dir>/current -> models/<training-id>: the one served, set by the operator (clients.models)
# Served models a region keeps: beyond these the oldest go, never the current one, so that a server naming ever
# new trainings cannot fill the region's disk (a model holds the catalog's item table: 0.5 GB at 10^6 items, d 128).
KEPT_MODELS = 8
KEPT_METRICS = EVALUATION_METRICS  # the evaluation metrics a served model's manifest carries: all of them


def remember_if_best(
    context: Context,
    model: SplitRecommender,
    market: str,
    server_round: int,
    metrics: dict[str, Any],
    training_id: str,
) -> None:
    """Keep ``model`` as the market's served candidate if it beats the best validation round so far."""
    if server_round < 1:
        return  # round 0 is the starting point, not a trained model
    _restore_best(context, market)
    info = context.state.get(BEST_INFO_KEY)
    same_training = info is not None and str(info["training-id"]) == training_id
    if not improves(float(metrics[VAL_NDCG_KEY]), float(info[VAL_NDCG_KEY]) if same_training else None):
        return
    context.state[BEST_INFO_KEY] = ConfigRecord(
        {"training-id": training_id, "round": server_round}
        | {key: float(metrics[key]) for key in KEPT_METRICS}
        | {key: float(metrics[key]) for key in ("epsilon", "delta") if key in metrics}
    )
    path = best_file(context, market)
    if path is None:
        context.state[BEST_MODEL_KEY] = ArrayRecord(model.state_dict())
        return
    if BEST_MODEL_KEY in context.state:
        del context.state[BEST_MODEL_KEY]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"info": dict(context.state[BEST_INFO_KEY]), "state": compact_state(model.state_dict())})


def best_file(context: Context, market: str) -> Path | None:
    """Where the market keeps its best round so far, or None when it has no place for it.

    ``<state-dir>/<market>.best.pt`` in a deployed region with a state-dir;
    ``<models-dir>/<method>/<market>.best.pt`` in a simulation with a models-dir.
    """
    if "market" in context.node_config:
        directory = state_dir(context)
        return Path(directory) / f"{market}{BEST_FILE_SUFFIX}" if directory else None
    models_dir = str(context.run_config.get("models-dir", ""))
    method = str(context.run_config.get("method", ""))
    return Path(models_dir) / method / f"{market}{BEST_FILE_SUFFIX}" if models_dir and method else None


def _restore_best(context: Context, market: str) -> None:
    """Put the best round a restarted SuperNode saved back into a fresh ``context.state``.

    An unreadable file is only a lost serving candidate, never a reason to stop
    training: it is reported and ignored.
    """
    path = best_file(context, market)
    if BEST_INFO_KEY in context.state or path is None or not path.exists():
        return
    saved = _read_best(path, market)
    if saved is not None:
        context.state[BEST_INFO_KEY] = ConfigRecord(saved["info"])


def _read_best(path: Path, market: str) -> dict[str, Any] | None:
    """The info and state dict of a best file, or None (reported) when it is unreadable."""
    try:
        saved = torch.load(path, weights_only=True)
        return {"info": dict(saved["info"]), "state": saved["state"]}  # compact: expanded where it is used
    except (
        RuntimeError,
        OSError,
        EOFError,
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        pickle.UnpicklingError,
    ) as error:
        log(WARNING, "Market %s: %s is unreadable (%s); it keeps the best round from here on.", market, path, error)
        return None


def served_model_dir(context: Context, market: str, method: str, training_id: str) -> Path | None:
    """Where the market writes its served model for ``method``, or None when it has nowhere to."""
    if "market" in context.node_config:
        directory = state_dir(context)
        return Path(directory) / MODELS_DIR / check_name(training_id, "training") if directory else None
    models_dir = str(context.run_config.get("models-dir", ""))
    return Path(models_dir) / method / market if models_dir else None


def write_best_model(
    context: Context,
    model: SplitRecommender,
    data: MarketTensors,
    catalog: Catalog,
    method: Method,
    training_id: str,
    fork: dict[str, Any] | None = None,
) -> None:
    """Write the best round kept so far as the served model; fedper-ft and fedals-pt serve their ``fork``.

    Parameters
    ----------
    training_id : str
        The training the model comes from: named in its manifest, and a deployed region's folder for it.
    fork : dict, optional
        ``{"state": state_dict, "round": r, "metrics": {...}, "spent": {...}}`` of
        fedper-ft's fine-tuned model or fedals-pt's private transfer, served in place of
        the best round, with an optional ``"manifest"`` of extra manifest entries; in
        simulation the best round is then written as ``method.base``'s model.
    """
    market = data.split.market
    _restore_best(context, market)
    best = _best_round(context, market)

    def write(name: str, chosen: dict[str, Any]) -> None:
        _write(served_model_dir(context, market, name, training_id), model, data, catalog, name, chosen, training_id)

    if fork is not None:
        write(method.name, fork)
        if best is not None and method.base and "market" not in context.node_config:
            write(method.base, best)
    elif best is not None:
        write(method.name, best)
    if "market" in context.node_config and state_dir(context):
        _prune(Path(state_dir(context)) / MODELS_DIR)
    path = best_file(context, market)
    if "market" not in context.node_config and path is not None:
        path.unlink(missing_ok=True)  # written as the served model; a simulation's file has no other use


def write_refit_model(
    context: Context,
    model: SplitRecommender,
    data: MarketTensors,
    catalog: Catalog,
    method: Method,
    training_id: str,
    refit_rounds: int,
    spent: dict[str, float],
) -> None:
    """Write a refit for serving (``serve-refit``) as the training's served model, in place of its best round.

    The refit trained on every interaction, so nothing is left to measure it on: the manifest
    keeps the metrics of the training's best validation round and says, under ``refit``, that
    the model served is the refit of that many rounds. ``spent`` is the privacy spent (empty
    without DP), as after the refit's releases.
    """
    market = data.split.market
    _restore_best(context, market)
    info = context.state.get(BEST_INFO_KEY)
    validated = info is not None and str(info["training-id"]) == training_id
    chosen = {
        "state": model.state_dict(),
        "round": refit_rounds,
        "metrics": {key: float(info[key]) if validated else float("nan") for key in KEPT_METRICS},
        "spent": spent,
        "manifest": {
            "refit": {
                "rounds": refit_rounds,
                "rounds-from": "the training's best round by macro validation NDCG@10 over the markets",
                "trained-on": "every interaction of the market: training, validation and test",
                "validated-round": int(info["round"]) if validated else None,
                "metrics": "this market's best validation round's, before the refit; the refit has nothing held out",
            }
        },
    }
    _write(
        served_model_dir(context, market, method.name, training_id),
        model,
        data,
        catalog,
        method.name,
        chosen,
        training_id,
    )
    if "market" in context.node_config and state_dir(context):
        _prune(Path(state_dir(context)) / MODELS_DIR)


def _prune(models: Path) -> None:
    """Remove the oldest served models beyond :data:`KEPT_MODELS`, never the one ``current`` points at.

    Hidden entries (a model being written, its lock) are not served models and are left alone.
    """
    if not models.is_dir():
        return
    current = models.parent / CURRENT
    served = current.resolve() if current.is_symlink() else None
    folders = sorted(
        (path for path in models.iterdir() if path.is_dir() and not path.name.startswith(".")),
        key=lambda path: path.stat().st_mtime_ns,
    )
    for folder in [path for path in folders if path.resolve() != served][: max(0, len(folders) - KEPT_MODELS)]:
        log(
            INFO, "Removing the served model %s: a region keeps %d, the current one and the newest", folder, KEPT_MODELS
        )
        shutil.rmtree(folder, ignore_errors=True)
        (models / f".{folder.name}.lock").unlink(missing_ok=True)  # its writers' lock (common.runtime.durable)


def _best_round(context: Context, market: str) -> dict[str, Any] | None:
    """The best round kept so far: its state dict, round, metrics and privacy spent; None if none."""
    if BEST_INFO_KEY not in context.state:
        return None
    info = dict(context.state[BEST_INFO_KEY])
    if BEST_MODEL_KEY in context.state:
        state = context.state[BEST_MODEL_KEY].to_torch_state_dict()
    else:
        path = best_file(context, market)
        saved = _read_best(path, market) if path is not None and path.exists() else None
        if (
            saved is None
            or str(saved["info"].get("training-id")) != str(info["training-id"])
            or int(saved["info"]["round"]) != int(info["round"])
        ):
            log(WARNING, "Market %s: the file of its best round is gone or another round's; nothing to serve.", market)
            return None
        state = saved["state"]
    return {
        "state": state,
        "round": int(info["round"]),
        "metrics": {key: info[key] for key in KEPT_METRICS},
        "spent": {key: info[key] for key in ("epsilon", "delta") if key in info},
    }


def _write(
    directory: Path | None,
    model: SplitRecommender,
    data: MarketTensors,
    catalog: Catalog,
    method: str,
    chosen: dict[str, Any],
    training_id: str,
) -> None:
    if directory is None:
        return
    # A best file's mostly-zero tables are written straight into the model's own (no dense copy).
    set_arrays(model, expand_state(chosen["state"], into=model.state_dict()))
    manifest = {
        "method": method,
        "training-id": training_id,
        "market": data.split.market,
        "round": chosen["round"],
        "metrics": chosen["metrics"],
        "epsilon": chosen["spent"].get("epsilon"),
        "delta": chosen["spent"].get("delta"),
        **chosen.get("manifest", {}),
    }
    write_served_model(directory, model, data, catalog, manifest)
    log(
        INFO,
        "Market %s wrote its served model (%s, round %s) to %s",
        data.split.market,
        method,
        chosen["round"],
        directory,
    )
