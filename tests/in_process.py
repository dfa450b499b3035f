"""The real ServerApp and ClientApp in this process: a grid whose nodes are ClientApp calls.

A SuperLink with the simulation engine costs ~30 s per training on these
machines; tests that need a training's outputs, not the transport, run the
same apps here (the transport has its own tests: test_simulation, test_deploy).
"""

import json
from collections.abc import Callable
from itertools import count

from flwr.app import Context, Message, RecordDict

from clients.client_app import app as client_app
from server.server_app import main as server_main
from simulations import run as harness
from simulations.attacks.hostile import InProcessGrid
from simulations.results import federated_curves

_run_ids = count(1000)


Responder = Callable[[Message], RecordDict | None]


LocalGrid = InProcessGrid  # a grid whose nodes answer at once in this process (simulations.attacks.hostile)


class ScriptedGrid(LocalGrid):
    """Nodes that answer through Python functions: the content of the reply, or None for silence."""

    def __init__(self, nodes: dict[int, Responder]) -> None:
        super().__init__(list(nodes))
        self.nodes = dict(nodes)

    def answer(self, message: Message) -> Message | None:
        content = self.nodes[message.metadata.dst_node_id](message)
        return None if content is None else Message(content, reply_to=message)


class ClientAppGrid(LocalGrid):
    """Nodes that are the real ClientApp in this process, one simulation partition each."""

    def __init__(self, run_config: dict, partitions: int, node_config: dict | None = None) -> None:
        super().__init__(list(range(1, partitions + 1)))
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                state=RecordDict(),
                run_config=run_config,
                node_config={**(node_config or {}), "partition-id": node - 1, "num-partitions": partitions},
            )
            for node in self.node_ids
        }

    def answer(self, message: Message) -> Message:
        return client_app(message, self.contexts[message.metadata.dst_node_id])


SERVER_LOOP = {"min-nodes": 2, "poll-interval": 0.001, "round-timeout": 120.0}  # no waiting, two markets


def run_config(*settings: dict, server_loop: bool = True, **overrides) -> dict:
    """A run config for the tests: the app's defaults (pyproject.toml's ``[tool.flwr.app.config]``) without a
    refit for serving, with ``server_loop`` the settings of an in-process training (:data:`SERVER_LOOP`), then each dict
    of ``settings`` in order, then ``overrides``.

    A test module keeps its own values in a dict, e.g. ``run_config(RUN, **{"dp-epsilon": 8.0})``;
    tests that only call the ClientApp or read configs pass ``server_loop=False`` to keep the defaults.
    """
    # No refit for serving unless a test asks for it (tests/server/test_refit.py): a test of a training's
    # rounds would otherwise train a second time after them.
    config = {**harness.app_defaults(), "serve-refit": False, **(SERVER_LOOP if server_loop else {})}
    for layer in settings:
        config.update(layer)
    return {**config, **overrides}


def serve(
    run_config: dict, markets: int = 2, run_id: int | None = None, node_config: dict | None = None
) -> ClientAppGrid:
    """One training of the real ServerApp over ``markets`` in-process ClientApps (each with ``node_config``
    beside its partition); the grid it used."""
    grid = ClientAppGrid(run_config, markets, node_config)
    server_main(
        grid,
        Context(
            run_id=next(_run_ids) if run_id is None else run_id,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config=run_config,
        ),
    )
    return grid


def in_process_federated(args, method: str, markets: list[str]) -> tuple[dict, list]:
    """``simulations.run.run_federated`` with the real apps in this process instead of a SuperLink and Ray."""
    out_dir = args.out / method
    run_config = {
        **harness.app_defaults(),
        **harness.run_config_for(args, method, out_dir, len(markets)),
        "poll-interval": 0.001,
    }
    serve(run_config, len(markets), node_config=harness.simulation_node_config(args))
    history = json.loads((out_dir / "history.json").read_text(encoding="utf-8"))
    return federated_curves(history), [entry for entry in history["rounds"] if entry["round"] >= 1]
