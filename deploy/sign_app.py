"""Sign the app offline, where the app-signing key is: the only step that ever reads that key.

    xmfl sign-app --key release/app-signing --out release/app.signed

Builds the FAB of the app (``--app``, by default this installation's: the
checkout or a copy of the installed package) with Flower's own
``build_fab_from_disk``, signs it the way ``flwr app review`` does for Flower
Hub (Ed25519 over ``signed_at`` and the FAB's SHA-256) and writes the FAB,
the key ID, ``signed_at`` and the signature to one file
(:mod:`deploy.signed_app`). The release manager runs this on their own
machine after reviewing the app, and hands the file to the server host, whose
``xmfl app-index --signed-app`` serves it and never sees the key: a server
operator can withhold an app from the regions, but cannot make one they run.
Every change of the app (any file in the FAB) needs a new signature.
"""

import argparse
import time
import warnings
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.runtime.command import ArgumentParser, run_command
from common.runtime.names import check_name
from deploy.app_keys import APP_KEY_ID
from deploy.signed_app import SignedApp, fab_app, save_signed_app, signed_message
from xmfl.app import app_dir


def sign_app(app_dir: Path, key_path: Path, key_id: str = APP_KEY_ID) -> SignedApp:
    """Build the FAB of ``app_dir`` and sign it the way ``flwr app review`` does.

    Parameters
    ----------
    app_dir : Path
        The app's directory (holding ``pyproject.toml``).
    key_path : Path
        An unencrypted Ed25519 private key in OpenSSH format, e.g. ``release/app-signing``.
    key_id : str
        The name regions give the matching public key in their ``--trusted-entities`` file.

    Raises
    ------
    ValueError
        If ``key_path`` is not an unencrypted Ed25519 private key in OpenSSH format.
    """
    from flwr.cli.build import build_fab_from_disk  # Flower only when building

    check_name(key_id, "key ID")
    try:
        key = load_ssh_private_key(Path(key_path).read_bytes(), None)
    except (ValueError, TypeError):
        raise ValueError(
            f"{key_path} is not an unencrypted private key in OpenSSH format, as xmfl app-keys writes it."
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key_path} is not an Ed25519 private key; Flower verifies Ed25519 signatures only.")
    with warnings.catch_warnings():  # Flower 1.41's own use of a deprecated pathspec pattern class
        warnings.simplefilter("ignore", DeprecationWarning)
        fab = build_fab_from_disk(Path(app_dir))
    app_id, version = fab_app(fab)
    signed_at = int(time.time())
    return SignedApp(fab, app_id, version, key_id, key.sign(signed_message(fab, signed_at)), signed_at)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, sign the app and write the signed app file.

    Raises
    ------
    ValueError
        If the key is not an Ed25519 private key or the key ID is refused (run through
        :func:`common.command.run_command`: one line, status 2).
    """
    parser = ArgumentParser(
        prog="python -m deploy.sign_app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--key",
        type=Path,
        required=True,
        help="the Ed25519 app-signing private key xmfl app-keys wrote, e.g. release/app-signing (required)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("app.signed"),
        help="the signed app file to write, for the server host (default: %(default)s)",
    )
    parser.add_argument(
        "--app",
        type=Path,
        default=None,
        help="directory of the app to sign, holding its pyproject.toml (default: this installation's "
        "app, the checkout or a copy of the installed package)",
    )
    parser.add_argument(
        "--key-id",
        default=APP_KEY_ID,
        help="the key's name in the regions' trusted-entities.yaml (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    app = sign_app(args.app or app_dir(), args.key, args.key_id)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_signed_app(app, args.out)
    print(f"Signed {app.spec} (FAB sha256 {app.sha256[:12]}…) with key {app.key_id}; wrote {args.out}")


if __name__ == "__main__":
    run_command(main, also=(ValueError,))
