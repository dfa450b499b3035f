"""The app-signing key pair, made offline by the release manager: regions trust its public key, nobody else holds it.

    xmfl app-keys --out release

A region's SuperNode runs only apps signed by a key in its
``--trusted-entities`` file, so whoever holds the signing key decides which
code reads every region's data and enforces its privacy ceilings. The key must
therefore never sit on the server host: its operator could then sign any app
and push it to every region. The release manager makes the pair on a machine
of their own, reviews the app, signs it there (``xmfl sign-app``) and hands
the server host only the signed app.

Writes into ``--out``: ``app-signing`` (Ed25519 in OpenSSH format, 0600: it
stays with the release manager), ``app-signing.pub`` and
``trusted-entities.yaml``, which maps the key ID to the public key only and
goes to every region (``flower-supernode --trusted-entities``). An existing
key is replaced only with ``--force``: every region would have to be given the
new ``trusted-entities.yaml``, and would then refuse every app signed before.
"""

import argparse
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.runtime.command import ArgumentParser, run_command
from common.runtime.names import check_name
from deploy.keys import PUBLIC_MODE, check_new, openssh_public_key, write_file, write_private_key

APP_KEY_ID = "xmarket-fl-release"  # the app-signing key's name in trusted-entities.yaml and in each signature
PRIVATE_FILE, PUBLIC_FILE, TRUSTED_FILE = "app-signing", "app-signing.pub", "trusted-entities.yaml"


def make_app_keys(out: Path, key_id: str = APP_KEY_ID, force: bool = False) -> Path:
    """Write the app-signing key pair and ``trusted-entities.yaml`` naming its public key into ``out``.

    Parameters
    ----------
    out : Path
        A directory on the release manager's machine; created if missing.
    key_id : str
        The name regions know the key by; ``xmfl sign-app --key-id`` must give the same.
    force : bool
        Replace an existing key pair.

    Returns
    -------
    Path
        The private key's path.

    Raises
    ------
    ValueError
        If ``key_id`` is not a plain name (:func:`common.names.check_name`), or a key
        exists in ``out`` and ``force`` is not set; nothing is written then.
    """
    check_name(key_id, "key ID")
    out = Path(out)
    check_new([out / PRIVATE_FILE, out / PUBLIC_FILE, out / TRUSTED_FILE], force)
    out.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    public = openssh_public_key(key)
    write_private_key(out / PRIVATE_FILE, key, serialization.PrivateFormat.OpenSSH)
    write_file(out / PUBLIC_FILE, (public + "\n").encode(), PUBLIC_MODE)
    write_file(out / TRUSTED_FILE, f'{key_id}: "{public}"\n'.encode(), PUBLIC_MODE)
    return out / PRIVATE_FILE


def main(argv: list[str] | None = None) -> None:
    """Parse the options and write the key pair.

    Raises
    ------
    ValueError
        If a key exists and ``--force`` is not given, or the key ID is refused (run
        through :func:`common.command.run_command`: one line, status 2).
    """
    parser = ArgumentParser(
        prog="python -m deploy.app_keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("release"),
        help="directory on the release manager's machine, never the server host (default: %(default)s)",
    )
    parser.add_argument(
        "--key-id",
        default=APP_KEY_ID,
        help="the key's name in trusted-entities.yaml and in signatures (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key pair; every region must then be given the new "
        "trusted-entities.yaml (default: off)",
    )
    args = parser.parse_args(argv)
    private = make_app_keys(args.out, args.key_id, args.force)
    print(
        f"Wrote {private} (private: keep it offline, never on the server host), {args.out / PUBLIC_FILE} and "
        f"{args.out / TRUSTED_FILE} (give it to every region)"
    )


if __name__ == "__main__":
    run_command(main, also=(ValueError,))
