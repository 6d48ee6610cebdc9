"""The client USB stick: image layout, reproducibility, passphrase-wrapped key, device safety.

Fast: a stand-in kernel and ramdisk (random bytes: the image neither knows nor cares what
they hold), real mkfs.vfat/mtools/syslinux/sfdisk/objcopy. Booting real images is in
tests/qemu/test_usb_boot.py. Device tests use loop devices (root only) as the stick.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import stat
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from bootlink.cli import main
from bootlink.common.bootimage import sha256_file
from bootlink.common.config import load_config
from bootlink.common.errors import BootlinkError, KeyFileError
from bootlink.common.keys import generate_key_file, load_key_file
from bootlink.usb import cli as usb_cli
from bootlink.usb import device, image, keywrap, stick, uki

FAST = keywrap.Params(log2n=10, r=8, p=1)  # the format, not scrypt's cost, is under test
MIB = 1 << 20
EPOCH = 1735689600


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def ramdisk_dir(tmp_path) -> Path:
    """What `bootlink ramdisk build` leaves: vmlinuz, ramdisk.cpio.zst, manifest.json."""
    d = tmp_path / "rd"
    d.mkdir()
    rng = __import__("random").Random(5)
    (d / "vmlinuz").write_bytes(rng.randbytes(900_000))
    (d / "ramdisk.cpio.zst").write_bytes(rng.randbytes(1_700_000))
    files = {
        n: {"size": (d / n).stat().st_size, "sha256": sha256_file(d / n)}
        for n in ("vmlinuz", "ramdisk.cpio.zst")
    }
    manifest = {"format": 1, "kernel": {"release": "6.1.0-test", "version": "1"}, "files": files}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture
def config_path(tmp_path) -> Path:
    key = tmp_path / "key"
    generate_key_file(key)
    cfg = tmp_path / "client.yaml"
    cfg.write_text(f"key: {key}\nclient:\n  timeout: 7\n")
    return cfg


@pytest.fixture(autouse=True)
def _forget_unlocked(monkeypatch):
    monkeypatch.setattr(keywrap, "_unlocked", {})


def _opts(config_path, ramdisk_dir, **kw) -> stick.StickOptions:
    kw.setdefault("epoch", EPOCH)
    kw.setdefault("keywrap_params", FAST)
    return stick.StickOptions(load_config(config_path), ramdisk_dir, **kw)


def _esp_file(img: Path, dest: str, out: Path) -> bytes:
    """A file from the image's ESP, read with mtools at the partition's offset."""
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    subprocess.run(
        ["mcopy", "-n", "-i", f"{img}@@{image.ESP_START}", f"::/{dest}", str(out)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    return out.read_bytes()


def _config_layer_tree(layer: Path, dest: Path) -> Path:
    dest.mkdir()
    data = subprocess.run(["zstd", "-dc", str(layer)], check=True, capture_output=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=dest, check=True)
    return dest


# ---------------------------------------------------------------- keywrap


def test_keywrap_round_trip_and_format():
    secret = os.urandom(32)
    blob = keywrap.wrap(secret, "correct horse", FAST)
    assert len(blob) == keywrap.WRAPPED_SIZE == 88
    assert blob[:5] == b"BLWK\x01" and blob[5:8] == bytes([10, 8, 1])
    assert secret not in blob
    assert keywrap.unwrap(blob, "correct horse") == secret
    # same key and passphrase -> same bytes (a reproducible stick); another -> other bytes
    assert keywrap.wrap(secret, "correct horse", FAST) == blob
    assert keywrap.wrap(secret, "correct horse!", FAST)[-48:] != blob[-48:]
    # explicit random salt/nonce work the same
    other = keywrap.wrap(secret, "pw", FAST, salt=os.urandom(16), nonce=os.urandom(16))
    assert keywrap.unwrap(other, "pw") == secret


def test_keywrap_default_cost_is_real():
    secret = os.urandom(32)
    blob = keywrap.wrap(secret, "pw")
    assert blob[5:8] == bytes([17, 8, 1])  # N=2^17, r=8, p=1: 128 MiB per try
    assert keywrap.unwrap(blob, "pw") == secret


def test_wrong_passphrase_refused():
    blob = keywrap.wrap(os.urandom(32), "right", FAST)
    with pytest.raises(keywrap.WrongPassphrase, match="wrong passphrase"):
        keywrap.unwrap(blob, "wrong")
    with pytest.raises(keywrap.WrongPassphrase):
        keywrap.unwrap(blob, "Right")


@pytest.mark.parametrize("where", [8, 20, 30, 45, 60, 75, 87])  # salt, nonce, ciphertext, tag
def test_tampered_wrapped_key_refused(where):
    blob = bytearray(keywrap.wrap(os.urandom(32), "pw", FAST))
    blob[where] ^= 0x01
    with pytest.raises(keywrap.WrongPassphrase):
        keywrap.unwrap(bytes(blob), "pw")


def test_changed_parameters_are_authenticated_and_bounded():
    secret = os.urandom(32)
    blob = bytearray(keywrap.wrap(secret, "pw", FAST))
    blob[5] = 11  # another N: the header is EAX associated data
    with pytest.raises(keywrap.WrongPassphrase):
        keywrap.unwrap(bytes(blob), "pw")
    blob[5] = 30  # 2^30 * 8 * 128 bytes: refused before scrypt runs
    with pytest.raises(KeyFileError, match="out of range"):
        keywrap.unwrap(bytes(blob), "pw")
    blob = bytearray(keywrap.wrap(secret, "pw", FAST))
    blob[4] = 2
    with pytest.raises(KeyFileError, match="version 2 is not known"):
        keywrap.unwrap(bytes(blob), "pw")
    with pytest.raises(KeyFileError, match="damaged"):
        keywrap.unwrap(keywrap.wrap(secret, "pw", FAST)[:-1], "pw")
    with pytest.raises(KeyFileError, match="empty passphrase"):
        keywrap.wrap(secret, "", FAST)


def _write_key(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data)
    os.close(fd)
    return path


def test_load_key_file_asks_until_right(tmp_path, monkeypatch, capsys):
    secret = os.urandom(32)
    path = _write_key(tmp_path / "key", keywrap.wrap(secret, "open sesame", FAST))
    answers = iter(["nope", "open sesame"])
    prompts = []

    def ask(prompt):
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(keywrap, "ask_console", ask)
    key = load_key_file(path)
    assert key.secret == secret
    err = capsys.readouterr().err
    assert "bootlink: wrong passphrase (4 tries left)\n" in err
    assert f"bootlink: key unlocked (key id {key.key_id()})" in err and "open sesame" not in err
    assert len(prompts) == 2 and str(path) in prompts[0]
    # one prompt per boot: loading the same file again does not ask
    monkeypatch.setattr(keywrap, "ask_console", lambda p: pytest.fail("asked twice"))
    assert load_key_file(path).secret == secret


def test_unlock_gives_up(tmp_path):
    blob = keywrap.wrap(os.urandom(32), "pw", FAST)
    with pytest.raises(KeyFileError, match="3 wrong passphrases"):
        keywrap.unlock(blob, "k", ask=lambda p: "bad", tries=3, err=io.StringIO())
    with pytest.raises(KeyFileError, match="no passphrase given"):
        keywrap.unlock(blob, "k", ask=lambda p: None, err=io.StringIO())


def test_wrapped_key_file_still_needs_mode_0600(tmp_path):
    path = _write_key(tmp_path / "key", keywrap.wrap(os.urandom(32), "pw", FAST))
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)


def test_console_prompt_reads_a_terminal_without_echo():
    master, slave = pty.openpty()
    try:
        err = io.StringIO()
        result = []
        t = threading.Thread(
            target=lambda: result.append(keywrap.ask_console("passphrase: ", fd=slave, err=err))
        )
        t.start()
        deadline = time.monotonic() + 10
        while termios.tcgetattr(slave)[3] & termios.ECHO:  # typed once the prompt shows
            assert time.monotonic() < deadline, "echo never went off"
            time.sleep(0.01)
        os.write(master, b"s3cret words\r")  # Enter as a terminal sends it
        t.join(10)
        assert result == ["s3cret words"]
        assert err.getvalue() == "passphrase: \n"
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # echo restored
        os.set_blocking(master, False)
        echoed = b""
        with contextlib.suppress(BlockingIOError):
            echoed = os.read(master, 4096)
        assert b"s3cret" not in echoed
        os.write(master, b"\x04")  # Ctrl-D on an empty line: no passphrase
        assert keywrap.ask_console("p: ", fd=slave, err=io.StringIO()) is None
    finally:
        os.close(master)
        os.close(slave)


def test_console_prompt_needs_a_terminal(tmp_path):
    with open(tmp_path / "f", "w+") as f, pytest.raises(KeyFileError, match="not a terminal"):
        keywrap.ask_console("p: ", fd=f.fileno(), err=io.StringIO())


# ---------------------------------------------------------------- UKI


def test_pe_checksum_matches_the_stub():
    data = uki.find_stub().read_bytes()
    info = uki.parse_pe(data)
    stored = int.from_bytes(data[info.checksum_offset : info.checksum_offset + 4], "little")
    assert uki.pe_checksum(data, info.checksum_offset) == stored


# ---------------------------------------------------------------- image


def test_image_layout(tmp_path, config_path, ramdisk_dir):
    img = tmp_path / "stick.img"
    built = stick.build_stick(_opts(config_path, ramdisk_dir, append="quiet"), img)
    data = img.read_bytes()
    assert len(data) == built.layout.disk_bytes and len(data) % MIB == 0
    assert stat.S_IMODE(img.stat().st_mode) == 0o600  # holds the key
    # protective MBR with syslinux's GPT-aware boot code
    assert data[: image.BOOT_CODE_SIZE] == image.find_gptmbr().read_bytes()[:440]
    assert data[510:512] == b"\x55\xaa" and data[446 + 4] == 0xEE
    table = json.loads(
        subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, check=True).stdout
    )["partitiontable"]
    assert table["label"] == "gpt" and table["id"] == built.disk_guid
    (part,) = table["partitions"]
    assert part["type"] == image.ESP_TYPE and part["uuid"] == built.esp_guid
    assert part["start"] == 2048 and part["size"] * 512 == built.layout.esp_bytes
    assert part["attrs"] == "LegacyBIOSBootable"
    subprocess.run(["sfdisk", "--verify", str(img)], check=True, capture_output=True)

    esp = data[image.ESP_START : built.layout.esp_end]
    (tmp_path / "esp.img").write_bytes(esp)
    fsck = subprocess.run(["fsck.fat", "-n", str(tmp_path / "esp.img")], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert esp[82:90] == b"FAT32   " and b"SYSLINUX" in esp[:512]  # syslinux's boot sector
    assert int.from_bytes(esp[28:32], "little") == 2048  # hidden sectors: the partition start

    k = ramdisk_dir / "vmlinuz"
    r = ramdisk_dir / "ramdisk.cpio.zst"
    assert _esp_file(img, "bootlink/vmlinuz", tmp_path / "k") == k.read_bytes()
    assert _esp_file(img, "bootlink/ramdisk.zst", tmp_path / "r") == r.read_bytes()
    layer = _esp_file(img, "bootlink/config.zst", tmp_path / "config.zst")
    cfg_text = _esp_file(img, "syslinux/syslinux.cfg", tmp_path / "s.cfg").decode()
    cmdline = "bootlink.role=client console=ttyS0,115200 console=tty0 quiet"
    assert f"APPEND {cmdline}\n" in cfg_text and cfg_text.startswith("SERIAL 0 115200\n")
    assert "INITRD /bootlink/ramdisk.zst,/bootlink/config.zst" in cfg_text
    _esp_file(img, "syslinux/ldlinux.sys", tmp_path / "ldlinux.sys")
    _esp_file(img, "syslinux/ldlinux.c32", tmp_path / "ldlinux.c32")

    efi = _esp_file(img, "EFI/BOOT/BOOTX64.EFI", tmp_path / "BOOTX64.EFI")
    pe = uki.parse_pe(efi)

    def section(name):
        s = pe.section(name)
        return efi[s.raw_offset : s.raw_offset + s.virtual_size]

    assert section(".linux") == k.read_bytes()
    assert section(".initrd") == r.read_bytes() + layer
    assert section(".cmdline").decode() == cmdline
    assert b"ID=bootlink" in section(".osrel")
    linux = pe.section(".linux")
    assert linux.vma == max(s.vma for s in pe.sections) and linux.vma % 4096 == 0
    assert pe.timestamp == 0

    info = json.loads(_esp_file(img, "bootlink/stick.json", tmp_path / "stick.json"))
    assert info["cmdline"] == cmdline and info["kernel"]["release"] == "6.1.0-test"
    assert info["key"]["passphrase"] is False
    assert info["files"]["bootlink/vmlinuz"] == sha256_file(k)

    tree = _config_layer_tree(tmp_path / "config.zst", tmp_path / "layer")
    key = tree / "etc/bootlink/key"
    assert key.read_bytes() == load_key_file(load_config(config_path).key_path).secret
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "key: /etc/bootlink/key" in (tree / "etc/bootlink/config.yaml").read_text()


def test_image_on_a_full_filesystem_is_one_line_and_leaves_nothing(
    tmp_path, config_path, ramdisk_dir
):
    from smallfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "small", size="3m") as small:
        with pytest.raises(BootlinkError) as ei:
            stick.build_stick(_opts(config_path, ramdisk_dir), small / "s.img")
        msg = str(ei.value)
        assert "\n" not in msg and " free but " in msg and "(--image)" in msg, msg
        assert not list(small.iterdir())  # no half-written image, no scratch with the key


def test_passphrase_stick_holds_only_the_wrapped_key(tmp_path, config_path, ramdisk_dir):
    img = tmp_path / "stick.img"
    stick.build_stick(_opts(config_path, ramdisk_dir, passphrase="lost stick"), img)
    secret = load_key_file(load_config(config_path).key_path).secret
    assert secret not in img.read_bytes()
    _esp_file(img, "bootlink/config.zst", tmp_path / "config.zst")
    tree = _config_layer_tree(tmp_path / "config.zst", tmp_path / "layer")
    key = tree / "etc/bootlink/key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert keywrap.is_wrapped(key.read_bytes())
    assert keywrap.unwrap(key.read_bytes(), "lost stick") == secret
    with pytest.raises(keywrap.WrongPassphrase):
        keywrap.unwrap(key.read_bytes(), "found stick")
    info = json.loads(_esp_file(img, "bootlink/stick.json", tmp_path / "stick.json"))
    assert info["key"]["passphrase"] is True


def test_same_inputs_give_the_same_image(tmp_path, config_path, ramdisk_dir):
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    stick.build_stick(_opts(config_path, ramdisk_dir, passphrase="pw"), a)
    time.sleep(2.1)  # FAT timestamps have 2-second steps: the clock must not leak in
    stick.build_stick(_opts(config_path, ramdisk_dir, passphrase="pw"), b)
    assert sha256_file(a) == sha256_file(b)
    # another command line is another image, with other GUIDs
    built = stick.build_stick(_opts(config_path, ramdisk_dir, passphrase="pw", append="x=1"), c)
    assert sha256_file(c) != sha256_file(a)
    assert built.disk_guid not in a.read_bytes().decode("latin1")


def test_sized_image_has_its_backup_gpt_at_the_end(tmp_path, config_path, ramdisk_dir):
    img = tmp_path / "big.img"
    built = stick.build_stick(_opts(config_path, ramdisk_dir, disk_bytes=300 * MIB), img)
    assert img.stat().st_size == 300 * MIB
    assert img.stat().st_blocks * 512 < 100 * MIB  # sparse: the unused middle is a hole
    subprocess.run(["sfdisk", "--verify", str(img)], check=True, capture_output=True)
    data = img.read_bytes()
    assert data[-512:][:8] == b"EFI PART"  # backup header in the last sector
    ext = built.layout.extents()
    assert ext == [(0, built.layout.esp_end), (300 * MIB - 33 * 512, 33 * 512)]
    # everything outside the extents is zero: copying the extents copies the image
    gap = data[built.layout.esp_end : 300 * MIB - 33 * 512]
    assert gap.count(0) == len(gap)


def test_too_small_and_unwritable(tmp_path, config_path, ramdisk_dir):
    with pytest.raises(BootlinkError, match=r"too small: the stick needs \d+ MiB"):
        stick.build_stick(_opts(config_path, ramdisk_dir, disk_bytes=20 * MIB), tmp_path / "x")
    with pytest.raises(BootlinkError, match="does not exist; create it"):
        stick.build_stick(_opts(config_path, ramdisk_dir), tmp_path / "no" / "x.img")
    with pytest.raises(BootlinkError, match="is a directory"):
        stick.build_stick(_opts(config_path, ramdisk_dir), tmp_path)
    assert not list(tmp_path.glob(".bootlink-*"))  # no scratch left behind


def test_ramdisk_not_built_names_the_command(tmp_path, ramdisk_dir):
    with pytest.raises(BootlinkError, match="bootlink ramdisk build --output") as ei:
        stick.load_ramdisk(tmp_path / "nothing")
    assert "\n" not in str(ei.value)
    (ramdisk_dir / "ramdisk.cpio.zst").write_bytes(b"half a build")
    with pytest.raises(BootlinkError, match="does not match its manifest"):
        stick.load_ramdisk(ramdisk_dir)


def test_parse_size():
    assert usb_cli.parse_size("512M") == 512 * MIB
    assert usb_cli.parse_size("8G") == usb_cli.parse_size("8GiB") == 8 << 30
    assert usb_cli.parse_size("8GB") == 8_000_000_000
    assert usb_cli.parse_size("1000") == 1000
    with pytest.raises(BootlinkError, match="like 512M"):
        usb_cli.parse_size("big")


# ---------------------------------------------------------------- CLI


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_image_with_passphrase_from_stdin(
    tmp_path, config_path, ramdisk_dir, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("from a script\n"))
    img = tmp_path / "s.img"
    rc, out, err = _cli(
        capsys, "usb", "create", "--config", str(config_path), "--image", str(img),
        "--ramdisk", str(ramdisk_dir), "--passphrase", "--size", "64M",
    )  # fmt: skip
    assert rc == 0, err
    assert "passphrase-protected" in out and f"sha256: {sha256_file(img)}" in out
    assert img.stat().st_size == 64 * MIB
    _esp_file(img, "bootlink/config.zst", tmp_path / "config.zst")
    key = _config_layer_tree(tmp_path / "config.zst", tmp_path / "t") / "etc/bootlink/key"
    assert (
        keywrap.unwrap(key.read_bytes(), "from a script")
        == load_key_file(load_config(config_path).key_path).secret
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--image", "/nonexistent-dir/s.img"], "directory /nonexistent-dir does not exist"),
        (["--image", "{tmp}/s.img", "--ramdisk", "{tmp}/none"],
         "build it with 'bootlink ramdisk build --output"),
        (["--device", "/dev/bootlink-no-such-stick"], "not found: plug the stick in"),
        (["--device", "{tmp}/s.img"], "not a block device: to write an image file use --image"),
        (["--device", "/dev/null", "--size", "1G"], "--size is for --image only"),
        (["--image", "/dev/null"], "not a regular file: to write a stick use --device"),
        (["--image", "{tmp}/s.img", "--size", "10M"], "too small"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line(tmp_path, config_path, ramdisk_dir, capsys, extra, needle):
    (tmp_path / "s.img").touch()
    argv = ["usb", "create", "--config", str(config_path), "--ramdisk", str(ramdisk_dir)]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2
    assert needle in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- device safety


def _root_disk() -> Path | None:
    """The whole disk under /, found from mountinfo (independently of device.py)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        if parts[4] == "/":
            sysdir = Path(f"/sys/dev/block/{parts[2]}")
            if not sysdir.exists():
                return None
            sysdir = sysdir.resolve()
            disk = sysdir.parent if (sysdir / "partition").exists() else sysdir
            node = Path("/dev") / disk.name
            return node if node.exists() else None
    return None


