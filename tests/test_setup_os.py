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
