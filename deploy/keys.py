"""Key files as every party of a deployment writes them, and how a command that must hold no private key refuses one.

Each party makes its own keys on its own machine, so that nobody holds
another's: the release manager the app-signing key (``xmfl app-keys``, offline),
each region its SuperNode key (``xmfl region-keys``), the server host its TLS
key (``xmfl credentials``). What they share is here: a private key is created
readable by its owner only (0600) from its first byte, whatever the umask, and
public files are 0644, so nobody else may rewrite them. A command that runs on
the server host and must never hold a private key (``xmfl app-index``) uses
:func:`refuse_private_key` on every file it is given.
"""

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PRIVATE_MODE = 0o600  # private keys: owner read/write only
PUBLIC_MODE = 0o644  # certificates and public keys: whatever the umask, nobody else may rewrite them
# What every PEM or OpenSSH private key's armour line ends with ("OPENSSH PRIVATE KEY", "EC PRIVATE KEY", ...).
_PRIVATE_ARMOUR = b"PRIVATE KEY-----"


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode`` (not chmod'ed later, whatever the umask).

    An existing file is removed first: opening it for writing would keep its old permissions.
    """
    path = Path(path)
    path.unlink(missing_ok=True)
    # O_EXCL: never follow a link planted at ``path`` between the unlink and the open.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(descriptor, mode)  # the umask may have removed bits of ``mode``; nobody else can open it meanwhile
        file.write(data)


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, encoding: serialization.PrivateFormat
) -> None:
    """Write ``key`` unencrypted in ``encoding`` (PEM armour) to a new file readable by its owner only."""
    write_file(
        path, key.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption()), PRIVATE_MODE
    )


def openssh_public_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """``key``'s public half as one OpenSSH line (``ssh-ed25519 AAAA...``), without a line break."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def check_new(paths: list[Path], force: bool) -> None:
    """Raise ``ValueError`` if one of ``paths`` exists and ``force`` is not set.

    A key pair is replaced on purpose only: whoever relies on the old public
    key (the SuperLink's registration, the regions' trusted entities) would
    have to be given the new one.
    """
    existing = [str(path) for path in paths if Path(path).exists()]
    if existing and not force:
        raise ValueError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: a new key pair would replace "
            "the one others were given; give --force to replace it on purpose."
        )


def holds_private_key(path: Path) -> bool:
    """Whether the file at ``path`` holds a PEM or OpenSSH private key (of any kind, encrypted or not)."""
    with open(path, "rb") as file:
        return _PRIVATE_ARMOUR in file.read()


def refuse_private_key(path: Path, command: str, instead: str) -> None:
    """Raise ``ValueError`` if ``path`` holds a private key, which ``command`` must never be given.

    Parameters
    ----------
    path : Path
        A file given to ``command``.
    command : str
        The command's name, for the message.
    instead : str
        What to give ``command`` in its place, as the end of a sentence.
    """
    if holds_private_key(path):
        raise ValueError(f"{path} holds a private key, and {command} never takes one: {instead}.")
