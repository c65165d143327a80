#!/usr/bin/env python3
"""Fetch the console's one third-party front-end library (uPlot) from the npm registry, checked, never committed.

The tarball's address and its ``dist.integrity`` (sha512, as the registry publishes it) are pinned below; the
tarball is checked against it before anything is extracted, and only the files the console loads are kept, each
also pinned by sha256. A second run with the files present and matching does nothing (no network). Standard library
only, so ``scripts/lib.sh``, CI and the deploy install script can all run it before the project is installed:

    python3 scripts/fetch_vendor.py [--dest DIR] [--registry URL]

Exit status 0 when the files are in place, 1 with one line naming what failed (download, hash, missing member).
To move to a new version: ``npm view uplot@VERSION dist.integrity``, update ``UPLOT``, run this script, and pin the
printed sha256 of each file.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "gateway" / "static" / "gateway" / "vendor"
DEFAULT_REGISTRY = "https://registry.npmjs.org"
DOWNLOAD_TIMEOUT = 60
DOWNLOAD_MAX_BYTES = 20 * 1024 * 1024


class VendorError(Exception):
    """A fetch that cannot complete; the message says what and where."""


@dataclass(frozen=True)
class Package:
    """An npm tarball, pinned by its registry integrity, and the members (package path -> sha256) to keep."""

    name: str
    version: str
    integrity: str
    files: dict[str, str]

    def tarball_url(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.name}/-/{self.name}-{self.version}.tgz"


UPLOT = Package(
    name="uplot",
    version="1.6.32",
    integrity="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==",
    files={
        "dist/uPlot.esm.js": "5dd9b3281aa64b461b42d9945f6adb2649d346502b12281a9ae0d46599a80eba",
        "dist/uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
        "LICENSE": "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd",
    },
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def target(dest: Path, package: Package, member: str) -> Path:
    """Where a kept member goes: ``DEST/NAME/<file name>`` (``dist/`` dropped)."""
    return dest / package.name / Path(member).name


def in_place(dest: Path, package: Package) -> bool:
    """Whether every kept file exists with its pinned sha256."""
    for member, digest in package.files.items():
        path = target(dest, package, member)
        if not path.is_file() or sha256(path.read_bytes()) != digest:
            return False
    return True


def download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:  # noqa: S310 (https, pinned)
            data: bytes = response.read(DOWNLOAD_MAX_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise VendorError(f"cannot download {url}: {exc}") from exc
    if len(data) > DOWNLOAD_MAX_BYTES:
        raise VendorError(f"{url} is larger than {DOWNLOAD_MAX_BYTES} bytes; refusing it")
    return data


def check_integrity(data: bytes, integrity: str, url: str) -> None:
    """Compare with an npm ``dist.integrity`` string (``sha512-<base64>``)."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise VendorError(f"unsupported integrity algorithm {algorithm!r} pinned for {url}")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise VendorError(f"integrity check failed for {url}: expected sha512-{expected}, got sha512-{actual}")


def extract(data: bytes, package: Package) -> dict[str, bytes]:
    """The kept members' bytes (npm tarballs put everything under ``package/``), each checked by sha256."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member, digest in package.files.items():
            try:
                info = archive.getmember(f"package/{member}")
            except KeyError:
                raise VendorError(f"{package.name}-{package.version} has no {member}") from None
            handle = archive.extractfile(info) if info.isfile() else None
            if handle is None:
                raise VendorError(f"{package.name}-{package.version}: {member} is not a regular file")
            content = handle.read()
            if sha256(content) != digest:
                raise VendorError(
                    f"{package.name}-{package.version}: {member} has sha256 {sha256(content)}, pinned {digest}"
                )
            found[member] = content
    return found


def write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(content)
    temporary = Path(handle.name)
    temporary.chmod(0o644)
    temporary.replace(path)


def fetch(package: Package, *, dest: Path, registry: str) -> bool:
    """Put the package's kept files under ``dest``; returns False when they were already there."""
    if in_place(dest, package):
        return False
    url = package.tarball_url(registry)
    data = download(url)
    check_integrity(data, package.integrity, url)
    for member, content in extract(data, package).items():
        write_atomically(target(dest, package, member), content)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"default: {DEFAULT_DEST}")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"default: {DEFAULT_REGISTRY}")
    args = parser.parse_args(argv)
    try:
        fetched = fetch(UPLOT, dest=args.dest, registry=args.registry)
    except VendorError as exc:
        print(f"error: vendor fetch: {exc}", file=sys.stderr)
        return 1
    if fetched:
        print(f"Fetched {UPLOT.name} {UPLOT.version} into {args.dest / UPLOT.name} (integrity checked).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
