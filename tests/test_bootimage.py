"""A dry run checks the digests its plan names, as kexec would on the files it loads."""

from __future__ import annotations

import hashlib

import pytest

from bootlink.common.bootimage import BootImage, Provenance, check_digests
from bootlink.common.errors import BootlinkError


def _image(tmp_path, kernel_sha: str, initrd_sha: str) -> BootImage:
    return BootImage(
        "test",
        tmp_path / "kernel",
        tmp_path / "initrd",
        "",
        Provenance("link", "fe80::1", "AES-EAX"),
        kernel_sha256=kernel_sha,
        initrd_sha256=initrd_sha,
    )


def test_check_digests(tmp_path):
    (tmp_path / "kernel").write_bytes(b"K" * 5000)
    (tmp_path / "initrd").write_bytes(b"I" * 7)
    good_k = hashlib.sha256(b"K" * 5000).hexdigest()
    good_i = hashlib.sha256(b"I" * 7).hexdigest()
    check_digests(_image(tmp_path, good_k, good_i))
    (tmp_path / "initrd").write_bytes(b"J" * 7)  # changed after the download
    with pytest.raises(BootlinkError, match=r"initrd .* does not match its verified SHA-256"):
        check_digests(_image(tmp_path, good_k, good_i))
    with pytest.raises(BootlinkError, match=r"kernel .* has no verified digest"):
        check_digests(_image(tmp_path, "", good_i))


def test_cmdline_append_reaches_images_from_every_source(tmp_path, monkeypatch):
    from bootlink.client import boot
    from bootlink.common.config import config_from_dict

    image = _image(tmp_path, "", "")
    image = BootImage(image.label, image.kernel, None, "boot=live", image.provenance)

    def resolve_web(spec, cfg, workdir, progress):
        return [image]

    monkeypatch.setattr(boot, "_resolver_for", lambda spec: resolve_web)
    cfg = config_from_dict(
        {
            "key": str(tmp_path / "key"),
            "client": {
                "sources": ["https://example.invalid/x.iso"],
                "cmdline_append": "console=ttyS0",
                "download_dir": str(tmp_path / "dl"),
            },
        }
    )
    assert boot.choose_image(cfg, progress=False).cmdline == "boot=live console=ttyS0"
