"""Where a run may read and write on the server host, and one training at a time in an out-dir.

Flower's SuperLink does not authenticate the ``flwr`` CLI: whoever reaches its port submits a
run, and with it a run config. The ServerApp reads and writes paths that run config names
(``out-dir``, ``models-dir``, ``init-from``, ``catalog-path``, ``data-dir``), so without a bound
a submitted run could read ``/dev/zero`` as a catalog or write ``history.json`` and
``checkpoint.pt`` wherever the server process may write. The bound is the server host's own
setting, never the run config's: the environment variable :data:`SERVER_ROOT_ENV` of the
ServerApp's process (set where the SuperLink is started; Flower's ServerApp processes inherit
it). Every path of the run must lie inside that root once symbolic links and ``..`` are
resolved; a relative path is taken inside the root. Without the variable a run is refused:
a deployment that forgot it must not be open. The simulation harness runs the user's own run
config on the user's own machine and sets the root to ``/`` (``simulations.flower_runtime``).

A training's out-dir is locked (``flock`` on ``<out-dir>/.training.lock``) while its ServerApp
runs: a second run naming the same out-dir, ``resume=true`` included, is refused instead of
writing the same files. The lock goes with the process, so a crashed server leaves none.

Written here rather than taken from a library: Flower has no notion of the server host's
paths, and the check is a few lines of :mod:`os.path` over the fields this app reads.
"""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from common.run_config import RunConfig

SERVER_ROOT_ENV = "XMFL_SERVER_ROOT"  # the server host's folder every path of a run must stay inside
LOCK_FILE = ".training.lock"  # in out-dir, held while a ServerApp trains there
# RunConfig field -> its run-config key: the paths on the server host a run names.
SERVER_PATHS = {
    "out_dir": "out-dir",
    "models_dir": "models-dir",
    "init_from": "init-from",
    "catalog_path": "catalog-path",
    "data_dir": "data-dir",
}


@contextmanager
def process_root(root: str) -> Iterator[None]:
    """This process's root for the ServerApps it runs in-process (an attack's own runs), restored after."""
    saved = os.environ.get(SERVER_ROOT_ENV)
    os.environ[SERVER_ROOT_ENV] = root
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SERVER_ROOT_ENV, None)
        else:
            os.environ[SERVER_ROOT_ENV] = saved


def server_root(environment: dict[str, str] | None = None) -> Path:
    """The server host's root for run paths, from :data:`SERVER_ROOT_ENV`.

    Raises
    ------
    ValueError
        If the variable is not set or does not name an existing directory.
    """
    value = (os.environ if environment is None else environment).get(SERVER_ROOT_ENV, "")
    if not value:
        raise ValueError(
            f"{SERVER_ROOT_ENV} is not set on the server host: set it, where the SuperLink is started, to the folder "
            "the runs' out-dir, catalog-path, init-from and models-dir must stay inside (docs/deploy.md)."
        )
    root = Path(value)
    if not root.is_dir():
        raise ValueError(f"{SERVER_ROOT_ENV}={value} is not a directory on the server host.")
    return root.resolve()


def confine(config: RunConfig, root: Path) -> RunConfig:
    """``config`` with each server-host path resolved inside ``root`` (a relative one taken from there).

    Raises
    ------
    ValueError
        Naming the first run-config key whose path leads outside ``root``, or a catalog that is not a regular file.
    """
    resolved = {}
    for field, key in SERVER_PATHS.items():
        value = getattr(config, field)
        if not value:
            continue
        path = (root / value).resolve()  # an absolute value replaces root; symbolic links and .. are resolved
        if path != root and root not in path.parents:
            raise ValueError(
                f"{key}={value} leads outside the server host's {SERVER_ROOT_ENV} ({root}): a run may only name "
                "paths inside it."
            )
        resolved[field] = str(path)
    if "catalog_path" in resolved and not Path(resolved["catalog_path"]).is_file():
        raise ValueError(f"catalog-path={config.catalog_path} is not a file on the server host.")
    return replace(config, **resolved)


class TrainingLock:
    """``out_dir``'s training lock, held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor

    @classmethod
    def acquire(cls, out_dir: Path) -> "TrainingLock":
        """Take the lock.

        Raises
        ------
        ValueError
            If another ServerApp is training in ``out_dir``.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ValueError(
                f"out-dir {out_dir} is in use by a training that is running: wait for it to end, or give this run "
                "another out-dir."
            ) from None
        return cls(descriptor)

    def release(self) -> None:
        os.close(self._descriptor)
