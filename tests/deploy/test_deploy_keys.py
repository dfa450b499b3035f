"""Who holds which key: each party makes its own, the server host gets public files and the signed app only.

The release manager makes the app-signing key and signs the app offline
(``xmfl app-keys``, ``xmfl sign-app``), each region makes its SuperNode key on
its own machine (``xmfl region-keys``), and the server host's commands
(``xmfl credentials``, ``xmfl app-index``) write its TLS key and nothing else,
and refuse to be given a private key. The signed app is checked here the way
Flower's SuperLink fetches it and its SuperNode verifies it, with Flower's own
functions; ``tests/deploy/test_deploy.py`` runs real SuperNodes refusing apps not
signed with the key they trust.
"""

import ast
import base64
import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.supercore.fab import Fab
from flwr.supercore.utils import request_download_link
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.start_client_internal import _verify_fab

from deploy.app_index import AppIndex, load_apps
from deploy.app_keys import APP_KEY_ID, make_app_keys
from deploy.keys import holds_private_key
from deploy.loopback import APP_DIR
from deploy.make_credentials import make_credentials
from deploy.region_keys import make_region_keys
from deploy.sign_app import sign_app
from deploy.signed_app import load_signed_app, read_trusted_entities, save_signed_app, verify
from tests.cli_check import fails_with
from xmfl import cli

pytestmark = pytest.mark.usefixtures("keep_sigterm_handler")  # tests/conftest.py


def private_keys(folder: Path) -> list[str]:
    """The names of the files below ``folder`` that hold a private key."""
    return sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and holds_private_key(path)
    )


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The release manager's folder: the app-signing key pair, trusted-entities.yaml and the signed app."""
    folder = tmp_path_factory.mktemp("release")
    cli_main(["app-keys", "--out", str(folder)])
    cli_main(["sign-app", "--key", str(folder / "app-signing"), "--out", str(folder / "app.signed")])
    return folder


def cli_main(argv: list[str]) -> None:
    """``xmfl ARGV`` in this process; it must succeed."""
    try:
        cli.main(argv)
    except SystemExit as exited:
        assert exited.code in (0, None), argv


def test_the_server_hosts_credentials_are_its_tls_material_and_no_other_key(tmp_path, capsys):
    # Execute: what the server host runs.
    cli.main(["credentials", "--out", str(tmp_path / "server")])

    # Assert: a CA certificate, the SuperLink's certificate and key; no region's key, no app-signing key, no CA key.
    assert sorted(path.name for path in (tmp_path / "server").iterdir()) == ["ca.crt", "server.key", "server.pem"]
    assert private_keys(tmp_path / "server") == ["server.key"]
    assert "no other key" in capsys.readouterr().out


def test_the_credentials_command_no_longer_makes_region_keys(tmp_path, capsys):
    line = fails_with(capsys, ["credentials", "--out", str(tmp_path / "server"), "--regions", "de,fr"])

    assert "each region makes its own key pair" in line and "xmfl region-keys" in line
    assert line.endswith("(see xmfl credentials --help)")
    assert list(tmp_path.iterdir()) == []


