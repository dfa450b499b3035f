"""Development TLS material for the SuperLink: written on the server host, and nothing else.

    xmfl credentials --out server

Writes a throw-away certificate authority's certificate (``ca.crt``) and the
SuperLink's certificate and key (``server.pem``, ``server.key``, valid for
localhost and 127.0.0.1 plus any ``--host``). The CA's own private key is
used once, to sign ``server.pem``, and never written: nobody can issue a
further certificate that the regions' ``--root-certificates ca.crt`` would
trust (run the command again for another host, and hand the regions the new
``ca.crt``). The key is created readable by its owner only (0600); the
certificates pass ``openssl verify -x509_strict``.

Why no other key is written here: whoever holds a region's SuperNode key can
connect as that region, and whoever holds the app-signing key decides which
code runs on every region's data. So each region makes its own key pair on its
own machine (``xmfl region-keys``) and hands over only its public key, which
the SuperLink registers; the release manager makes the app-signing key offline
(``xmfl app-keys``) and hands the server host only the signed app
(``xmfl sign-app``). The server host holds its TLS key, the regions' public
keys and the signed app. For development only: production certificates come
from your own CA.
"""

import argparse
import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.runtime.command import ArgumentParser, run_command
from deploy.keys import PUBLIC_MODE, write_file, write_private_key

VALID_DAYS = 30  # development credentials should not outlive the experiment
FILES = ("ca.crt", "server.pem", "server.key")  # all this command writes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_credentials(out: Path, hosts: Sequence[str] = ()) -> None:
    """Write the CA's certificate and the SuperLink's certificate and key into ``out``.

    Parameters
    ----------
    out : Path
        The server host's directory for them; created if missing. Files of an
        earlier call are replaced.
    hosts : Sequence[str]
        Host names or IP addresses the SuperLink is reached by, besides
        localhost and 127.0.0.1.

    Raises
    ------
    ValueError
        If a host is empty.
    """
    if any(not host.strip() for host in hosts):
        raise ValueError("A --host value is empty; give the SuperLink's host name or IP address.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
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
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_identifier), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    write_file(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    write_file(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    write_private_key(out / "server.key", server_key, serialization.PrivateFormat.TraditionalOpenSSL)


def main(argv: list[str] | None = None) -> None:
    """Parse the options and write the TLS material.

    Raises
    ------
    ValueError
        If a host is empty (run through :func:`common.command.run_command`: one line, status 2).
    """
    parser = ArgumentParser(
        prog="python -m deploy.make_credentials",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("credentials"), help="output directory (default: %(default)s)")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra SuperLink host name or IP for the certificate; repeatable "
        "(default: none, localhost and 127.0.0.1 only)",
    )
    # Refused with a pointer: region keys are no longer made here.
    parser.add_argument("--regions", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.regions is not None:
        parser.error(
            "--regions is no longer taken: each region makes its own key pair on its own machine "
            "(xmfl region-keys --region NAME) and hands over only NAME.pub, which the SuperLink registers"
        )
    make_credentials(args.out, args.host)
    print(f"Wrote {', '.join(FILES)} to {args.out} (development TLS for the SuperLink; no other key)")


if __name__ == "__main__":
    run_command(main, also=(ValueError,))
