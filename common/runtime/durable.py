"""Durable, private file writes: a crash leaves the old file or the new one, never half of one.

A region's state file holds its head (possibly per-user embeddings) and its
privacy ledger; the server's checkpoint and history say which round a training
reached. Each is replaced by writing a uniquely named temporary file in the
same directory (created 0600, never readable by others), flushing it to disk,
renaming it over the target and flushing the directory, so that the rename
itself survives a power cut. Two writers of one file never share a temporary
name; :func:`locked` serialises them where the order matters.
"""

import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

PRIVATE_MODE = 0o600  # owner read/write only: state files can hold per-user embeddings


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` by ``data`` atomically and durably, with permissions ``mode``.

    Parameters
    ----------
    path : str or Path
        The file to replace; its directory is created if missing.
    data : bytes
        The whole new content.
    mode : int
        Permissions of the new file, set when it is created (not after).
    """
    atomic_write(path, lambda file: file.write(data), mode)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` by what ``write`` writes into the open file it is given, atomically and durably.

    The content goes straight to the temporary file: a checkpoint of a million-row table is
    never held in memory a second time as bytes. Parameters as :func:`atomic_write_bytes`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600 with a name no other writer gets.
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if mode != PRIVATE_MODE:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_torch_save(path: str | Path, obj: Any, mode: int = PRIVATE_MODE) -> None:
    """:func:`torch.save` of ``obj`` to ``path``, atomically and durably (:func:`atomic_write`)."""
    atomic_write(path, lambda file: torch.save(obj, file), mode)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (through ``<path>.lock``) for the block.

    Advisory (``flock``): it orders the writers of this package, which all take it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def atomic_replace_directory(directory: str | Path, files: dict[str, bytes], marker: str, kind: str) -> None:
    """Replace ``directory`` by one holding exactly ``files``, atomically and durably.

    The files are written 0600 into a temporary sibling (0700), flushed, and
    the sibling is renamed over ``directory``; a crash leaves the old directory
    or the new one. Writers of one directory are ordered by a hidden lock
    beside it.

    Parameters
    ----------
    directory : str or Path
        The directory to replace; its parent is created if missing.
    files : dict[str, bytes]
        File name -> content.
    marker : str
        A file an existing ``directory`` must hold to be replaced: anything
        else there is refused, never overwritten.
    kind : str
        What such a directory is, for the error message.

    Raises
    ------
    ValueError
        If ``directory`` exists without ``marker``.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    with locked(parent / f".{directory.name}"):
        if directory.exists() and not (directory / marker).is_file():
            raise ValueError(f"{directory} exists and is not a {kind} (no {marker}); refusing to replace it.")
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))  # 0700
        aside = None
        try:
            for name, data in files.items():
                descriptor = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
                with os.fdopen(descriptor, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
            _fsync_directory(staging)
            if directory.exists():
                aside = parent / f".{directory.name}.old-{secrets.token_hex(4)}"
                os.rename(directory, aside)
            os.rename(staging, directory)
            _fsync_directory(parent)
        except BaseException:
            if aside is not None and not directory.exists():
                os.rename(aside, directory)
                aside = None
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