def test_refuses_the_running_systems_disk():
    disk = _root_disk()
    if disk is None:
        pytest.skip("/ is not on a block device here")
    dev = device.inspect(disk)
    with pytest.raises(BootlinkError, match="root file system: refusing") as ei:
        device.refuse_unsafe(dev)
    assert "\n" not in str(ei.value)


def test_missing_and_non_block_paths(tmp_path):
    with pytest.raises(BootlinkError, match=r"not found: plug the stick in.*lsblk"):
        device.inspect(tmp_path / "sdz")
    (tmp_path / "f").touch()
    with pytest.raises(BootlinkError, match="not a block device"):
        device.inspect(tmp_path / "f")


def test_confirmation(tmp_path):
    dev = device.Device(
        Path("/dev/sdq"), 0, "sdq", 8 << 30, model="ACME Stick", removable=True,
        transport="usb", partitions=["sdq1 7.5G vfat OLD"],
    )  # fmt: skip
    out = io.StringIO()
    with pytest.raises(BootlinkError, match="not confirmed: nothing was written"):
        device.confirm(dev, yes=False, ask=lambda p: "y", out=out)
    shown = out.getvalue()
    assert (
        "ACME Stick (USB, removable), 8.6 GB (8.0 GiB)" in shown and "sdq1 7.5G vfat OLD" in shown
    )
    device.confirm(dev, yes=False, ask=lambda p: "yes", out=io.StringIO())
    device.confirm(dev, yes=True, ask=lambda p: pytest.fail("asked"), out=io.StringIO())


