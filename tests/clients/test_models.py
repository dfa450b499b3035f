"""A deployed region's served model of each training, and the one it serves (clients.served, clients.models)."""

import json
import os
import re
import time

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from clients import served
from clients.client_app import app
from clients.models import main as models_main
from common.data.markets import MarketSource
from common.data.synthetic import SyntheticConfig, write_markets
from common.protocol import TRAINING_ID_KEY
from common.run_config import RunConfig
from common.serving.query import load_served_model
from server.server_app import final_evaluate_config, initial_arrays
from tests.in_process import run_config as in_process_config

pytestmark = pytest.mark.usefixtures("server_task_identity")

RUN = {"method": "fedper", "synthetic-markets": 2, "embedding-dim": 8, "local-epochs": 1}


def _finish_training(tmp_path, training_id: str, seed: int) -> None:
    """A region's SuperNode (a fresh process: a fresh context) gets a training's last evaluation."""
    paths = write_markets(SyntheticConfig(markets=2, seed=0), tmp_path / "data")
    catalog_path = tmp_path / "data" / "catalog.txt"
    MarketSource("", 2, 0).catalog().save(catalog_path)
    run_config = in_process_config(RUN, server_loop=False, seed=seed, **{"catalog-path": str(catalog_path)})
    server = RunConfig.from_run_config(run_config)
    config = final_evaluate_config(server)
    config["server-round"], config[TRAINING_ID_KEY] = 1, training_id
    node = {
        "market": "m01",
        "data-path": str(paths["m01"]),
        "catalog-path": str(catalog_path),
        "state-dir": str(tmp_path / "state"),
    }
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    message = Message(
        RecordDict({"arrays": initial_arrays(server), "config": config}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
    )
    assert not app(message, context).has_error()


def test_each_training_writes_its_own_model_and_the_operator_chooses_which_is_served(tmp_path, capsys):
    # Prepare: two trainings end in the region, of other seeds (other models).
    state = tmp_path / "state"
    _finish_training(tmp_path, "101", seed=0)
    first = (state / "models" / "101" / "model.pt").read_bytes()
    _finish_training(tmp_path, "102", seed=1)

    # Execute / Assert: the second training wrote beside the first, which is untouched, and serves nothing yet.
    assert (state / "models" / "101" / "model.pt").read_bytes() == first
    assert not (state / "current").exists()
    assert models_main(["--state-dir", str(state), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["training-id"], row["current"]) for row in listed] == [("101", False), ("102", False)]
    assert all(row["method"] == "fedper" and row["round"] == 1 for row in listed)

    # Execute / Assert: the newest goes live, then the operator rolls back to the first.
    assert models_main(["--state-dir", str(state), "--use", "latest"]) == 0
    assert load_served_model(state / "current").manifest["training-id"] == "102"
    assert models_main(["--state-dir", str(state), "--use", "101"]) == 0
    assert load_served_model(state / "current").manifest["training-id"] == "101"
    assert os.readlink(state / "current") == os.path.join("models", "101")  # relative: the state-dir may move
    assert "| * | 101 | fedper |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("training", "problem"),
    [
        ("999", "no served model of training 999 .*trainings: 101"),
        ("../101", "training"),
        ("broken", "not made current"),
    ],
)
def test_a_model_that_is_not_there_or_does_not_load_is_never_made_current(tmp_path, capsys, training, problem):
    # Prepare: one good model served, and a folder that holds no served model.
    state = tmp_path / "state"
    _finish_training(tmp_path, "101", seed=0)
    assert models_main(["--state-dir", str(state), "--use", "101"]) == 0
    (state / "models" / "broken").mkdir()
    capsys.readouterr()

    # Execute
    status = models_main(["--state-dir", str(state), "--use", training])

    # Assert: one line, status 2, and the served model unchanged.
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(problem, err)
    assert load_served_model(state / "current").manifest["training-id"] == "101"


def test_a_region_keeps_a_bounded_number_of_models_and_never_removes_the_one_it_serves(tmp_path, monkeypatch):
    # Prepare: a region that keeps 2 models serves training 101's.
    monkeypatch.setattr(served, "KEPT_MODELS", 2)
    state = tmp_path / "state"
    _finish_training(tmp_path, "101", seed=0)
    assert models_main(["--state-dir", str(state), "--use", "101"]) == 0

    # Execute: a server names three more trainings.
    for training in ("102", "103", "104"):
        time.sleep(0.02)  # models are aged by their folders' times, kept in ticks of a few ms
        _finish_training(tmp_path, training, seed=0)

    # Assert: the served model and the newest are kept, the rest removed.
    assert sorted(path.name for path in (state / "models").iterdir() if path.is_dir()) == ["101", "104"]
    assert sorted(path.name for path in (state / "models").iterdir() if not path.is_dir()) == [".101.lock", ".104.lock"]
    assert load_served_model(state / "current").manifest["training-id"] == "101"
