"""Distro ISOs (webboot-style): layouts built here with pycdlib, kernel+initrd+cmdline out."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
from pathlib import Path

import pytest

from bootlink.client import sources
from bootlink.client.sources import iso
from bootlink.common.config import config_from_dict
from bootlink.common.errors import BootlinkError

pycdlib = pytest.importorskip("pycdlib")

KERNEL = b"MZ fake bzImage " * 300
INITRD = b"070701 fake cpio " * 500

LAYOUTS = {
    "debian-live": {
        "/live/vmlinuz": KERNEL,
        "/live/initrd.img": INITRD,
        "/live/filesystem.squashfs": b"hsqs",
    },
    "ubuntu": {
        "/casper/vmlinuz": KERNEL,
        "/casper/initrd": INITRD,
        "/casper/filesystem.squashfs": b"hsqs",
    },
    "arch": {
        "/arch/boot/x86_64/vmlinuz-linux": KERNEL,
        "/arch/boot/x86_64/initramfs-linux.img": INITRD,
        "/arch/boot/intel-ucode.img": b"ucode",
    },
    "fedora": {
        "/images/pxeboot/vmlinuz": KERNEL,
        "/images/pxeboot/initrd.img": INITRD,
        "/LiveOS/squashfs.img": b"hsqs",
    },
}


def _iso9660_name(component: str, is_file: bool) -> str:
    base, _, ext = component.upper().replace("-", "_").partition(".")
    return f"{base}.{ext.replace('.', '_')};1" if is_file else base


def build_iso(path: Path, files: dict[str, bytes], vol: str, rock_ridge: bool = True) -> Path:
    """An ISO like the distros ship: Rock Ridge long names over ISO9660 8.3-ish names."""
    out = pycdlib.PyCdlib()
    out.new(interchange_level=3, vol_ident=vol, rock_ridge="1.09" if rock_ridge else None)
    made = set()
    for name, data in files.items():
        parts = name.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/" + "/".join(parts[:i])
            if d not in made:
                iso_path = "/" + "/".join(_iso9660_name(p, False) for p in parts[:i])
                kw = {"rr_name": parts[i - 1]} if rock_ridge else {}
                out.add_directory(iso_path, **kw)
                made.add(d)
        iso_path = "/" + "/".join(
            _iso9660_name(p, j == len(parts) - 1) for j, p in enumerate(parts)
        )
        kw = {"rr_name": parts[-1]} if rock_ridge else {}
        out.add_fp(io.BytesIO(data), len(data), iso_path, **kw)
    out.write(str(path))
    out.close()
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("distro", sorted(LAYOUTS))
def test_layout_detected_and_extracted(tmp_path, distro):
    path = build_iso(tmp_path / "d.iso", LAYOUTS[distro], "TEST_LIVE_1")
    info = iso.inspect(path)
    assert info.distro == distro
    assert info.volume_id == "TEST_LIVE_1"
    loc = iso.IsoLocation("1234-ABCD", "/isos/d.iso")
    image = iso.image_from_iso(
        path, tmp_path / "w", source="iso", locator=str(path), verified_by="test", location=loc
    )
    assert image.kernel.read_bytes() == KERNEL
    assert image.initrd.read_bytes() == INITRD
    assert image.kernel_sha256 == hashlib.sha256(KERNEL).hexdigest()
    expected = {
        "debian-live": "boot=live components findiso=/isos/d.iso",
        "ubuntu": "boot=casper iso-scan/filename=/isos/d.iso ---",
        "arch": "img_dev=/dev/disk/by-uuid/1234-ABCD img_loop=/isos/d.iso archisobasedir=arch "
        "archisolabel=TEST_LIVE_1",
        "fedora": "iso-scan/filename=/isos/d.iso root=live:CDLABEL=TEST_LIVE_1 rd.live.image",
    }[distro]
    assert image.cmdline == expected


def test_debian_live_in_ram_goes_into_the_initrd(tmp_path):
    """live-boot loop-mounts an ISO file (fromiso=) but has no nd_pmem in Debian's live
    initrds: a Debian live ISO that exists only in RAM rides in the initrd."""
    path = build_iso(tmp_path / "d.iso", LAYOUTS["debian-live"], "LIVE")
    image = iso.image_from_iso(path, tmp_path / "w", source="web", locator="u", verified_by="t")
    where = iso.INITRD_ISO_PATH
    assert where.endswith(".iso")  # live-boot mounts a fromiso= file only if so named
    assert image.cmdline == f"boot=live components fromiso={where} live-media={where}"
    assert image.extra["initrd_iso"] == where
    # live-boot's mount of a fromiso= file needs loop, which nothing else loads first
    assert image.extra["initrd_hook"].startswith("/scripts/live-premount/")
    assert "modprobe -q loop" in image.extra["initrd_hook_script"]
    assert image.extra["iso_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "memmap" not in image.extra and "memmap" not in image.cmdline
    assert "iso_disposable" not in image.extra  # not ours to delete unless downloaded
    fetched = iso.image_from_iso(
        path, tmp_path / "w2", source="web", locator="u", verified_by="t", downloaded=True
    )
    assert fetched.extra["iso_disposable"] == "1"


@pytest.mark.parametrize("distro", sorted(set(LAYOUTS) - {"debian-live"}))
def test_pmem_mode_cmdline(tmp_path, distro):
    path = build_iso(tmp_path / "d.iso", LAYOUTS[distro], "LIVE")
    image = iso.image_from_iso(path, tmp_path / "w", source="web", locator="u", verified_by="t")
    size_mib = -(-path.stat().st_size // (1 << 20))
    assert image.cmdline.startswith(f"memmap={size_mib}M!4096M ")
    assert image.extra["memmap"] == f"memmap={size_mib}M!4096M"
    where = {
        "ubuntu": "boot=casper",
        "arch": "archisodevice=/dev/pmem0",
        "fedora": "root=live:/dev/pmem0",
    }[distro]
    assert where in image.cmdline


def test_plain_iso9660_without_rock_ridge(tmp_path):
    path = build_iso(tmp_path / "p.iso", LAYOUTS["debian-live"], "PLAIN", rock_ridge=False)
    info = iso.inspect(path)
    assert info.distro == "debian-live"


def test_fedora_installer_uses_stage2(tmp_path):
    files = {k: v for k, v in LAYOUTS["fedora"].items() if "LiveOS" not in k}
    path = build_iso(tmp_path / "f.iso", files, "Fedora-E-dvd")
    image = iso.image_from_iso(
        path,
        tmp_path / "w",
        source="iso",
        locator="x",
        verified_by="t",
        location=iso.IsoLocation("U", "/f.iso"),
    )
    assert "inst.stage2=hd:LABEL=Fedora-E-dvd" in image.cmdline


def test_unknown_layout_refused(tmp_path):
    path = build_iso(tmp_path / "u.iso", {"/boot/readme.txt": b"hi"}, "OTHER")
    with pytest.raises(BootlinkError, match="no known live layout"):
        iso.inspect(path)


def test_resolve_local_iso_with_pinned_hash(tmp_path):
    path = build_iso(tmp_path / "d.iso", LAYOUTS["ubuntu"], "UBU")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = config_from_dict({})
    (image,) = sources.resolve(
        f"iso:{path}#sha256={digest}", cfg, tmp_path / "work", progress=False
    )
    assert image.provenance.source == "iso"
    assert "pinned" in image.provenance.verified_by
    with pytest.raises(BootlinkError, match="refused"):
        sources.resolve(f"iso:{path}#sha256={'0' * 64}", cfg, tmp_path / "work", progress=False)


def test_resolve_iso_from_web_needs_and_checks_hash(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    path = build_iso(root / "arch.iso", LAYOUTS["arch"], "ARCH_202601")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    handler = functools.partial(_QuietHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/arch.iso"
    cfg = config_from_dict({})
    try:
        (image,) = sources.resolve(f"{url}#sha256={digest}", cfg, tmp_path / "w", progress=False)
        assert image.provenance.source == "web" and "archisodevice=/dev/pmem0" in image.cmdline
        assert image.initrd.read_bytes() == INITRD
        with pytest.raises(BootlinkError, match="needs its hash"):
            sources.resolve(url, cfg, tmp_path / "w2", progress=False)
        with pytest.raises(BootlinkError, match="do not boot it"):
            sources.resolve(f"{url}#sha256={'1' * 64}", cfg, tmp_path / "w3", progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
