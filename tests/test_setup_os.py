"""setup-server-os: shows every change, asks, is idempotent, and --uninstall restores the
tree exactly. Fast tests run on a small synthetic OS tree without regenerating initrds
(--no-initrd); the `qemu`-marked ones run against real Debian roots (initramfs-tools and
dracut, built with mmdebstrap and cached) where the generator really runs in a chroot.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from osroots import copy_root, os_root, tree_digest, tree_map

from bootlink.cli import main
from bootlink.common.config import load_config
from bootlink.common.keys import generate_key_file
from bootlink.server import setup_os

KVER = "6.1.0-99-amd64"
MAC = "02:b1:00:00:00:07"
HOOKS = Path(setup_os.__file__).resolve().parent / "hooks"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, mounts)")


def fake_os(root: Path, generator: str = "initramfs-tools") -> Path:
    """A small OS tree: enough for setup-server-os to detect and plan (no initrd runs)."""
    for d in (
        "etc/systemd/system",
        "etc/udev/rules.d",
        "etc/NetworkManager/conf.d",
        "etc/bootlink",
        "boot",
        f"usr/lib/modules/{KVER}",
        "usr/sbin",
        "usr/bin",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / f"usr/lib/modules/{KVER}/modules.order").write_text("")
    (root / f"boot/vmlinuz-{KVER}").write_bytes(b"kernel")
    (root / f"boot/initrd.img-{KVER}").write_bytes(b"initrd")
    if generator == "initramfs-tools":
        (root / "etc/initramfs-tools/hooks").mkdir(parents=True)
        (root / "usr/sbin/update-initramfs").write_text("#!/bin/sh\n")
    else:
        (root / "usr/lib/dracut/modules.d").mkdir(parents=True)
        (root / "usr/bin/dracut").write_text("#!/bin/sh\n")
    # The user already had a bootlink config of their own: it must come back on uninstall.
    (root / "etc/bootlink/config.yaml").write_text("# my old config\n")
    return root


@pytest.fixture
def laptop(tmp_path):
    generate_key_file(tmp_path / "key")
    rd = tmp_path / "ramdisk-out"
    rd.mkdir()
    (rd / "vmlinuz").write_bytes(os.urandom(4096))
    (rd / "ramdisk.cpio.zst").write_bytes(os.urandom(8192))
    cfg = tmp_path / "laptop.yaml"
    write_cfg(cfg, tmp_path / "key", macs=[MAC])
    return cfg, rd


def write_cfg(path: Path, key: Path, macs=(), usb_ids=(), interfaces=("link0",)) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "key": str(key),
                "link": {"interfaces": list(interfaces)},
                "server": {"disk": "/dev/sda", "boot": {"cmdline": "root=UUID=1 ro"}},
                "autokexec": {"macs": list(macs), "usb_ids": list(usb_ids)},
            }
        )
    )
    return path


def setup(root: Path, *args: str, stdin: str | None = None, monkeypatch=None) -> int:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["setup-server-os", "--root", str(root), *args])


def listed_paths(root: Path) -> set[str]:
    """Every path the manifest accounts for (files, dirs, initrds, backups, itself)."""
    m = json.loads((root / setup_os.MANIFEST.lstrip("/")).read_text())
    out = set(m["files"]) | set(m["dirs"]) | set(m["initrds"]) | {setup_os.MANIFEST}
    out |= {e["backup"] for e in [*m["files"].values(), *m["initrds"].values()] if e["backup"]}
    return out


def changed(before: dict, after: dict) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def test_dry_run_lists_every_change_and_writes_nothing(tmp_path, laptop, capsys):
    cfg, rd = laptop
    root = fake_os(tmp_path / "root")
    before = tree_digest(root)
    assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--dry-run") == 0
    out = capsys.readouterr().out
    assert tree_digest(root) == before
    for path in (
        setup_os.KEY_PATH,
        setup_os.CONFIG_PATH,
        setup_os.UNIT_PATH,
        setup_os.WANTS_PATH,
        setup_os.UDEV_RULES,
        setup_os.NM_CONF,
        "/etc/initramfs-tools/hooks/bootlink",
        "/etc/initramfs-tools/scripts/local-top/bootlink",
        "/etc/initramfs-tools/scripts/local-bottom/bootlink",
        "/var/lib/bootlink/vmlinuz",
        "/var/lib/bootlink/ramdisk.img",
    ):
        assert path in out, f"{path} not listed"
    assert f"update-initramfs -u -k {KVER}" in out
    assert "replace /etc/bootlink/config.yaml" in out and "-# my old config" in out
    assert "content not shown" in out and (tmp_path / "key").read_bytes().hex() not in out
    assert "dry run: nothing was changed" in out


def test_install_is_idempotent_and_uninstall_restores_the_tree(tmp_path, laptop, capsys):
    cfg, rd = laptop
    root = fake_os(tmp_path / "root")
    pristine, pristine_map = tree_digest(root), tree_map(root)
    args = ("--config", str(cfg), "--ramdisk", str(rd), "--yes", "--no-initrd")
    assert setup(root, *args) == 0

    key = root / "etc/bootlink/key"
    assert key.read_bytes() == (tmp_path / "key").read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    installed = load_config(root / "etc/bootlink/config.yaml")
    assert installed.key == "/etc/bootlink/key" and installed.autokexec.macs == [MAC]
    assert os.readlink(root / setup_os.WANTS_PATH.lstrip("/")) == setup_os.UNIT_PATH
    rules = (root / setup_os.UDEV_RULES.lstrip("/")).read_text()
    assert f'ATTR{{address}}=="{MAC}"' in rules and 'ENV{NM_UNMANAGED}="1"' in rules
    nm = (root / setup_os.NM_CONF.lstrip("/")).read_text()
    assert f"unmanaged-devices=mac:{MAC};interface-name:link0" in nm
    for src in (HOOKS / "initramfs-tools").rglob("*"):
        if src.is_file():
            dst = root / "etc/initramfs-tools" / src.relative_to(HOOKS / "initramfs-tools")
            assert dst.read_bytes() == src.read_bytes() and dst.stat().st_mode & 0o777 == 0o755
    assert (root / "var/lib/bootlink/vmlinuz").read_bytes() == (rd / "vmlinuz").read_bytes()
    # It wrote nothing it did not account for.
    assert changed(pristine_map, tree_map(root)) <= listed_paths(root)

    installed_digest = tree_digest(root)
    capsys.readouterr()
    assert setup(root, *args) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert tree_digest(root) == installed_digest

    assert setup(root, "--uninstall", "--yes") == 0
    assert (root / "etc/bootlink/config.yaml").read_text() == "# my old config\n"
    assert tree_digest(root) == pristine
    capsys.readouterr()
    assert setup(root, "--uninstall", "--yes") == 0
    assert "not installed" in capsys.readouterr().out


def test_answers_are_respected(tmp_path, laptop, capsys, monkeypatch):
    cfg, _ = laptop
    root = fake_os(tmp_path / "root")
    pristine = tree_digest(root)
    # nothing on stdin: nothing applied
    assert setup(root, "--config", str(cfg), "--no-initrd", stdin="", monkeypatch=monkeypatch) == 0
    assert "stopped" in capsys.readouterr().out and tree_digest(root) == pristine
    # "n" to the key, then "a"ll the rest
    assert (
        setup(root, "--config", str(cfg), "--no-initrd", stdin="n\na\n", monkeypatch=monkeypatch)
        == 0
    )
    assert not (root / "etc/bootlink/key").exists()
    assert (root / "etc/bootlink/config.yaml").read_text() != "# my old config\n"
    assert (
        setup_os.KEY_PATH
        not in json.loads((root / "var/lib/bootlink/installed.json").read_text())["files"]
    )
    # a later run offers only the key
    capsys.readouterr()
    assert setup(root, "--config", str(cfg), "--no-initrd", "--dry-run") == 0
    assert "1 change(s)" in capsys.readouterr().out
    assert setup(root, "--uninstall", "--yes") == 0
    assert tree_digest(root) == pristine


def test_config_changes_update_and_drop_what_is_no_longer_wanted(tmp_path, laptop, capsys):
    cfg, _ = laptop
    root = fake_os(tmp_path / "root", "dracut")
    pristine = tree_digest(root)
    assert setup(root, "--config", str(cfg), "--yes", "--no-initrd") == 0
    module = root / setup_os.DRACUT_MODULE_DIR.lstrip("/")
    assert sorted(p.name for p in module.iterdir()) == sorted(
        p.name for p in (HOOKS / "dracut" / "90bootlink").glob("*.sh")
    )
    assert "bootlink" in (root / setup_os.DRACUT_CONF.lstrip("/")).read_text()
    # USB adapter instead of a MAC, no named interface: the NM rule has nothing to name.
    write_cfg(cfg, tmp_path / "key", usb_ids=["0BDA:8153"], interfaces=())
    capsys.readouterr()
    assert setup(root, "--config", str(cfg), "--yes", "--no-initrd") == 0
    out = capsys.readouterr().out
    assert f"remove {setup_os.NM_CONF}" in out
    rules = (root / setup_os.UDEV_RULES.lstrip("/")).read_text()
    assert 'ATTRS{idVendor}=="0bda", ATTRS{idProduct}=="8153"' in rules and MAC not in rules
    assert not (root / setup_os.NM_CONF.lstrip("/")).exists()
    assert setup(root, "--uninstall", "--yes") == 0
    assert tree_digest(root) == pristine


def test_refusals_name_the_fix_and_write_nothing(tmp_path, laptop, capsys):
    cfg, _ = laptop
    root = fake_os(tmp_path / "root")
    pristine = tree_digest(root)
    write_cfg(cfg, tmp_path / "key", macs=["aa:bb"])
    assert setup(root, "--config", str(cfg), "--yes") == 2
    assert "aa:bb:cc:dd:ee:ff" in capsys.readouterr().err
    write_cfg(cfg, tmp_path / "key", macs=[MAC])
    (root / "usr/bin/dracut").write_text("")  # both generators: which one?
    assert setup(root, "--config", str(cfg), "--yes") == 2
    assert "--generator" in capsys.readouterr().err
    assert setup(root, "--config", str(cfg), "--yes", "--generator", "dracut", "--dry-run") == 0
    (root / "usr/bin/dracut").unlink()
    assert tree_digest(root) == pristine
    (root / "usr/sbin/update-initramfs").unlink()
    without = tree_digest(root)
    assert setup(root, "--config", str(cfg), "--yes") == 2
    assert "apt-get install initramfs-tools" in capsys.readouterr().err
    assert tree_digest(root) == without


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"garbage{", "Expecting value"),
        (b'{"files": []}', "no 'files' object"),
        (b"[]", "no 'files' object"),
        (b'{"format": 1}', "no 'files' object"),
        (b'{"files": {"vmlinuz": 5}}', "no sha256 for 'vmlinuz'"),
        (b'{"files": {"vmlinuz": {"size": 1}}}', "no sha256 for 'vmlinuz'"),
        (b"\x80{", "invalid start byte"),
    ],
)
def test_bad_ramdisk_manifest_is_one_line_and_changes_nothing(
    tmp_path, laptop, capsys, content, why
):
    cfg, rd = laptop
    (rd / "manifest.json").write_bytes(content)
    root = fake_os(tmp_path / "root")
    before = tree_map(root)
    for extra in ((), ("--no-initrd",), ("--dry-run",)):
        assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--yes", *extra) == 2
        line = one_error_line(capsys)
        assert f"{rd}/manifest.json is not a bootlink ramdisk manifest (" in line, line
        assert why in line and f"rebuild with 'bootlink ramdisk build --output {rd}'" in line
        assert tree_map(root) == before


def test_a_good_ramdisk_manifest_is_checked(tmp_path, laptop, capsys):
    cfg, rd = laptop
    files = {n: {"sha256": setup_os.sha256((rd / n).read_bytes())} for n in ("vmlinuz",)}
    (rd / "manifest.json").write_text(json.dumps({"files": files}))
    root = fake_os(tmp_path / "root")
    assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--dry-run") == 0
    (rd / "vmlinuz").write_bytes(b"changed")
    assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--dry-run") == 2
    assert "does not match" in one_error_line(capsys)


def _make_dir(p: Path) -> None:
    if p.exists():
        p.unlink()
    p.mkdir(parents=True)
    (p / "inside").write_text("keep me\n")


def _make_fifo(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(p)


def _make_file(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("a file where a directory goes\n")


@pytest.mark.parametrize(
    ("where", "make", "needle"),
    [
        (setup_os.CONFIG_PATH, _make_dir, "is a directory, not a file"),
        (setup_os.KEY_PATH, _make_dir, "is a directory, not a file"),
        (setup_os.UNIT_PATH, _make_fifo, "is a FIFO, not a file"),
        (setup_os.WANTS_PATH, _make_dir, "is a directory, not a file"),
        ("/etc/initramfs-tools/scripts", _make_file, "is not a directory but"),
        ("/var/lib/bootlink", _make_file, "is not a directory but"),
        (setup_os.BACKUP_DIR + setup_os.CONFIG_PATH, _make_dir, "is a directory, not a file"),
    ],
)
def test_something_in_the_way_is_refused_before_any_change(
    tmp_path, laptop, capsys, where, make, needle
):
    cfg, rd = laptop
    root = fake_os(tmp_path / "root")
    make(root / where.lstrip("/"))
    before = tree_map(root)
    for extra in ((), ("--dry-run",)):
        args = ("--config", str(cfg), "--ramdisk", str(rd), "--yes", "--no-initrd", *extra)
        assert setup(root, *args) == 2
        line = one_error_line(capsys)
        assert str(root) in line and needle in line, line
        assert "move it out of the way" in line and "nothing was changed" in line
        assert tree_map(root) == before
    assert not (root / setup_os.MANIFEST.lstrip("/")).exists()


def test_uninstall_refuses_a_directory_where_its_file_was(tmp_path, laptop, capsys):
    cfg, rd = laptop
    root = fake_os(tmp_path / "root")
    assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--yes", "--no-initrd") == 0
    _make_dir(root / setup_os.UNIT_PATH.lstrip("/"))
    before = tree_map(root)
    assert setup(root, "--uninstall", "--yes") == 2
    line = one_error_line(capsys)
    assert "is a directory, not a file" in line and "nothing was changed" in line, line
    assert tree_map(root) == before


def test_unreadable_install_manifest_is_one_line(tmp_path, capsys):
    root = fake_os(tmp_path / "root")
    m = root / setup_os.MANIFEST.lstrip("/")
    m.parent.mkdir(parents=True)
    for content in (b'{"files": []}', b"[1]", b'{"files": {"/x": 1}}', b"nope"):
        m.write_bytes(content)
        before = tree_map(root)
        assert setup(root, "--uninstall", "--yes") == 2
        line = one_error_line(capsys)
        assert f"{m} is unreadable (" in line and "restore it or remove it" in line, line
        assert tree_map(root) == before


@needs_root
def test_read_only_root_is_refused_before_any_change(tmp_path, laptop, capsys):
    from smallfs import mounted_tmpfs

    cfg, rd = laptop
    with mounted_tmpfs(tmp_path / "ro", size="4m") as mnt:
        root = fake_os(mnt)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = tree_map(root)
        for extra in (("--no-initrd",), ()):
            args = ("--config", str(cfg), "--ramdisk", str(rd), "--yes", *extra)
            assert setup(root, *args) == 2
            line = one_error_line(capsys)
            assert f"is on a read-only filesystem ({mnt})" in line, line
            assert f"mount -o remount,rw {mnt}" in line and "nothing was changed" in line
            assert tree_map(root) == before
        # a dry run writes nothing, so it still works
        assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--dry-run") == 0
        capsys.readouterr()
        # installed, then the root goes read-only: --uninstall refuses the same way
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--yes", "--no-initrd") == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        installed = tree_map(root)
        capsys.readouterr()
        assert setup(root, "--uninstall", "--yes") == 2
        line = one_error_line(capsys)
        assert "read-only filesystem" in line and "nothing was changed" in line, line
        assert tree_map(root) == installed
        # an up-to-date install on a read-only root has nothing to write: not an error
        assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--yes", "--no-initrd") == 0
        assert "nothing to change" in capsys.readouterr().out
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert setup(root, "--uninstall", "--yes") == 0
        assert tree_map(root) == before


def test_write_failure_mid_way_is_one_line_and_recorded(tmp_path, laptop, capsys, monkeypatch):
    """A write that fails after the up-front checks (a disk error, a full disk): one line,
    the original file untouched, no temporary file, and what was done recorded."""
    cfg, rd = laptop
    root = fake_os(tmp_path / "root")
    pristine = tree_map(root)
    real_write = os.write

    def failing_write(fd, data):
        if bytes(data[:13]) == b"# bootlink co":  # the installed config
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(setup_os.os, "write", failing_write)
    assert setup(root, "--config", str(cfg), "--ramdisk", str(rd), "--yes", "--no-initrd") == 2
    line = one_error_line(capsys)
    assert f"'replace {setup_os.CONFIG_PATH}: bootlink config' failed" in line, line
    assert "No space left on device" in line and "--uninstall" in line
    assert (root / "etc/bootlink/config.yaml").read_text() == "# my old config\n"
    assert not list(root.rglob("*.bootlink-tmp"))
    assert (
        setup_os.KEY_PATH in json.loads((root / setup_os.MANIFEST.lstrip("/")).read_text())["files"]
    )
    monkeypatch.undo()
    assert setup(root, "--uninstall", "--yes") == 0
    assert tree_map(root) == pristine


# --- real Debian roots (slow: the generator runs) ------------------------------------------


def _initrd_listing(root: Path, generator: str, kver: str) -> str:
    tool = ["lsinitramfs"] if generator == "initramfs-tools" else ["lsinitrd"]
    proc = setup_os.Target(root).run([*tool, f"/boot/initrd.img-{kver}"])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _udev_properties(root: Path, mac: str) -> str:
    """What the installed udev rule sets for a NIC with `mac` (udevadm test in the root)."""
    ns = f"blsetup{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "ip",
                "link",
                "add",
                "v0",
                "address",
                mac,
                "type",
                "veth",
                "peer",
                "name",
                "v1",
            ],
            check=True,
        )
        script = (
            f"mount --rbind /sys {root}/sys && mount -t proc proc {root}/proc && "
            f"mount --rbind /dev {root}/dev && chroot {root} udevadm test --action=add "
            "/sys/class/net/v0"
        )
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "unshare", "-m", "sh", "-c", script],
            capture_output=True,
            text=True,
        )
        return proc.stdout + proc.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.qemu
@needs_root
@pytest.mark.parametrize("generator", ["initramfs-tools", "dracut"])
def test_real_debian_root(generator, tmp_path, laptop, capsys):
    cfg, rd = laptop
    pristine_root, kernel = os_root(generator)
    root = copy_root(pristine_root, tmp_path / "root")
    pristine, pristine_map = tree_digest(root), tree_map(root)
    args = ("--config", str(cfg), "--ramdisk", str(rd))

    assert setup(root, *args, "--dry-run") == 0
    assert tree_digest(root) == pristine

    assert setup(root, *args, "--yes") == 0
    listing = _initrd_listing(root, generator, kernel.release)
    assert "nbd-client" in listing and "/nbd.ko" in listing
    hook = "scripts/local-top/bootlink" if generator == "initramfs-tools" else "bootlink-nbd"
    assert hook in listing
    assert changed(pristine_map, tree_map(root)) <= listed_paths(root)
    props = _udev_properties(root, MAC)
    assert "SYSTEMD_WANTS=bootlink-autokexec.service" in props and "NM_UNMANAGED=1" in props
    assert "SYSTEMD_WANTS" not in _udev_properties(root, "02:b1:00:00:00:08")
    nm_state = root / "var/lib/NetworkManager/NetworkManager-intern.conf"
    if (root / "usr/sbin/NetworkManager").exists():  # NetworkManager reads our rule
        had_state = nm_state.exists()
        proc = setup_os.Target(root).run(["NetworkManager", "--print-config"])
        assert proc.returncode == 0, proc.stderr
        assert f"unmanaged-devices=mac:{MAC};interface-name:link0" in proc.stdout, proc.stdout
        if not had_state:  # NetworkManager's own state file, not ours: the test removes it
            nm_state.unlink()

    installed = tree_digest(root)
    capsys.readouterr()
    assert setup(root, *args, "--yes") == 0
    assert "nothing to change" in capsys.readouterr().out
    assert tree_digest(root) == installed

    assert setup(root, "--uninstall", "--yes") == 0
    assert tree_digest(root) == pristine
