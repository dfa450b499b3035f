"""A signed app as one file: what the release manager hands the server host, and how anyone checks it.

``xmfl sign-app`` writes it offline, where the app-signing key is;
``xmfl app-index`` on the server host serves it. The file holds the FAB, the
signing key's ID, ``signed_at`` and the Ed25519 signature Flower 1.41's
SuperNode checks (over ``signed_at`` as 8 bytes big-endian followed by the
FAB's SHA-256 digest), and no secret. Nothing here reads a private key: the
server host can load, check and serve a signed app, never make one.

The file is JSON (format ``xmarket-fl signed app``, version 1)::

    {"format": "xmarket-fl signed app", "version": 1, "app": "@xmarket-fl/xmarket-fl==0.1.0",
     "fab-sha256": "...", "key-id": "xmarket-fl-release", "signed-at": 1700000000,
     "signature": "<base64url, unpadded>", "fab": "<base64>"}

The app's name and version are read from the FAB itself when loading, and must
match ``app``.
"""

import base64
import binascii
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from deploy.keys import PUBLIC_MODE, write_file

FORMAT, VERSION = "xmarket-fl signed app", 1


@dataclass(frozen=True)
class SignedApp:
    """A FAB and one signature of it, as Flower Hub lists them."""

    fab: bytes
    app_id: str  # "@publisher/name"
    version: str
    key_id: str
    signature: bytes
    signed_at: int

    @property
    def spec(self) -> str:
        """What ``flwr run`` names the app by: ``@publisher/name==version``."""
        return f"{self.app_id}=={self.version}"

    @property
    def sha256(self) -> str:
        """The FAB's SHA-256, as Flower names FABs."""
        return hashlib.sha256(self.fab).hexdigest()


def signed_message(fab: bytes, signed_at: int) -> bytes:
    """What the app-signing key signs, a SuperNode verifies: ``signed_at`` (8 bytes, big-endian), then SHA-256(FAB)."""
    return signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()


def fab_app(fab: bytes) -> tuple[str, str]:
    """The app ID (``@publisher/name``) and version written in the FAB's own ``pyproject.toml``.

    Raises
    ------
    ValueError
        If ``fab`` is not a FAB whose metadata Flower can read.
    """
    from flwr.common.config import get_fab_config, get_metadata_from_config  # Flower only where a FAB is read

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            fab_id, version = get_metadata_from_config(get_fab_config(fab))
    except Exception as error:  # Flower raises several kinds for a broken archive or config
        raise ValueError(f"The FAB's pyproject.toml cannot be read: {error}") from None
    return f"@{fab_id}", version


def save_signed_app(app: SignedApp, path: Path) -> None:
    """Write ``app`` to ``path`` (0644: it holds no secret) in the format of this module."""
    record = {
        "format": FORMAT,
        "version": VERSION,
        "app": app.spec,
        "fab-sha256": app.sha256,
        "key-id": app.key_id,
        "signed-at": app.signed_at,
        "signature": base64.urlsafe_b64encode(app.signature).rstrip(b"=").decode("ascii"),
        "fab": base64.b64encode(app.fab).decode("ascii"),
    }
    write_file(Path(path), (json.dumps(record, indent=1) + "\n").encode(), PUBLIC_MODE)


def load_signed_app(path: Path) -> SignedApp:
    """Read a signed app that :func:`save_signed_app` wrote (its signature is not checked here: :func:`verify`).

    Raises
    ------
    ValueError
        If the file is not such a signed app, or its FAB does not match what the file says of it.
    FileNotFoundError
        If there is no file at ``path``.
    """
    path = Path(path)
    problem = f"{path} is not a signed app written by xmfl sign-app"
    try:
        record = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{problem}: it is not JSON.") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{problem}: its format is not {FORMAT!r}.")
    if record.get("version") != VERSION:
        raise ValueError(f"{problem} of version {VERSION}: it says version {record.get('version')!r}.")
    try:
        fab = base64.b64decode(record["fab"], validate=True)
        signature = base64.urlsafe_b64decode(record["signature"] + "=" * (-len(record["signature"]) % 4))
        key_id, signed_at, spec, sha256 = record["key-id"], record["signed-at"], record["app"], record["fab-sha256"]
    except KeyError as missing:
        raise ValueError(f"{problem}: it has no {missing.args[0]!r}.") from None
    except (TypeError, binascii.Error):
        raise ValueError(f"{problem}: its fab or signature is not base64 text.") from None
    if not isinstance(key_id, str) or type(signed_at) is not int or not 0 <= signed_at < 2**63:
        raise ValueError(f"{problem}: key-id must be text and signed-at a time in whole seconds since 1970.")
    if hashlib.sha256(fab).hexdigest() != sha256:
        raise ValueError(f"{path}: the FAB's SHA-256 is not the fab-sha256 the file gives; the file is damaged.")
    app_id, version = fab_app(fab)
    if f"{app_id}=={version}" != spec:
        raise ValueError(f"{path}: the FAB is the app {app_id}=={version}, but the file says {spec}.")
    return SignedApp(fab, app_id, version, key_id, signature, signed_at)


def read_trusted_entities(path: Path) -> dict[str, str]:
    """Key IDs mapped to OpenSSH Ed25519 public keys, from a file as ``flower-supernode --trusted-entities`` reads.

    Raises
    ------
    ValueError
        If the file is not a YAML mapping of names to public-key text.
    """
    try:
        entities = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ValueError(f"{path} is not a trusted-entities YAML file.") from None
    if not isinstance(entities, dict) or not all(isinstance(v, str) for v in entities.values()):
        raise ValueError(f"{path} is not a trusted-entities file: it must map key IDs to public keys.")
    return {str(key_id): key for key_id, key in entities.items()}


def verify(app: SignedApp, trusted: dict[str, str]) -> bool:
    """Whether a region trusting these entities would run ``app``: its key ID is trusted, its signature verifies."""
    text = trusted.get(app.key_id)
    if text is None:
        return False
    try:
        key = load_ssh_public_key(text.encode("utf-8"))
    except (ValueError, UnsupportedAlgorithm):
        return False
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return False
    try:
        key.verify(app.signature, signed_message(app.fab, app.signed_at))
    except InvalidSignature:
        return False
    return True
