"""Development TLS certificates and SuperNode keys for a local deployment.

    python deploy/make_credentials.py --out credentials --regions de fr jp

Writes a throw-away certificate authority (``ca.crt``), the SuperLink's
certificate and key (``server.pem``, ``server.key``, valid for localhost and
127.0.0.1 plus any ``--host``), and for each region an ECDSA P-384 key pair
in OpenSSH format (``<region>`` and ``<region>.pub``): the SuperNode signs
with the private key, the SuperLink only admits registered public keys.
For development only: production certificates come from your own CA.
"""

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 30  # development credentials should not outlive the experiment


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, encoding: serialization.PrivateFormat) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption()))
    path.chmod(0o600)


def make_credentials(out: Path, regions: list[str], hosts: list[str]) -> None:
    """Write the CA, the SuperLink certificate and one key pair per region into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("xmarket-fl development CA"))
        .issuer_name(_name("xmarket-fl development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .sign(ca_key, hashes.SHA384())
    )
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key, serialization.PrivateFormat.TraditionalOpenSSL)
    (out / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "server.key", server_key, serialization.PrivateFormat.TraditionalOpenSSL)
    for region in regions:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_key(out / region, key, serialization.PrivateFormat.OpenSSH)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (out / f"{region}.pub").write_bytes(public + b"\n")


def main(argv: list[str] | None = None) -> None:
    """Parse the options and write the credentials."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("credentials"), help="output directory (default: %(default)s)")
    parser.add_argument("--regions", nargs="+", required=True, help="one key pair per region name")
    parser.add_argument("--host", action="append", default=[], help="extra SuperLink host name or IP for the certificate")
    args = parser.parse_args(argv)
    make_credentials(args.out, args.regions, args.host)
    print(f"Wrote ca.crt, server.pem, server.key and keys for {', '.join(args.regions)} to {args.out}")


if __name__ == "__main__":
    main()
