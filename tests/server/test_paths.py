"""The run config's paths on the server host stay inside the host's own root, and one training holds an out-dir."""

import os
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from common.run_config import RunConfig
from server.paths import LOCK_FILE, SERVER_ROOT_ENV, TrainingLock, confine, server_root
from server.server_app import RunRefusedError
from server.server_app import main as server_main
from tests.in_process import ScriptedGrid
from tests.in_process import run_config as in_process_config

RUN = {"method": "fedper", "synthetic-markets": 2, "embedding-dim": 8, "num-server-rounds": 1, "node-timeout": 1.0}


def _config(**paths: str) -> RunConfig:
    return RunConfig.from_run_config(in_process_config(RUN, paths))


def _serve(run_config: dict) -> None:
    """The real ServerApp, with no market connected: whatever it refuses, it refuses before any round."""
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_main(ScriptedGrid({}), context)


def test_without_the_server_hosts_root_every_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(SERVER_ROOT_ENV)

    with pytest.raises(RunRefusedError, match=f"{SERVER_ROOT_ENV} is not set on the server host"):
        _serve(in_process_config(RUN, {"out-dir": str(tmp_path / "out")}))

    assert not (tmp_path / "out").exists()  # nothing written anywhere


def test_a_root_that_is_not_a_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        server_root({SERVER_ROOT_ENV: str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("out-dir", "/etc/xmfl"),  # absolute, elsewhere
        ("out-dir", "../escaped"),  # relative, climbing out
        ("models-dir", "inside/../../escaped"),
        ("init-from", "/tmp"),
        ("data-dir", "/"),
    ],
)
def test_a_path_outside_the_root_is_refused_naming_its_key(tmp_path, key, value):
    root = tmp_path / "root"
    root.mkdir()

    with pytest.raises(ValueError, match=f"{key}={value} leads outside the server host's {SERVER_ROOT_ENV}"):
        confine(_config(**{key: value}), root.resolve())


def test_a_symbolic_link_inside_the_root_does_not_lead_out_of_it(tmp_path):
    # Prepare: a link inside the root to a folder outside it.
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)

    with pytest.raises(ValueError, match="out-dir=link/out leads outside"):
        confine(_config(**{"out-dir": "link/out"}), root.resolve())


def test_paths_inside_the_root_are_resolved_there_and_a_catalog_must_be_a_file(tmp_path):
    # Prepare
    root = (tmp_path / "root").resolve()
    (root / "shared").mkdir(parents=True)
    (root / "shared" / "catalog.txt").write_text("a\n")

    # Execute
    config = confine(_config(**{"out-dir": "trainings/1", "catalog-path": str(root / "shared/catalog.txt")}), root)

    # Assert: a relative path is taken inside the root; a device or folder is no catalog.
    assert config.out_dir == str(root / "trainings" / "1") and config.catalog_path == str(root / "shared/catalog.txt")
    for not_a_file in ("/dev/zero", str(root / "shared")):
        with pytest.raises(ValueError, match="is not a file on the server host"):
            confine(_config(**{"catalog-path": not_a_file}), Path("/"))


def test_the_server_app_writes_nothing_outside_the_root(tmp_path, monkeypatch):
    # Prepare: the server host's root, and a run that names an out-dir beside it.
    (tmp_path / "root").mkdir()
    monkeypatch.setenv(SERVER_ROOT_ENV, str(tmp_path / "root"))

    # Execute / Assert: refused in one line, and the out-dir never made.
    with pytest.raises(RunRefusedError, match="out-dir=.* leads outside") as refused:
        _serve(in_process_config(RUN, {"out-dir": str(tmp_path / "elsewhere")}))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "elsewhere").exists()


def test_a_running_trainings_out_dir_is_refused_to_another_run_even_to_resume_it(tmp_path):
    # Prepare: a ServerApp (another process in deployment) trains in out.
    held = TrainingLock.acquire(tmp_path / "out")

    # Execute / Assert: a second run naming it, resume included, is refused in one line.
    try:
        for resume in (False, True):
            with pytest.raises(RunRefusedError, match="is in use by a training that is running"):
                _serve(in_process_config(RUN, {"out-dir": str(tmp_path / "out")}, resume=resume))
    finally:
        held.release()

    # ... and once that training ends, the out-dir is free again.
    TrainingLock.acquire(tmp_path / "out").release()
    assert oct((tmp_path / "out" / LOCK_FILE).stat().st_mode & 0o777) == oct(0o600)


def test_a_lock_is_released_when_its_process_ends(tmp_path):
    # A crashed server leaves no lock: flock goes with the process (a forked child holds it, then exits).
    pid = os.fork()
    if pid == 0:  # the child: take the lock and end without releasing it
        TrainingLock.acquire(tmp_path / "out")
        os._exit(0)
    os.waitpid(pid, 0)

    TrainingLock.acquire(tmp_path / "out").release()
