"""A dry run checks the digests its plan names, as kexec would on the files it loads."""

from __future__ import annotations

import contextlib
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


def test_client_signal_handlers_are_restored_unless_an_interrupt_unwinds():
    """run_client makes SIGTERM/SIGINT unwind like Ctrl-C; callers in the same process
    get their handlers back, except after an interrupt, when repeats stay ignored so that
    they cannot cut the NICs' way home short."""
    import signal

    from bootlink.client import boot

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for body_raises in (None, ValueError):
        with contextlib.suppress(ValueError), boot._interrupts_unwind():
            assert signal.getsignal(signal.SIGINT) is boot._interrupt
            if body_raises:
                raise body_raises
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    try:
        with pytest.raises(KeyboardInterrupt), boot._interrupts_unwind():
            boot._interrupt(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
