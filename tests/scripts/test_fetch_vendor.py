"""scripts/fetch_vendor.py against a registry on disk (a ``file://`` URL): pins, idempotence, clear errors."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support import ROOT, require

_spec = importlib.util.spec_from_file_location("fetch_vendor", ROOT / "scripts" / "fetch_vendor.py")
assert _spec is not None and _spec.loader is not None
fetch_vendor = importlib.util.module_from_spec(_spec)
sys.modules["fetch_vendor"] = fetch_vendor
_spec.loader.exec_module(fetch_vendor)

MEMBERS = {"dist/lib.esm.js": b"export default 1;\n", "dist/lib.min.css": b".x{}\n", "LICENSE": b"MIT\n"}


def tarball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def registry(tmp_path: Path):
    """A registry folder holding ``lib-1.0.0.tgz``, and the package pinned to it."""
    data = tarball(MEMBERS)
    path = tmp_path / "registry" / "lib" / "-" / "lib-1.0.0.tgz"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    pins = {name: hashlib.sha256(content).hexdigest() for name, content in MEMBERS.items()}
    package = fetch_vendor.Package(name="lib", version="1.0.0", integrity=integrity(data), files=pins)
    return f"file://{tmp_path / 'registry'}", path, package


def test_fetches_only_the_pinned_files_then_does_nothing(tmp_path, registry):
    url, path, package = registry
    dest = tmp_path / "vendor"
    assert fetch_vendor.fetch(package, dest=dest, registry=url) is True
    assert sorted(p.name for p in (dest / "lib").iterdir()) == ["LICENSE", "lib.esm.js", "lib.min.css"]
    assert (dest / "lib" / "lib.esm.js").read_bytes() == MEMBERS["dist/lib.esm.js"]
    path.unlink()  # a second run must not need the registry
    assert fetch_vendor.fetch(package, dest=dest, registry=url) is False


def test_a_changed_or_missing_file_is_fetched_again(tmp_path, registry):
    url, _, package = registry
    dest = tmp_path / "vendor"
    fetch_vendor.fetch(package, dest=dest, registry=url)
    (dest / "lib" / "lib.esm.js").write_text("tampered")
    (dest / "lib" / "LICENSE").unlink()
    assert fetch_vendor.fetch(package, dest=dest, registry=url) is True
    assert fetch_vendor.in_place(dest, package)


def test_a_tarball_that_does_not_match_its_integrity_is_refused_before_extracting(tmp_path, registry):
    url, path, package = registry
    path.write_bytes(tarball({**MEMBERS, "LICENSE": b"not MIT\n"}))
    with pytest.raises(fetch_vendor.VendorError, match=r"integrity check failed for file://.*lib-1\.0\.0\.tgz"):
        fetch_vendor.fetch(package, dest=tmp_path / "vendor", registry=url)
    assert not (tmp_path / "vendor").exists()


def test_a_member_that_does_not_match_its_pin_is_refused(tmp_path, registry):
    url, _, package = registry
    pins = {**package.files, "LICENSE": "0" * 64}
    wrong = fetch_vendor.Package(name="lib", version="1.0.0", integrity=package.integrity, files=pins)
    with pytest.raises(fetch_vendor.VendorError, match=r"LICENSE has sha256 .* pinned 0000"):
        fetch_vendor.fetch(wrong, dest=tmp_path / "vendor", registry=url)


def test_download_failures_exit_1_with_one_line(tmp_path, capsys):
    status = fetch_vendor.main(["--dest", str(tmp_path / "vendor"), "--registry", f"file://{tmp_path}/none"])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error: vendor fetch: cannot download file://") and "uplot-" in err


def test_the_pinned_uplot_is_what_the_console_loads():
    assert fetch_vendor.UPLOT.tarball_url("https://registry.npmjs.org/") == (
        f"https://registry.npmjs.org/uplot/-/uplot-{fetch_vendor.UPLOT.version}.tgz"
    )
    names = {Path(member).name for member in fetch_vendor.UPLOT.files}
    assert names == {"uPlot.esm.js", "uPlot.min.css", "LICENSE"}


def test_the_fetched_files_are_static_files_for_collectstatic():
    from django.contrib.staticfiles import finders

    dest = fetch_vendor.DEFAULT_DEST
    require("the fetched uPlot", fetch_vendor.in_place(dest, fetch_vendor.UPLOT), "run: python scripts/fetch_vendor.py")
    for member in fetch_vendor.UPLOT.files:
        found = finders.find(f"gateway/vendor/uplot/{Path(member).name}")
        assert found is not None and Path(str(found)).is_file(), member
