"""Reproducibility of the real build: two independent builds (no shared cache), the second
pinned to the first one's manifest, give byte-identical ramdisks. Slow (two mmdebstrap
runs and two zstd passes): marked `qemu` with the other slow system tests. Needs root."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bootlink.ramdisk import build, packages

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mmdebstrap --mode=root)"),
]

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))


def _snapshot_sources(dest: Path) -> Path:
    """A frozen copy of the checkout: edits made while the test runs must not count."""
    for name, src in build.bootlink_packages().items():
        folder = dest / src.relative_to(REPO)
        shutil.copytree(src, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        assert name
    shutil.copy2(REPO / "setup.py", dest / "setup.py")
    return dest


def test_two_builds_are_byte_identical(tmp_path):
    src = _snapshot_sources(tmp_path / "src")
    # The kernel download may come from the shared cache; the root and layers may not.
    first_cache, second_cache = tmp_path / "c1", tmp_path / "c2"
    (CACHE / "kernel").mkdir(parents=True, exist_ok=True)
    for c in (first_cache, second_cache):
        c.mkdir()
        (c / "kernel").symlink_to(CACHE / "kernel")
    level = build.DEFAULT_ZSTD_LEVEL  # the product's
    a = build.build(
        build.BuildOptions(
            output=tmp_path / "a", cache=first_cache, zstd_level=level, source_root=src
        )
    )
    pins = packages.load_pins(tmp_path / "a" / "manifest.json")
    b = build.build(
        build.BuildOptions(
            output=tmp_path / "b", cache=second_cache, zstd_level=level, pins=pins,
            use_cache=False, source_root=src,
        )
    )  # fmt: skip
    fa, fb = a.manifest["files"], b.manifest["files"]
    assert fa == fb, f"builds differ:\n{json.dumps(fa, indent=1)}\n{json.dumps(fb, indent=1)}"
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()
    size = fa["ramdisk.cpio.zst"]["size"]
    print(f"ramdisk {size / 1e6:.1f} MB sha256 {fa['ramdisk.cpio.zst']['sha256']}")
    assert size <= 32 * 1000 * 1000, f"ramdisk is {size / 1e6:.1f} MB, target is 32 MB"
