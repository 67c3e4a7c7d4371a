"""The connection bundle file: round trip, its mode, and every way a file can fail to be one."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from herder.client.bundle import BUNDLE_KIND, BUNDLE_VERSION, Bundle, read_bundle, write_bundle
from herder.client.errors import SetupError
from herder.services.common.certificates import ensure_ca

TOKEN = "hd_not-a-real-token-but-secret-all-the-same-0123456789"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="file modes are POSIX")


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA certificate of the kind bundles carry."""
    return ensure_ca(tmp_path_factory.mktemp("tls")).pem


@pytest.fixture
def bundle(ca_pem: str) -> Bundle:
    """A robot's bundle for a stack that listens off-host."""
    return Bundle(
        urls=["tls://ts-01.example:4333", "tls://ts-02.example:4333"],
        ca_pem=ca_pem,
        token=TOKEN,
        tenant="acme",
        robot="r1",
        created_at=datetime(2026, 1, 5, 9, 30, tzinfo=UTC),
    )


def rewrite(path: Path, change: dict[str, Any]) -> None:
    """Change fields of the bundle at `path` in place, keeping its mode; `...` removes a field."""
    document = json.loads(path.read_text())
    for key, value in change.items():
        if value is ...:
            del document[key]
        else:
            document[key] = value
    path.write_text(json.dumps(document))


def test_a_bundle_reads_back_as_written(tmp_path: Path, bundle: Bundle) -> None:
    path = tmp_path / "r1.bundle"
    write_bundle(path, bundle)
    assert read_bundle(path) == bundle
    document = json.loads(path.read_text())
    assert (document["kind"], document["version"]) == (BUNDLE_KIND, BUNDLE_VERSION)


def test_a_loopback_bundle_has_no_ca(tmp_path: Path) -> None:
    bundle = Bundle(urls=["nats://127.0.0.1:4222"], ca_pem=None, token=TOKEN)
    write_bundle(tmp_path / "local.bundle", bundle)
    read = read_bundle(tmp_path / "local.bundle")
    assert read == bundle
    assert (read.ca_pem, read.tenant, read.robot) == (None, "default", None)


@posix_only
def test_the_file_is_for_its_owner_alone(tmp_path: Path, bundle: Bundle) -> None:
    previous = os.umask(0)  # even a careless umask does not widen it
    try:
        write_bundle(tmp_path / "r1.bundle", bundle)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "r1.bundle").stat().st_mode) == 0o600


def test_an_existing_file_is_never_overwritten(tmp_path: Path, bundle: Bundle) -> None:
    path = tmp_path / "r1.bundle"
    path.write_text("someone's notes")
    with pytest.raises(SetupError, match="exists already; choose a new file"):
        write_bundle(path, bundle)
    assert path.read_text() == "someone's notes"
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left behind


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620], ids=lambda mode: f"{mode:o}")
def test_a_file_others_can_open_is_refused(tmp_path: Path, bundle: Bundle, mode: int) -> None:
    path = tmp_path / "r1.bundle"
    write_bundle(path, bundle)
    path.chmod(mode)
    with pytest.raises(SetupError, match=rf"chmod 600 {re.escape(str(path))}$") as caught:
        read_bundle(path)
    assert TOKEN not in str(caught.value)


def test_a_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match=r"no bundle at .*herder robot add NAME --bundle FILE"):
        read_bundle(tmp_path / "absent.bundle")


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"\x00\xff not json", "not a herder bundle"),
        (b'{"kind": "herder-bundle", "version": 1, "urls": ["tls://a:1"], "tok', "not a herder bundle"),
        (b"[1, 2, 3]", "not a herder bundle"),
        (b'{"kind": "kubeconfig", "version": 1}', "not a herder bundle"),
    ],
)
def test_a_file_that_is_no_bundle_is_refused(tmp_path: Path, content: bytes, complaint: str) -> None:
    path = tmp_path / "other.bundle"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SetupError, match=complaint):
        read_bundle(path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"urls": []}, "urls"),
        ({"urls": "tls://a:1"}, "urls"),
        ({"token": ...}, "token"),
        ({"token": 42}, "token"),
        ({"ca_pem": "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"}, "ca_pem"),
        ({"tenant": "Not A Tenant"}, "tenant"),
        ({"robot": "a.b"}, "robot"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"version": "1"}, "version"),
    ],
)
def test_a_damaged_bundle_names_the_field_not_the_secret(
    tmp_path: Path, bundle: Bundle, change: dict[str, Any], field: str
) -> None:
    path = tmp_path / "r1.bundle"
    write_bundle(path, bundle)
    rewrite(path, change)
    with pytest.raises(SetupError, match=rf"damaged herder bundle \('{field}' is missing or wrong\)") as caught:
        read_bundle(path)
    assert TOKEN not in str(caught.value)


def test_a_newer_bundle_asks_for_a_newer_herder(tmp_path: Path, bundle: Bundle) -> None:
    path = tmp_path / "r1.bundle"
    write_bundle(path, bundle)
    rewrite(path, {"version": BUNDLE_VERSION + 1, "token": {"new": "shape"}})
    with pytest.raises(SetupError, match=r"version 2 bundle, newer than this herder reads.*upgrade herder"):
        read_bundle(path)


def test_neither_repr_nor_str_shows_the_token(bundle: Bundle) -> None:
    for text in (repr(bundle), str(bundle), f"{bundle}", repr([bundle])):
        assert TOKEN not in text
        assert "BEGIN CERTIFICATE" not in text
    assert "ts-01.example" in repr(bundle)