def test_write_image_to_a_file_reads_back(tmp_path, config_path, ramdisk_dir):
    built = stick.build_stick(_opts(config_path, ramdisk_dir, disk_bytes=200 * MIB), tmp_path / "i")
    target = tmp_path / "target"
    with open(target, "wb") as f:
        f.write(b"\xff" * MIB)  # old content the image overwrites
        f.truncate(200 * MIB)
    digest = device.write_image(built.path, target, built.layout.extents(), progress=False)
    src, dst = built.path.read_bytes(), target.read_bytes()
    for off, n in built.layout.extents():
        assert dst[off : off + n] == src[off : off + n]
    assert len(digest) == 64


def test_write_image_detects_a_stick_that_lies(tmp_path, monkeypatch):
    """A stick that acknowledges writes but reads back other bytes (fake capacity, worn
    flash) is caught by the read-back."""
    src = tmp_path / "img"
    src.write_bytes(os.urandom(3 * MIB))
    target = tmp_path / "target"
    target.write_bytes(bytes(3 * MIB))
    real_pread = os.pread

    def pread(fd, n, offset):
        data = real_pread(fd, n, offset)
        if os.readlink(f"/proc/self/fd/{fd}") == str(target) and offset <= 2 * MIB < offset + n:
            i = 2 * MIB - offset
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        return data

    monkeypatch.setattr(device.os, "pread", pread)
    with pytest.raises(BootlinkError, match=r"verification failed: .* the stick may be faulty"):
        device.write_image(src, target, [(0, 3 * MIB)], progress=False)


