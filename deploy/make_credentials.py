"""Development TLS certificates and SuperNode keys for a local deployment.

    python -m deploy.make_credentials --out credentials --regions de,fr,jp

Writes a throw-away certificate authority (``ca.crt``), the SuperLink's
certificate and key (``server.pem``, ``server.key``, valid for localhost and
127.0.0.1 plus any ``--host``), and for each region an ECDSA P-384 key pair
in OpenSSH format (``<region>`` and ``<region>.pub``): the SuperNode signs
with the private key, the SuperLink only admits registered public keys.
It also writes the app-signing key pair (``app-signing``, Ed25519) and
``trusted-entities.yaml``, which names its public key for every region's
``flower-supernode --trusted-entities``: regions then run only an app signed
with that key (see ``deploy/app_index.py``).
Private keys are created readable by their owner only (0600); certificates
pass ``openssl verify -x509_strict``.
For development only: production certificates come from your own CA.
"""

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.command import ArgumentParser, comma_list, run_command
from common.names import check_name

VALID_DAYS = 30  # development credentials should not outlive the experiment
APP_KEY_ID = "xmarket-fl-release"  # the app-signing key's name in trusted-entities.yaml
# A region's files must not replace these.
FIXED_FILES = (
    "ca.crt", "ca.key", "server.pem", "server.key", "app-signing", "app-signing.pub", "trusted-entities.yaml"
)
PRIVATE_MODE = 0o600  # private keys: owner read/write only
PUBLIC_MODE = 0o644  # certificates and public keys: whatever the umask, nobody else may rewrite them


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode`` (not chmod'ed later, whatever the umask).

    An existing file is removed first: opening it for writing would keep its old permissions.
    """
    path.unlink(missing_ok=True)
    # O_EXCL: never follow a link planted at ``path`` between the unlink and the open.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(descriptor, mode)  # the umask may have removed bits of ``mode``; nobody else can open it meanwhile
        file.write(data)


def _write_key(
    path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, encoding: serialization.PrivateFormat
) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption()), PRIVATE_MODE)


def check_regions(regions: list[str]) -> None:
    """Raise ``ValueError`` unless every region name is a safe file name of its own.

    A name must pass :func:`common.names.check_name`, differ from the others also
    when case is ignored (some filesystems ignore it) and not be one of the CA's
    or the SuperLink's files.
    """
    seen: dict[str, str] = {}
    for region in regions:
        check_name(region, "region")
        if region in FIXED_FILES:
            raise ValueError(f"region name {region!r} is not allowed: it would replace the file {region}.")
        if region.casefold() in seen:
            raise ValueError(
                f"region names {seen[region.casefold()]!r} and {region!r} are given twice (case is ignored): "
                "their key files would replace each other."
            )
        seen[region.casefold()] = region


def make_credentials(out: Path, regions: list[str], hosts: list[str]) -> None:
    """Write the CA, the SuperLink certificate and one key pair per region into ``out``.

    Raises
    ------
    ValueError
        If a region name is not allowed (see :func:`check_regions`); nothing is written then.
    """
    check_regions(regions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_identifier = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("xmarket-fl development CA"))
        .issuer_name(_name("xmarket-fl development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_identifier, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("xmarket-fl superlink"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # An EC key signs the TLS handshake; key encipherment is for RSA key transport only.
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_identifier), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write_key(out / "ca.key", ca_key, serialization.PrivateFormat.TraditionalOpenSSL)
    _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write_key(out / "server.key", server_key, serialization.PrivateFormat.TraditionalOpenSSL)
    for region in regions:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_key(out / region, key, serialization.PrivateFormat.OpenSSH)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(out / f"{region}.pub", public + b"\n", PUBLIC_MODE)
    app_key = ed25519.Ed25519PrivateKey.generate()
    _write_key(out / "app-signing", app_key, serialization.PrivateFormat.OpenSSH)
    public = app_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / "app-signing.pub", public + b"\n", PUBLIC_MODE)
    _write(out / "trusted-entities.yaml", f'{APP_KEY_ID}: "{public.decode()}"\n'.encode(), PUBLIC_MODE)


def main(argv: list[str] | None = None) -> None:
    """Parse the options and write the credentials.

    Raises
    ------
    ValueError
        If a region name is refused (run through :func:`common.command.run_command`: one line, status 2).
    """
    parser = ArgumentParser(prog="python -m deploy.make_credentials", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("credentials"), help="output directory (default: %(default)s)")
    # nargs="+": the space-separated form of before issue 17 (--regions de fr jp) still works.
    parser.add_argument("--regions", nargs="+", required=True, metavar="REGION,...",
                        help="comma-separated region names, one key pair each, e.g. de,fr,jp (required)")
    parser.add_argument("--host", action="append", default=[], help="extra SuperLink host name or IP for the certificate; repeatable "
                             "(default: none, localhost and 127.0.0.1 only)")
    args = parser.parse_args(argv)
    args.regions = [region for entry in args.regions for region in comma_list(entry)]
    if not args.regions:
        parser.error("--regions needs at least one region name")
    make_credentials(args.out, args.regions, args.host)
    print(
        f"Wrote ca.crt, server.pem, server.key, keys for {', '.join(args.regions)}, "
        f"app-signing and trusted-entities.yaml to {args.out}"
    )


if __name__ == "__main__":
    run_command(main, also=(ValueError,))
