"""Serve an app signed offline to the SuperLink, the way Flower Hub hands one over; never sign one here.

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

    xmfl app-index --signed-app app.signed --trusted-entities trusted-entities.yaml --port 9094

serves the app the release manager signed offline (``xmfl sign-app``, with a
key that never sits on the server host); start the SuperLink with
``FLWR_SUPERGRID_API_URL=http://127.0.0.1:9094`` and run
``flwr run @xmarket-fl/xmarket-fl==0.1.0 CONNECTION``. It runs next to the
SuperLink, so it never takes a private key: given one (``--key``, or a key
file in place of a signed app or a trusted-entities file) it stops with a
one-line error. With ``--trusted-entities`` it checks each app's signature as
the regions will, before serving it. The index is not trusted: it can
withhold an app but not forge one, because each region checks the signature
against the key in its own ``--trusted-entities`` file. The request format is
Flower 1.41's internal one, hence the ``flwr<1.42`` pin.
"""

import argparse
import base64
import contextlib
import http.server
import json
import threading
from pathlib import Path

from common.runtime.command import ArgumentParser, run_command
from deploy.keys import refuse_private_key
from deploy.signed_app import SignedApp, load_signed_app, read_trusted_entities, verify

NO_KEY_HERE = "sign the app offline with xmfl sign-app, where the app-signing key is, and serve the file it writes"
MAX_REQUEST_BYTES = 4096  # a fetch request names an app and a version: a few dozen bytes


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
            timeout = 10  # seconds a connection may take to send what it declared; then it is dropped

            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path != "/hub/fetch-fab":
                    return self._answer(404, {"detail": f"{self.path} is not served here."})
                length = self.headers.get("Content-Length", "0")
                if not (length.isascii() and length.isdigit()) or int(length) > MAX_REQUEST_BYTES:
                    # Read nothing: the declared length is the sender's to choose.
                    self.close_connection = True
                    return self._answer(413, {"detail": f"A fetch request is at most {MAX_REQUEST_BYTES} bytes."})
                try:
                    request = json.loads(self.rfile.read(int(length)) or b"{}")
                except (ValueError, RecursionError):
                    return self._answer(400, {"detail": "The request body is not JSON."})
                if not isinstance(request, dict):
                    return self._answer(400, {"detail": "The request body is not a JSON object."})
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


def load_apps(paths: list[Path], trusted_entities: Path | None = None) -> list[SignedApp]:
    """The signed apps to serve, each checked against ``trusted_entities`` when given.

    Raises
    ------
    ValueError
        If a file holds a private key (this command never takes one), is not a signed app,
        or carries no signature the trusted entities verify.
    """
    for path in paths:
        refuse_private_key(path, "xmfl app-index", f"{NO_KEY_HERE} with --signed-app")
    if trusted_entities is not None:
        refuse_private_key(
            trusted_entities,
            "xmfl app-index",
            "give --trusted-entities the regions' trusted-entities.yaml, which holds public keys only",
        )
    apps = [load_signed_app(path) for path in paths]
    if trusted_entities is not None:
        trusted = read_trusted_entities(trusted_entities)
        for path, app in zip(paths, apps, strict=True):
            if not verify(app, trusted):
                raise ValueError(
                    f"{path}: {app.spec} is not signed by a key in {trusted_entities} (it names key "
                    f"{app.key_id!r}); regions that trust only those keys would refuse it."
                )
    return apps


def main(argv: list[str] | None = None) -> None:
    """Load the signed apps and serve them until interrupted.

    Raises
    ------
    ValueError
        If a file given holds a private key, is not a signed app, or fails the check against
        ``--trusted-entities`` (run through :func:`common.command.run_command`: one line, status 2).
    """
    parser = ArgumentParser(
        prog="python -m deploy.app_index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--signed-app",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an app signed offline by xmfl sign-app; repeatable (required)",
    )
    parser.add_argument(
        "--trusted-entities",
        type=Path,
        default=None,
        metavar="FILE",
        help="check every app's signature against these public keys, the regions' "
        "trusted-entities.yaml, before serving (default: not checked here; each region checks)",
    )
    parser.add_argument("--port", type=int, default=9094, help="port on 127.0.0.1 (default: %(default)s)")
    # The signing key of earlier versions: refused, with where signing happens now.
    parser.add_argument("--key", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.key is not None:
        parser.error(f"app-index never takes a private key (--key {args.key}): {NO_KEY_HERE} with --signed-app")
    if not args.signed_app:
        parser.error("the following arguments are required: --signed-app")
    apps = load_apps(args.signed_app, args.trusted_entities)
    checked = f", signatures checked against {args.trusted_entities}" if args.trusted_entities else ""
    with AppIndex(apps, args.port) as index:
        served = ", ".join(f"{app.spec} (FAB sha256 {app.sha256[:12]}…, key {app.key_id})" for app in apps)
        print(f"Serving {served} at {index.url}{checked}; Ctrl-C stops.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    run_command(main, also=(ValueError,))
