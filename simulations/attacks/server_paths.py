"""Whoever submits a run against the server host's files: paths outside its root, a device as catalog, a live out-dir.

The SuperLink does not authenticate the ``flwr`` CLI, so anyone who reaches its port writes a
run config. This attack submits run configs to the real ServerApp (in this process, as the
SuperLink's ServerApp process would run them) on a server host whose root is a folder of the
attack's own (``XMFL_SERVER_ROOT``, :mod:`server.paths`):

* ``out-dir`` outside the root: the ServerApp would write ``history.json``, ``checkpoint.pt``
  and ``published.pt`` there;
* ``init-from`` and ``catalog-path`` outside the root, ``catalog-path=/dev/zero``;
* ``resume=true`` on the out-dir of a training that is running (its lock held, as the
  running ServerApp process holds it).

Reported: for each, whether the ServerApp refused it before writing anything, and the files
it created outside the root. Beside it, the same run configs where the attack works: a
server host that sets the root to ``/`` (what the simulation harness does for the user's own
runs), where every path is inside. No market is connected: a run that gets past the checks
fails when it asks for nodes, after it has made its out-dir.
"""

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from server.paths import TrainingLock, process_root
from server.server_app import RunRefusedError
from server.server_app import main as server_main
from simulations import run as harness
from simulations.attacks.settings import AttackSettings


class _NoMarkets(Grid):
    """A Grid no market ever connects to: a run that passes the checks fails at its first round."""

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise RuntimeError("no market is connected")

    def get_node_ids(self) -> list[int]:
        raise RuntimeError("no market is connected")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise RuntimeError("no market is connected")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise RuntimeError("no market is connected")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise RuntimeError("no market is connected")


def _submit(run_config: dict[str, Any], root: str) -> str:
    """Run the ServerApp on ``run_config`` with the server host's root ``root``: "refused", or how it failed."""
    try:
        with process_root(root):
            context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
            server_main(_NoMarkets(), context)
    except RunRefusedError:
        return "refused"
    except RuntimeError as error:  # past the checks, the run fails when it asks for markets
        return f"ran on: {error}"
    return "ran on"


def _created(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


def attack(settings: AttackSettings) -> dict[str, Any]:
    """Submit each hostile run config against a bounded server host and one bounded at ``/``."""
    settings.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    for host, bounded in (("root-set", True), ("root-is-everything", False)):
        with tempfile.TemporaryDirectory(dir=settings.out) as scratch:
            root, outside = Path(scratch) / "server-host", Path(scratch) / "elsewhere"
            (root / "shared").mkdir(parents=True)
            outside.mkdir()
            catalog = root / "shared" / "catalog.txt"
            catalog.write_text("i1\ni2\n")
            base = {**harness.app_defaults(), "method": "fedals", "num-server-rounds": 1, "catalog-path": str(catalog)}
            live = root / "running"
            held = TrainingLock.acquire(live)
            attempts = {
                "out-dir-outside": {**base, "out-dir": str(outside / "out")},
                "out-dir-climbing": {**base, "out-dir": str(root / ".." / "elsewhere" / "climbed")},
                "init-from-outside": {**base, "out-dir": str(root / "a"), "init-from": str(outside)},
                "catalog-device": {**base, "out-dir": str(root / "b"), "catalog-path": "/dev/zero"},
                "resume-live-out-dir": {**base, "out-dir": str(live), "resume": True},
            }
            try:
                outcomes = {name: _submit(config, str(root) if bounded else "/") for name, config in attempts.items()}
            finally:
                held.release()
            report[host] = {
                "refused": sum(outcome == "refused" for outcome in outcomes.values()),
                "attempts": len(outcomes),
                "outcomes": outcomes,
                "files-created-outside-root": _created(outside),
            }
    return report