@contextlib.contextmanager
def _loop(path: Path, partscan: bool = False):
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices")
    cmd = ["losetup", "-f", "--show", *(["-P"] if partscan else []), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop devices here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_cli_writes_a_loop_device_and_verifies(tmp_path, config_path, ramdisk_dir, capsys):
    backing = tmp_path / "stick-backing"
    with open(backing, "wb") as f:
        f.truncate(256 * MIB)
    with _loop(backing) as loop:
        rc, out, err = _cli(
            capsys, "usb", "create", "--config", str(config_path), "--device", str(loop),
            "--ramdisk", str(ramdisk_dir), "--yes",
        )  # fmt: skip
        assert rc == 0, err
        assert "written and read back" in out
        assert "writing" in err and "verifying" in err and str(loop) in err
        subprocess.run(["sfdisk", "--verify", str(loop)], check=True, capture_output=True)
        table = json.loads(subprocess.run(["sfdisk", "-J", str(loop)], capture_output=True,
                                          check=True).stdout)["partitiontable"]  # fmt: skip
        assert table["lastlba"] == 256 * MIB // 512 - 34  # laid out for the whole device
        rc, _, err = _cli(
            capsys, "usb", "create", "--config", str(config_path), "--device", str(loop),
            "--ramdisk", str(ramdisk_dir),
        )  # fmt: skip
        assert rc == 2 and "pass --yes" in err  # no terminal here to confirm on


def _partition_node(loop: Path, n: int, tmp_path: Path) -> Path:
    """/dev/loopXpN, or a node made from sysfs where no udev creates it (containers)."""
    sysfs = Path(f"/sys/class/block/{loop.name}p{n}/dev")
    for _ in range(50):
        if sysfs.exists():
            break
        time.sleep(0.1)
    else:
        pytest.skip("the kernel did not scan the loop device's partitions")
    node = Path(f"{loop}p{n}")
    if not node.exists():
        major, minor = (int(x) for x in sysfs.read_text().split(":"))
        node = tmp_path / f"{loop.name}p{n}"
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
    return node


def test_refuses_a_partition(tmp_path, config_path, ramdisk_dir):
    img = tmp_path / "stick.img"
    stick.build_stick(_opts(config_path, ramdisk_dir), img)
    with _loop(img, partscan=True) as loop:
        part = _partition_node(loop, 1, tmp_path)
        with pytest.raises(BootlinkError, match=f"is a partition of {loop}: give the whole disk"):
            device.inspect(part)


def test_refuses_a_mounted_device(tmp_path):
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
    with _loop(backing) as loop:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        if subprocess.run(["mount", "-o", "ro", str(loop), str(mnt)]).returncode != 0:
            pytest.skip("cannot mount here")
        try:
            with pytest.raises(BootlinkError, match=f"is mounted on {mnt}: unmount it first"):
                device.refuse_unsafe(device.inspect(loop))
            with pytest.raises(BootlinkError, match="exclusively"):  # the kernel agrees
                device.write_image(backing, loop, [(0, 4096)], progress=False)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        device.refuse_unsafe(device.inspect(loop))  # unmounted: fine


def test_refuses_a_small_device(tmp_path, config_path, ramdisk_dir, capsys):
    small = tmp_path / "small"
    with open(small, "wb") as f:
        f.truncate(16 * MIB)
    with _loop(small) as loop:
        rc, _, err = _cli(
            capsys, "usb", "create", "--config", str(config_path), "--device", str(loop),
            "--ramdisk", str(ramdisk_dir), "--yes",
        )  # fmt: skip
        assert rc == 2 and "too small: 16 MiB, the stick needs" in err, err


def test_iso_memory_puts_memmap_on_both_boot_paths(tmp_path, ramdisk_dir):
    # client.iso_memory: the stick's kernel reserves that RAM as legacy pmem (/dev/pmem0),
    # on the UKI's command line and syslinux's alike; without it there is no memmap=.
    key = tmp_path / "key"
    generate_key_file(key)
    cfg = tmp_path / "client.yaml"
    cfg.write_text(f"key: {key}\nclient:\n  iso_memory: 2g!4G\n")
    img = tmp_path / "stick.img"
    stick.build_stick(_opts(cfg, ramdisk_dir, append="quiet"), img)
    cmdline = "bootlink.role=client console=ttyS0,115200 console=tty0 memmap=2G!4G quiet"
    cfg_text = _esp_file(img, "syslinux/syslinux.cfg", tmp_path / "s.cfg").decode()
    assert f"APPEND {cmdline}\n" in cfg_text
    efi = _esp_file(img, "EFI/BOOT/BOOTX64.EFI", tmp_path / "BOOTX64.EFI")
    s = uki.parse_pe(efi).section(".cmdline")
    assert efi[s.raw_offset : s.raw_offset + s.virtual_size].decode() == cmdline
    info = json.loads(_esp_file(img, "bootlink/stick.json", tmp_path / "stick.json"))
    assert info["cmdline"] == cmdline
    assert "memmap" not in stick.kernel_cmdline("quiet", "")
