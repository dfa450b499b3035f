"""A region's SuperNode key pair, made on the region's own machine: only the public key ever leaves it.

    xmfl region-keys --region de --out /etc/xmarket

The SuperNode proves it is the region with its private key
(``flower-supernode --auth-supernode-private-key``), and the SuperLink admits
only public keys registered with it (``flwr supernode register de.pub``).
Whoever holds a region's private key can connect as that region, answer for it
and be sent what is meant for it, so the region makes the pair itself and hands
over only ``<region>.pub``: neither the server host nor its operator ever holds
the private key.

Writes ``<region>`` (ECDSA P-384 in OpenSSH format, readable by its owner
only: 0600) and ``<region>.pub`` (0644) into ``--out``. An existing key is
replaced only with ``--force``: the SuperLink would have to register the new
public key.
"""

import argparse
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.runtime.command import ArgumentParser, run_command
from common.runtime.names import check_name
from deploy.keys import PUBLIC_MODE, check_new, openssh_public_key, write_file, write_private_key


def make_region_keys(out: Path, region: str, force: bool = False) -> tuple[Path, Path]:
    """Write the region's private key ``out/<region>`` and public key ``out/<region>.pub``.

    Parameters
    ----------
    out : Path
        A directory on the region's machine; created if missing.
    region : str
        The region's (market's) name, which names the files.
    force : bool
        Replace an existing key pair.

    Returns
    -------
    tuple[Path, Path]
        The private key's path and the public key's path.

    Raises
    ------
    ValueError
        If ``region`` is not a safe file name (:func:`common.names.check_name`), or a
        key of that name exists and ``force`` is not set; nothing is written then.
    """
    check_name(region, "region")
    out = Path(out)
    private, public = out / region, out / f"{region}.pub"
    check_new([private, public], force)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_key(private, key, serialization.PrivateFormat.OpenSSH)
    write_file(public, (openssh_public_key(key) + "\n").encode(), PUBLIC_MODE)
    return private, public


def _region_name(text: str) -> str:
    """``--region``'s type: a safe file name, or argparse's one-line usage error."""
    try:
        return check_name(text, "region")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    """Parse the options and write the region's key pair.

    Raises
    ------
    ValueError
        If the key exists and ``--force`` is not given (run through
        :func:`common.command.run_command`: one line, status 2).
    """
    parser = ArgumentParser(
        prog="python -m deploy.region_keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--region",
        type=_region_name,
        required=True,
        help="this region's (market's) name, which names the key files (required)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="directory on this region's machine for the key pair (default: the current directory)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key pair; the SuperLink must then register the new .pub (default: off)",
    )
    args = parser.parse_args(argv)
    private, public = make_region_keys(args.out, args.region, args.force)
    print(f"Wrote {private} (private: keep it on this machine) and {public} (hand it to the SuperLink's operator)")


if __name__ == "__main__":
    run_command(main, also=(ValueError,))
