"""Pin the app regions run: a signed FAB, handed to the SuperLink the way Flower Hub hands one over.

A SuperNode runs whatever app (FAB) the SuperLink gives it. Flower 1.41 lets
a region refuse any other app: ``flower-supernode --trusted-entities FILE``
maps key IDs to Ed25519 public keys, and the SuperNode then runs only a FAB
carrying a signature by one of them over ``signed_at`` and the FAB's SHA-256;
anything else gets an error reply ("The FAB could not be verified."). The
SuperLink attaches signatures only to apps it fetches from Flower Hub
(``flwr run @publisher/app==version``), from ``$FLWR_SUPERGRID_API_URL/hub/fetch-fab``;
an app sent from a checkout (``flwr run .``) carries none, so pinned
SuperNodes refuse it. This module stands in for that Hub endpoint on a
machine without internet:

    python -m deploy.app_index --key credentials/app-signing --port 9094

signs the app with the release key (what ``flwr app review`` does for Flower
Hub) and serves it; start the SuperLink with
``FLWR_SUPERGRID_API_URL=http://127.0.0.1:9094`` and run
``flwr run @xmarket-fl/xmarket-fl==0.1.0 CONNECTION``. The index is not
trusted: it can withhold an app but not forge one, because each region checks
the signature against the key in its own ``--trusted-entities`` file. The
request format is Flower 1.41's internal one, hence the ``flwr<1.42`` pin.
"""

import argparse
import base64
import hashlib
import http.server
import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config, get_metadata_from_config

from common.command import ArgumentParser, run_command
from deploy.make_credentials import APP_KEY_ID
from xmfl.app import app_dir


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


def sign_app(app_dir: Path, key_path: Path, key_id: str = APP_KEY_ID) -> SignedApp:
    """Build the FAB of ``app_dir`` and sign it the way ``flwr app review`` does.

    Parameters
    ----------
    app_dir : Path
        The app's directory (holding ``pyproject.toml``).
    key_path : Path
        An Ed25519 private key in OpenSSH format, e.g. ``credentials/app-signing``.
    key_id : str
        The name regions give the matching public key in their ``--trusted-entities`` file.
    """
    key = load_ssh_private_key(Path(key_path).read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key_path} is not an Ed25519 private key; Flower verifies Ed25519 signatures only.")
    with warnings.catch_warnings():  # Flower 1.41's own use of a deprecated pathspec pattern class
        warnings.simplefilter("ignore", DeprecationWarning)
        fab = build_fab_from_disk(Path(app_dir))
    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    signed_at = int(time.time())
    # Flower's message: the time as 8 bytes big-endian, then the FAB's SHA-256 digest.
    signature = key.sign(signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest())
    return SignedApp(fab, f"@{fab_id}", version, key_id, signature, signed_at)


class AppIndex:
    """Flower Hub's ``fetch-fab`` endpoint for the apps given, on loopback, in a thread.

    Parameters
    ----------
    apps : list[SignedApp]
        The apps to serve; :meth:`publish` adds or replaces one.
    port : int
        The port to listen on; 0 picks a free one (see :attr:`url`).
    """

    def __init__(self, apps: list[SignedApp], port: int = 0) -> None:
        self.apps = {app.spec: app for app in apps}
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path != "/hub/fetch-fab":
                    return self._answer(404, {"detail": f"{self.path} is not served here."})
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                spec = f"{request.get('app_id')}=={request.get('app_version')}"
                if (app := index.apps.get(spec)) is None:
                    return self._answer(404, {"detail": f"No app {spec} is served here."})
                signature = base64.urlsafe_b64encode(app.signature).rstrip(b"=").decode("ascii")
                verification = {"public_key_id": app.key_id, "signature": signature, "signed_at": app.signed_at}
                return self._answer(200, {"fab_url": f"{index.url}/fab/{app.sha256}", "verifications": [verification]})

            def do_GET(self) -> None:  # noqa: N802
                fabs = {f"/fab/{app.sha256}": app.fab for app in index.apps.values()}
                if self.path not in fabs:
                    return self._answer(404, {"detail": f"{self.path} is not served here."})
                self._send(200, fabs[self.path], "application/octet-stream")

            def _answer(self, status: int, body: dict) -> None:
                self._send(status, json.dumps(body).encode(), "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="app-index", daemon=True)
        self._thread.start()

    def publish(self, app: SignedApp) -> None:
        """Serve ``app`` from now on, in place of any app of the same name and version."""
        self.apps[app.spec] = app

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "AppIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    """Sign the app and serve it until interrupted."""
    parser = ArgumentParser(prog="python -m deploy.app_index", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=None,
                        help="directory of the app to sign, holding its pyproject.toml (default: this installation's app, "
                             "the checkout or a copy of the installed package)")
    parser.add_argument("--key", type=Path, required=True,
                        help="Ed25519 signing key, e.g. credentials/app-signing (required)")
    parser.add_argument("--port", type=int, default=9094, help="port on 127.0.0.1 (default: %(default)s)")
    args = parser.parse_args(argv)
    app = sign_app(args.app or app_dir(), args.key)
    with AppIndex([app], args.port) as index:
        print(f"Serving {app.spec} (FAB sha256 {app.sha256[:12]}…) at {index.url}; Ctrl-C stops.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    run_command(main, also=(ValueError,))