def test_a_region_makes_its_own_key_pair_and_keeps_it_unless_told_to_replace_it(tmp_path, capsys):
    # Execute: on the region's machine.
    cli_main(["region-keys", "--region", "de", "--out", str(tmp_path / "keys")])

    # Assert: an ECDSA P-384 key for Flower's node authentication, its public half in de.pub.
    private = serialization.load_ssh_private_key((tmp_path / "keys" / "de").read_bytes(), None)
    public = (tmp_path / "keys" / "de.pub").read_text()
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert (
        public.strip()
        == private.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    assert private_keys(tmp_path / "keys") == ["de"]
    capsys.readouterr()
    # A second run would replace the key the SuperLink registered: refused unless --force.
    line = fails_with(capsys, ["region-keys", "--region", "de", "--out", str(tmp_path / "keys")])
    assert "already exist" in line and "--force" in line
    assert (tmp_path / "keys" / "de.pub").read_text() == public
    cli_main(["region-keys", "--region", "de", "--out", str(tmp_path / "keys"), "--force"])
    assert (tmp_path / "keys" / "de.pub").read_text() != public


@pytest.mark.parametrize("region", ["../escaped", "{tmp}/absolute", ".hidden", ""])
def test_region_keys_refuse_an_unsafe_region_name_in_one_line_before_writing_anything(tmp_path, region):
    out = tmp_path / "keys"

    finished = subprocess.run(
        [sys.executable, "-m", "deploy.region_keys", "--out", str(out), "--region", region.format(tmp=tmp_path)],
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 2
    assert "is not allowed" in finished.stderr and len(finished.stderr.strip().splitlines()) == 1
    assert "Traceback" not in finished.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_release_manager_hands_regions_the_public_key_only(release):
    # Assert: the private key stays in the release folder; trusted-entities.yaml names exactly its public key.
    key = serialization.load_ssh_private_key((release / "app-signing").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    public = (release / "app-signing.pub").read_text().strip()
    assert read_trusted_entities(release / "trusted-entities.yaml") == {APP_KEY_ID: public}
    assert private_keys(release) == ["app-signing"]
    assert not holds_private_key(release / "app.signed")


def test_a_new_app_key_is_refused_while_one_exists(release, capsys):
    line = fails_with(capsys, ["app-keys", "--out", str(release)])

    assert "already exist" in line and "--force" in line


def test_a_signed_app_verifies_as_flowers_supernode_verifies_it_and_only_with_the_trusted_key(release, tmp_path):
    # Prepare: the signed app, and another release manager's keys that no region trusts.
    app = load_signed_app(release / "app.signed")
    trusted = read_trusted_entities(release / "trusted-entities.yaml")
    make_app_keys(tmp_path / "other")
    other = read_trusted_entities(tmp_path / "other" / "trusted-entities.yaml")

    def flower_verifies(signed, entities) -> bool:  # as the SuperLink passes it on and a SuperNode checks it
        signature = base64.urlsafe_b64encode(signed.signature).rstrip(b"=").decode()
        verification = {"public_key_id": signed.key_id, "signature": signature, "signed_at": signed.signed_at}
        return _verify_fab(Fab(signed.sha256, signed.fab, _format_verification([verification])), entities)

    # Assert: this module's check and Flower's agree; a changed FAB or signing time no longer verifies.
    assert app.spec == "@xmarket-fl/xmarket-fl==0.1.0" and app.key_id == APP_KEY_ID
    assert verify(app, trusted) and flower_verifies(app, trusted)
    assert not verify(app, other) and not flower_verifies(app, other)
    assert not verify(dataclasses.replace(app, fab=app.fab + b"\0"), trusted)
    assert not verify(dataclasses.replace(app, signed_at=app.signed_at + 1), trusted)
    assert not flower_verifies(dataclasses.replace(app, signed_at=app.signed_at + 1), trusted)


def test_a_damaged_signed_app_file_is_refused_when_loaded(release, tmp_path):
    record = json.loads((release / "app.signed").read_text())
    record["fab-sha256"] = "0" * 64
    (tmp_path / "damaged.signed").write_text(json.dumps(record))

    with pytest.raises(ValueError, match="the FAB's SHA-256 is not the fab-sha256 the file gives"):
        load_signed_app(tmp_path / "damaged.signed")


def test_the_app_index_serves_the_presigned_file_the_way_the_superlink_fetches_from_flower_hub(release):
    # Prepare: what the server host is handed, loaded and checked as xmfl app-index does.
    [app] = load_apps([release / "app.signed"], release / "trusted-entities.yaml")

    # Execute: Flower's SuperLink client for Flower Hub against the index.
    with AppIndex([app]) as index:
        url, verifications, _ = request_download_link(app.app_id, app.version, f"{index.url}/hub/fetch-fab", "fab_url")
        fab = requests.get(url, timeout=30).content  # as the SuperLink downloads it

    # Assert: the FAB and signature a region's SuperNode verifies against its trusted entities.
    assert fab == app.fab
    entities = read_trusted_entities(release / "trusted-entities.yaml")
    assert _verify_fab(Fab(app.sha256, fab, _format_verification(verifications)), entities)


def test_the_app_index_refuses_an_oversized_or_malformed_request_without_reading_it(release):
    # Prepare: the index, and a raw connection whose declared length the sender chose.
    [app] = load_apps([release / "app.signed"], release / "trusted-entities.yaml")
    with AppIndex([app]) as index:
        host, port = index.url.removeprefix("http://").split(":")

        def post(length: str, body: bytes = b"") -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as connection:
                head = f"POST /hub/fetch-fab HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
                connection.sendall(head.encode() + body)
                return connection.recv(4096)

        # Execute: a gigabyte declared and none sent; a negative length; a body that is not an object.
        huge, negative, listed = post(str(10**9)), post("-5"), post("2", b"[]")
        superscript, nested = post("\u00b2"), post("4000", b"[" * 4000)
        # Assert: refused at once (no wait for a gigabyte), and the index still serves.
        url, _, _ = request_download_link(app.app_id, app.version, f"{index.url}/hub/fetch-fab", "fab_url")
    assert huge.startswith(b"HTTP/1.0 413") and negative.startswith(b"HTTP/1.0 413")
    assert listed.startswith(b"HTTP/1.0 400") and nested.startswith(b"HTTP/1.0 400")
    assert superscript.startswith(b"HTTP/1.0 413")
    assert url.endswith(app.sha256)


@pytest.mark.parametrize(
    "given",
    [
        ["--key", "{release}/app-signing"],
        ["--signed-app", "{release}/app-signing"],
        ["--signed-app", "{release}/app.signed", "--trusted-entities", "{release}/app-signing"],
    ],
    ids=["--key", "a key as the signed app", "a key as trusted entities"],
)
def test_the_app_index_refuses_a_private_key_in_one_line(release, capsys, given):
    line = fails_with(capsys, ["app-index", *[part.format(release=release) for part in given], "--port", "0"])

    assert "never takes" in line and "private key" in line


def test_the_app_index_refuses_an_app_the_regions_would_refuse(release, tmp_path, capsys):
    # Prepare: the regions trust another key than the one the app was signed with.
    make_app_keys(tmp_path / "other")

    line = fails_with(
        capsys,
        [
            "app-index",
            "--signed-app",
            str(release / "app.signed"),
            "--trusted-entities",
            str(tmp_path / "other" / "trusted-entities.yaml"),
        ],
    )

    assert "is not signed by a key in" in line and "regions that trust only those keys would refuse it" in line


def test_nothing_the_server_host_runs_can_read_a_private_key():
    # The index and the signed-app format load no private key and sign nothing; only sign_app does.
    imported = set()
    for module in ("app_index", "signed_app", "make_credentials", "keys"):
        tree = ast.parse((APP_DIR / "deploy" / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {(module, node.module), *((module, alias.name) for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {(module, alias.name) for alias in node.names}
    forbidden = {"load_ssh_private_key", "load_pem_private_key", "sign_app", "deploy.sign_app", "deploy.app_keys"}

    assert [(module, name) for module, name in imported if name in forbidden] == []


def test_signing_refuses_a_key_that_is_not_an_ed25519_private_key(tmp_path, capsys):
    make_region_keys(tmp_path, "de")

    for key in (tmp_path / "de", tmp_path / "de.pub"):
        line = fails_with(capsys, ["sign-app", "--key", str(key), "--out", str(tmp_path / "app.signed")])
        assert "Ed25519" in line or "OpenSSH" in line
    assert not (tmp_path / "app.signed").exists()


def test_a_saved_signed_app_loads_back_unchanged(release, tmp_path):
    app = sign_app(APP_DIR, release / "app-signing")

    save_signed_app(app, tmp_path / "copy.signed")

    assert load_signed_app(tmp_path / "copy.signed") == app
    assert stat.S_IMODE((tmp_path / "copy.signed").stat().st_mode) == 0o644


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_development_certificates_pass_strict_x509_verification(tmp_path):
    make_credentials(tmp_path, ["superlink.example"])

    verified = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            "sslserver",
            "-CAfile",
            str(tmp_path / "ca.crt"),
            str(tmp_path / "server.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_private_keys_are_created_owner_only_whatever_the_umask(tmp_path, monkeypatch, umask):
    # Prepare: note a file's permissions whenever they are about to be changed after its creation.
    before_chmod: dict[str, int] = {}
    chmod = os.chmod

    def noting_chmod(path, mode, *args, **kwargs):
        before_chmod[Path(path).name] = stat.S_IMODE(os.stat(path).st_mode)
        return chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", noting_chmod)
    previous = os.umask(umask)

    # Execute: every party's keys, twice, the second time over the first one's files, one made readable by others.
    try:
        for force in (False, True):
            make_credentials(tmp_path)
            make_region_keys(tmp_path, "de", force=force)
            make_app_keys(tmp_path, force=force)
            if not force:
                (tmp_path / "de").chmod(0o644)
    finally:
        os.umask(previous)

    # Assert: private keys are 0600, also the rewritten ones, and were never readable by others on the way.
    private = ["server.key", "de", "app-signing"]
    assert {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in private} == dict.fromkeys(private, 0o600)
    assert all(mode & 0o077 == 0 for name, mode in before_chmod.items() if name in private)
    public = ["ca.crt", "server.pem", "de.pub", "app-signing.pub", "trusted-entities.yaml"]
    assert all(stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644 for name in public)
    assert private_keys(tmp_path) == sorted(private)
