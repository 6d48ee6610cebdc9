"""Fast parts of the ramdisk: recipe, pins, packing reproducibility, /init's cmdline parsing,
module closure, ELF dependency pruning, the config layer and the shell scripts' syntax."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bootlink.common.config import config_from_dict
from bootlink.common.errors import BootlinkError
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import boot, build, elfdeps, pack, packages
from bootlink.ramdisk import kernel as kmod

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "ramdisk" / "files" / "init"
HOOK = REPO / "server" / "hooks" / "initramfs-tools" / "hooks" / "bootlink"
LOCAL_TOP = REPO / "server" / "hooks" / "initramfs-tools" / "scripts" / "local-top" / "bootlink"


# --- recipe and pins -------------------------------------------------------------------


def test_package_list_sorted_and_optional_kexec_tools():
    base = packages.package_list()
    assert base == sorted(base)
    assert "python3-libnbd" in base and "nbdkit" in base and "kexec-tools" not in base
    assert "kexec-tools" in packages.package_list(with_kexec_tools=True)


def test_parse_pins_lines_and_manifest():
    pins = packages.parse_pins("# comment\npython3=3.11.2-1+b1\nlibc6:amd64 2.36-9\n\n")
    assert pins == {"python3": "3.11.2-1+b1", "libc6": "2.36-9"}
    manifest = {"packages": [{"name": "zstd", "version": "1.5.4+dfsg2-5", "installed_kib": 1}]}
    assert packages.parse_pins(json.dumps(manifest)) == {"zstd": "1.5.4+dfsg2-5"}
    with pytest.raises(BootlinkError, match="expected 'package=version'"):
        packages.parse_pins("just-a-name\n", "pins.txt")
    with pytest.raises(BootlinkError, match="no 'packages' list"):
        packages.parse_pins('{"files": {}}')


def test_apt_preferences_pins_every_package():
    text = packages.apt_preferences({"b": "2", "a": "1"})
    assert text.index("Package: a") < text.index("Package: b")
    assert "Pin: version 1\nPin-Priority: 1001" in text


def test_mmdebstrap_command_and_cache_key_follow_the_inputs(tmp_path):
    opts = build.BuildOptions(output=tmp_path, cache=tmp_path)
    pkgs = packages.package_list()
    cmd = build.mmdebstrap_command(Path("/t"), pkgs, opts, ())
    assert "--variant=essential" in cmd and "--mode=root" in cmd
    assert "--include=" + ",".join(pkgs) in cmd
    assert any("path-exclude=/usr/share/doc/*" in c for c in cmd)
    assert any("merged-usr" in c for c in cmd)  # no usrmerge package (it pulls perl)
    assert not any('bootlink-pins"' in c and "printf" in c for c in cmd)
    pinned = build.BuildOptions(output=tmp_path, cache=tmp_path, pins={"python3": "3.11.2-1"})
    pcmd = build.mmdebstrap_command(Path("/t"), pkgs, pinned, ())
    assert any("Pin: version 3.11.2-1" in c for c in pcmd)
    assert build.rootfs_key(pkgs, opts, ()) != build.rootfs_key(pkgs, pinned, ())
    assert build.rootfs_key(pkgs, opts, ()) == build.rootfs_key(list(pkgs), opts, ())


def test_check_pins_names_the_mismatch():
    got = [{"name": "python3", "version": "2"}]
    build.check_pins({"python3": "2"}, got)
    with pytest.raises(BootlinkError, match="python3 1 \\(got 2\\)"):
        build.check_pins({"python3": "1"}, got)


# --- packing ---------------------------------------------------------------------------


def _make_tree(root: Path, order: list[str]) -> None:
    for name in order:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content of {name}\n")
    os.symlink("b/c.txt", root / "link")
    (root / "b" / "c.txt").chmod(0o755)


def test_cpio_and_zstd_are_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _make_tree(a, ["x.txt", "b/c.txt", "b/a.txt", "z/y"])
    _make_tree(b, ["z/y", "b/a.txt", "x.txt", "b/c.txt"])  # other creation order and inodes
    os.utime(b / "x.txt", (12345, 12345))
    outs = []
    for tree in (a, b):
        cpio = tmp_path / f"{tree.name}.cpio"
        pack.pack_cpio(tree, cpio, epoch=1_700_000_000)
        pack.zstd_compress(cpio, tmp_path / f"{tree.name}.cpio.zst", level=3)
        outs.append(((cpio).read_bytes(), (tmp_path / f"{tree.name}.cpio.zst").read_bytes()))
    assert outs[0] == outs[1]
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=outs[0][0], capture_output=True, check=True
    ).stdout.decode()
    names = [ln.split(" -> ")[0].split()[-1] for ln in listing.splitlines()]
    assert names == [".", "b", "b/a.txt", "b/c.txt", "link", "x.txt", "z", "z/y"]
    assert "-rwxr-xr-x" in listing and " root " in listing
    # a different epoch is a different archive
    pack.pack_cpio(a, tmp_path / "c.cpio", epoch=1_700_000_001)
    assert (tmp_path / "c.cpio").read_bytes() != outs[0][0]


def test_sorted_paths_is_bytewise():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for n in ("B", "a", "_", "a.b", "a-b"):
            (root / n).write_text("")
        assert pack.sorted_paths(root) == sorted(pack.sorted_paths(root))
        assert pack.sorted_paths(root)[1:] == [b"./B", b"./_", b"./a", b"./a-b", b"./a.b"]


# --- the config layer and bootlink's files ---------------------------------------------


def test_config_layer_holds_config_and_key_0600(tmp_path):
    key = tmp_path / "key"
    generate_key_file(key)
    cfg = config_from_dict({"key": str(key), "server": {"disk": "/dev/vda"}})
    extra = tmp_path / "vmlinuz"
    extra.write_bytes(b"kernel bytes")
    layer = tmp_path / "config.cpio.zst"
    build.config_layer(cfg, layer, 1_700_000_000, {"etc/bootlink/boot/vmlinuz": extra})
    assert stat.S_IMODE(layer.stat().st_mode) == 0o600  # it holds the key
    raw = subprocess.run(["zstd", "-dc", str(layer)], capture_output=True, check=True).stdout
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=out, check=True)
    data = (out / "etc/bootlink/config.yaml").read_text()
    assert "key: /etc/bootlink/key" in data and "disk: /dev/vda" in data
    assert (out / "etc/bootlink/key").read_bytes() == key.read_bytes()
    assert stat.S_IMODE((out / "etc/bootlink/key").stat().st_mode) == 0o600
    assert (out / "etc/bootlink/boot/vmlinuz").read_bytes() == b"kernel bytes"


def test_bee_layer_carries_an_executable_bee_and_refuses_anything_else(tmp_path):
    bee = tmp_path / "bee"
    bee.write_bytes(b"\x7fELF" + os.urandom(1000))
    bee.chmod(0o755)
    layer = tmp_path / "bee.cpio.zst"
    build.bee_layer(bee, layer, 1_700_000_000)
    raw = subprocess.run(["zstd", "-dc", str(layer)], capture_output=True, check=True).stdout
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=out, check=True)
    got = out / build.BEE_PATH.lstrip("/")
    assert got.read_bytes() == bee.read_bytes()
    assert stat.S_IMODE(got.stat().st_mode) == 0o755  # client.bee_node runs it
    # refused before a build starts: not executable, not a program, missing
    bee.chmod(0o644)
    with pytest.raises(BootlinkError, match=r"^--bee .*: not an executable program: pass"):
        build.check_bee_binary(bee)
    text = tmp_path / "notes.txt"
    text.write_text("not a program")
    text.chmod(0o755)
    with pytest.raises(BootlinkError, match="not an executable program"):
        build.check_bee_binary(text)
    with pytest.raises(BootlinkError, match="No such file or directory: pass the Bee binary"):
        build.check_bee_binary(tmp_path / "missing")


def test_install_bootlink_copies_sources_per_package_dir(tmp_path):
    n = build.install_bootlink(tmp_path)
    dist = tmp_path / "usr/lib/python3/dist-packages/bootlink"
    assert n > 10
    for rel in ("cli.py", "__main__.py", "common/config.py", "ramdisk/boot.py",
                "ramdisk/files/init", "server/hooks/initramfs-tools/hooks/bootlink"):  # fmt: skip
        assert (dist / rel).is_file(), rel
    assert not list(dist.rglob("__pycache__")) and not list(dist.rglob("*.pyc"))
    assert not (dist / "client" / "sources" / "sources").exists()


# --- /init's Python half ---------------------------------------------------------------


def test_parse_cmdline_roles_overrides_and_reserved_keys():
    a = boot.parse_cmdline(
        "console=ttyS0 bootlink.role=server bootlink.config=/etc/x.yaml quiet "
        "bootlink.server.disk=/dev/nvme0n1 bootlink.link.interfaces=[eth1,eth2] "
        "bootlink.client.timeout=12.5 bootlink.server.read_only=true "
        'bootlink.args="--dry-run --json" bootlink.nbd_host=fe80::1 bootlink.key=/k'
    )
    assert a.role == "server" and a.config == Path("/etc/x.yaml")
    assert a.args == ["--dry-run", "--json"]
    assert a.overrides == {
        "server": {"disk": "/dev/nvme0n1", "read_only": True},
        "link": {"interfaces": ["eth1", "eth2"]},
        "client": {"timeout": 12.5},
        "key": "/k",
    }
    assert boot.parse_cmdline("root=/dev/sda1").role == "client"


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("bootlink.role=laptop", "use one of server, client, selftest"),
        ("bootlink.disk=/dev/sda", "not a config key"),
        ("bootlink.server=/dev/sda", "not a config key"),
        ("bootlink.role", "has no value"),
        ('bootlink.args="--dry-run', "does not parse"),
    ],
)
def test_parse_cmdline_rejects_with_the_fix(cmdline, message):
    with pytest.raises(boot.BootArgsError, match=message):
        boot.parse_cmdline(cmdline)


def test_resolve_config_merges_embedded_file_and_overrides(tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text("key: /etc/bootlink/key\nserver: {disk: /dev/sda, read_only: true}\n")
    args = boot.parse_cmdline("bootlink.server.disk=/dev/vda bootlink.link.mtu=9000")
    data = boot.resolve_config(args, embedded=f)
    assert data == {
        "key": "/etc/bootlink/key",
        "server": {"disk": "/dev/vda", "read_only": True},
        "link": {"mtu": 9000},
    }
    config_from_dict(data)  # and it is a valid config
    with pytest.raises(boot.BootArgsError, match="no config"):
        boot.resolve_config(boot.parse_cmdline(""), embedded=tmp_path / "missing.yaml")
    with pytest.raises(boot.BootArgsError, match="no such file"):
        boot.resolve_config(boot.parse_cmdline(f"bootlink.config={tmp_path}/nope"))


# --- kernel modules --------------------------------------------------------------------


def test_select_modules_adds_deps_and_softdeps_via_alias():
    index = kmod.ModuleIndex(
        deps={
            "kernel/fs/ext4/ext4.ko": ["kernel/fs/jbd2/jbd2.ko", "kernel/lib/crc16.ko"],
            "kernel/fs/jbd2/jbd2.ko": [],
            "kernel/lib/crc16.ko": [],
            "kernel/crypto/crc32c_generic.ko": [],
            "kernel/drivers/net/usb/r8152.ko": ["kernel/drivers/net/mii.ko"],
            "kernel/drivers/net/mii.ko": [],
            "kernel/drivers/gpu/huge.ko": [],
        },
        by_name={},
        softdeps={"ext4": ["crc32c"]},
        aliases=[("crypto-crc32c", "crc32c_generic"), ("crc32c", "crc32c_generic")],
    )
    index.by_name.update({kmod._modname(m): m for m in index.deps})
    got = kmod.select_modules(index, ["fs/ext4/*", "drivers/net/usb/*"])
    assert got == sorted([
        "kernel/fs/ext4/ext4.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/lib/crc16.ko",
        "kernel/crypto/crc32c_generic.ko", "kernel/drivers/net/usb/r8152.ko",
        "kernel/drivers/net/mii.ko",
    ])  # fmt: skip


def _cached_kernel_modules() -> Path | None:
    cache = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
    found = sorted(cache.glob("kernel/linux-image-*/root/lib/modules/*/modules.dep"))
    return found[-1].parent if found else None


def test_legacy_pmem_modules_and_their_modaliases_are_in_the_ramdisk():
    # memmap=SIZE!START makes a built-in e820_pmem platform device: nd_e820 binds it (by
    # modalias), nd_pmem the namespace nd_e820 creates; /init loads both by name too.
    mdir = _cached_kernel_modules()
    if mdir is None:
        pytest.skip("no Debian kernel in the cache (bootlink ramdisk build fetches it)")
    index = kmod.read_index(mdir)
    got = {kmod._modname(m) for m in kmod.select_modules(index, packages.MODULE_GLOBS)}
    assert {"libnvdimm", "nd_e820", "nd_pmem", "nd_btt"} <= got
    assert (
        "CONFIG_X86_PMEM_LEGACY_DEVICE=y"
        in next((mdir.parents[2] / "boot").glob("config-*")).read_text()
    )
    aliases = dict((pat, mod) for pat, mod in index.aliases)
    assert aliases["platform:e820_pmem*"] == "nd_e820" and aliases["nd:t4*"] == "nd_pmem"
    init = INIT.read_text()
    assert "memmap=*!*) want_pmem=1" in init
    assert '[ -n "$want_pmem" ] && modprobe -a -b -q nd_e820 nd_pmem' in init


# --- ELF dependency pruning ------------------------------------------------------------


def test_elf_needed_and_unused_libraries(tmp_path):
    py = Path(os.path.realpath(sys.executable))
    deps = elfdeps.needed(py)
    assert deps is not None and "libc.so.6" in deps
    assert elfdeps.needed(Path(__file__)) is None  # not ELF
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    need = [d for d in deps if (libdir / d).exists() and not d.startswith(elfdeps.KEEP_PREFIXES)]
    unused_src = next(p for p in (libdir / "libbz2.so.1.0", libdir / "liblzma.so.5") if p.exists())
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    shutil.copy2(py, root / "usr/bin/python3")
    for d in need:
        shutil.copy2(libdir / d, root / "usr/lib/x86_64-linux-gnu" / d)
    if unused_src.name not in need:
        shutil.copy2(unused_src, root / "usr/lib/x86_64-linux-gnu" / unused_src.name)
    os.mkfifo(root / "usr/bin/a-fifo")  # must not block the scan
    unused = [p.name for p in elfdeps.unused_libraries(root)]
    assert unused == ([] if unused_src.name in need else [unused_src.name])


def fake_elf(path: Path, needs: list[str], soname: str = "") -> None:
    """A minimal 64-bit ELF shared object: one PT_LOAD over the file, a PT_DYNAMIC with
    DT_STRTAB, DT_SONAME and DT_NEEDED entries (what elfdeps.needed reads)."""
    strtab = b"\0"
    offsets = []
    for name in [soname, *needs]:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    ehdr, phdr = 64, 56
    str_off = ehdr + 2 * phdr
    dyn_off = (str_off + len(strtab) + 7) // 8 * 8
    entries = [(elfdeps.DT_STRTAB, str_off)]
    if soname:
        entries.append((elfdeps.DT_SONAME, offsets[0]))
    entries += [(elfdeps.DT_NEEDED, o) for o in offsets[1:]]
    entries.append((elfdeps.DT_NULL, 0))
    dyn = b"".join(struct.pack("<qQ", t, v) for t, v in entries)
    size = dyn_off + len(dyn)
    head = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, ehdr, 0, 0, ehdr, phdr, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", elfdeps.PT_LOAD, 5, 0, 0, 0, size, size, 0x1000)
    dynamic = struct.pack("<IIQQQQQQ", elfdeps.PT_DYNAMIC, 6, dyn_off, dyn_off, dyn_off,
                          len(dyn), len(dyn), 8)  # fmt: skip
    data = (head + load + dynamic + strtab).ljust(dyn_off, b"\0") + dyn
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def fake_debian_root(root: Path) -> set[str]:
    """A merged-/usr tree shaped like the ramdisk's; returns the libraries nothing needs."""
    lib = root / "usr/lib/x86_64-linux-gnu"

    def library(real: str, soname: str, needs: list[str], link: str = "") -> None:
        fake_elf(lib / real, needs, soname)
        (lib / soname).symlink_to(link or real)

    for top in ("bin", "sbin", "lib"):
        (root / "usr" / top).mkdir(parents=True, exist_ok=True)
        (root / top).symlink_to("usr/" + top)
    # ip -> libbsd -> libmd: libmd is reached only through another library
    fake_elf(root / "usr/sbin/ip", ["libbsd.so.0", "libc.so.6"])
    library("libbsd.so.0.11.7", "libbsd.so.0", ["libmd.so.0"])
    library("libmd.so.0.0.5", "libmd.so.0", ["libc.so.6"])
    # `import nbd`: a Python extension -> libnbd -> libxml2 -> ICU; ICU's soname link is
    # absolute (must resolve inside the root, not on the build host)
    fake_elf(root / "usr/lib/python3/dist-packages/libnbdmod.cpython-311-x86_64-linux-gnu.so",
             ["libnbd.so.0"])  # fmt: skip
    library("libnbd.so.0.0.0", "libnbd.so.0", ["libxml2.so.2"])
    library("libxml2.so.2.9.14", "libxml2.so.2", ["libicuuc.so.72"])
    library("libicuuc.so.72.1", "libicuuc.so.72", ["libicudata.so.72"],
            link="/usr/lib/x86_64-linux-gnu/libicuuc.so.72.1")  # fmt: skip
    library("libicudata.so.72.1", "libicudata.so.72", [])
    # a soname link into the other library folder, whose target needs one more library
    fake_elf(root / "usr/lib/libfoo.so.1.0", ["libbar.so.1"], "libfoo.so.1")
    (lib / "libfoo.so.1").symlink_to("../libfoo.so.1.0")
    library("libbar.so.1.0", "libbar.so.1", [])
    fake_elf(root / "usr/bin/foo", ["libfoo.so.1"])
    # a kept nbdkit plugin (sub-folder: not a candidate itself) and its library
    fake_elf(lib / "nbdkit/plugins/nbdkit-file-plugin.so", ["libz.so.1"])
    library("libz.so.1.2.13", "libz.so.1", [])
    # left behind by removed plugins: libcurl -> libssh2, both unused
    library("libcurl.so.4.8.0", "libcurl.so.4", ["libssh2.so.1", "libz.so.1"])
    library("libssh2.so.1.0.1", "libssh2.so.1", [])
    fake_elf(lib / "libc.so.6", [])  # KEEP_PREFIXES
    return {"libcurl.so.4", "libcurl.so.4.8.0", "libssh2.so.1", "libssh2.so.1.0.1"}


@pytest.mark.parametrize("how", ["absolute", "relative", "through-a-symlink"])
def test_unused_libraries_keeps_everything_needed_transitively(tmp_path, monkeypatch, how):
    # Regression: with a relative root (`ramdisk build --cache cache`), Path.resolve()
    # made the soname links' targets absolute, their DT_NEEDED were never followed, and
    # libmd, libxml2 and ICU were pruned: `ip` and `import nbd` failed in the image.
    real = tmp_path / "real" / "root"
    expected = fake_debian_root(real)
    root = real
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        root = Path("real/root")
    elif how == "through-a-symlink":
        (tmp_path / "link").symlink_to("real")
        root = tmp_path / "link" / "root"
    assert elfdeps.needed(real / "usr/sbin/ip") == ["libbsd.so.0", "libc.so.6"]
    unused = elfdeps.unused_libraries(root)
    assert {p.name for p in unused} == expected
    assert all(p.parent == root / "usr/lib/x86_64-linux-gnu" for p in unused)
    before = elfdeps.missing_libraries(root)
    assert before == {}
    elfdeps.prune_unused_libraries(root)
    assert elfdeps.missing_libraries(root) == {}
    elfdeps.check_nothing_lost(root, before)
    left = {p.name for p in (real / "usr/lib/x86_64-linux-gnu").iterdir()}
    assert not left & expected
    assert {"libmd.so.0.0.5", "libxml2.so.2.9.14", "libicudata.so.72.1", "libbar.so.1.0"} <= left


def test_check_nothing_lost_names_the_lost_library_but_not_old_gaps(tmp_path):
    root = tmp_path / "root"
    fake_debian_root(root)
    # missing before pruning (tc's q_atm.so needs libatm, which only a Recommends brings)
    fake_elf(root / "usr/lib/x86_64-linux-gnu/tc/q_atm.so", ["libatm.so.1"])
    before = elfdeps.missing_libraries(root)
    assert before == {"usr/lib/x86_64-linux-gnu/tc/q_atm.so": ["libatm.so.1"]}
    elfdeps.check_nothing_lost(root, before)
    (root / "usr/lib/x86_64-linux-gnu/libmd.so.0.0.5").unlink()
    with pytest.raises(
        BootlinkError, match=r"/usr/lib/x86_64-linux-gnu/libbsd.so.0.11.7 needs libmd.so.0"
    ):
        elfdeps.check_nothing_lost(root, before)


def test_resolve_in_stays_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "usr/lib/a").symlink_to("/lib/b")
    (root / "usr/lib/loop").symlink_to("loop")
    assert elfdeps.resolve_in(root, Path("lib/a")) == Path("usr/lib/b")
    assert elfdeps.resolve_in(root, Path("usr/lib/../../../etc")) == Path("etc")
    elfdeps.resolve_in(root, Path("usr/lib/loop"))  # ends


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_prune_programs_keeps_what_runs_and_links_busybox_applets(tmp_path):
    root = tmp_path / "root"
    for d in packages.PROGRAM_DIRS:
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "usr/bin/busybox")  # static: runs in the chroot
    for name in ("ls", "bash", "python3.11"):
        (root / "usr/bin" / name).write_bytes(b"\x7fELF program")
    (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "usr/sbin/nbd-client").write_bytes(b"\x7fELF program")
    (root / "usr/sbin/modprobe").symlink_to("/bin/kmod")
    (root / "usr/sbin/fsck").write_bytes(b"\x7fELF program")
    freed = build.prune_programs(root)
    assert freed == 3 * len(b"\x7fELF program")
    for kept in (
        "usr/bin/python3.11",
        "usr/bin/python3",
        "usr/sbin/nbd-client",
        "usr/sbin/modprobe",
    ):
        assert (root / kept).is_symlink() or (root / kept).read_bytes() == b"\x7fELF program"
    assert not (root / "usr/bin/bash").exists() and not (root / "usr/sbin/fsck").exists()
    # the rescue shell's commands now come from busybox, but never over a kept program
    assert os.readlink(root / "usr/bin/ls") == "busybox"
    assert os.readlink(root / "usr/bin/cat") == "busybox"
    assert not (root / "usr/bin/modprobe").exists()  # usr/sbin/modprobe (kmod) stays the one
    assert not (root / "usr/bin/init").exists()  # the ramdisk's init is /init


# --- shell scripts ---------------------------------------------------------------------


@pytest.mark.parametrize("script", [INIT, HOOK, LOCAL_TOP, INIT.parent / "sbin/bootlink-hotplug"])
def test_shell_scripts_parse_and_are_executable(script):
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True)
    if shutil.which("busybox"):
        subprocess.run(["busybox", "sh", "-n", str(script)], check=True)


def test_local_top_does_nothing_without_bootlink_keys(tmp_path):
    """Without bootlink.nbd_host the hook must exit 0 before touching anything."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=UUID=1234 ro quiet\n")
    proc = subprocess.run(
        ["sh", str(LOCAL_TOP)], env={"BOOTLINK_CMDLINE": str(cmdline), "PATH": os.defpath},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert subprocess.run(["sh", str(LOCAL_TOP), "prereqs"], capture_output=True).returncode == 0


def test_pyroute2_entry_points_trimmed_to_what_bootlink_imports(tmp_path):
    rootfs, stage = tmp_path / "root", tmp_path / "stage"
    info = rootfs / "usr/lib/python3/dist-packages/pyroute2-0.7.2.dist-info"
    info.mkdir(parents=True)
    (info / "entry_points.txt").write_text(
        "[console_scripts]\nss2 = pyroute2.netlink.diag.ss2:run\n\n[pyroute2]\n"
        "IPRoute = pyroute2.iproute:IPRoute\nNDB = pyroute2.ndb.main:NDB\n"
        "netns = pyroute2.netns\nipdb = pyroute2.ipdb\n"
    )
    code = stage / "usr/lib/python3/dist-packages/bootlink/common"
    code.mkdir(parents=True)
    (code / "net.py").write_text("from pyroute2 import (\n    IPRoute,\n    netns,\n)\nimport os\n")
    (code / "other.py").write_text("def f():\n    from pyroute2.netlink import nlmsg\n")
    build.trim_pyroute2_entry_points(rootfs, stage)
    text = (stage / info.relative_to(rootfs) / "entry_points.txt").read_text()
    assert "IPRoute = pyroute2.iproute:IPRoute" in text and "netns = pyroute2.netns" in text
    assert "NDB" not in text and "ipdb" not in text
    assert "ss2 = pyroute2.netlink.diag.ss2:run" in text  # other sections untouched


# --- QEMU harness pieces that need no QEMU ---------------------------------------------


def test_console_log_milestones_and_waits(tmp_path):
    import threading

    from bootlink.ramdisk import e2e, qemu

    log = qemu.ConsoleLog(tmp_path / "console.log")
    lines = [
        "[    0.1] Linux version 6.1",
        "bootlink-milestone: /init uptime=4.00",
        "bootlink-milestone: python up uptime=6.50",
        "12:00:00 bootlink.client.probe: server fe80::1 (vm) found on eth1 after 0.6 s",
        "12:00:03 bootlink.kexec: loaded x with kexec_file_load; executing",
        "[    1.500000] second kernel talking",
        "bootlink-target-marker: abc root=/dev/nbd0p1 ext4",
    ]
    for text in lines:
        log.feed(text.encode() + b"\r\n")
    t = {ln.text: ln.t for ln in log.lines}
    ms = e2e._milestones(log, log.lines[-1])
    assert ms["/init"] == t[lines[1]] and ms["kernel"] == round(t[lines[1]] - 4.0, 3)
    assert ms["server found"] == t[lines[3]] and ms["kexec"] == t[lines[4]]
    assert ms["second kernel"] == round(t[lines[5]] - 1.5, 3)
    assert list(ms) == sorted(ms, key=ms.get)
    assert log.wait_for("target-marker: abc", 1).text == lines[-1]
    with pytest.raises(BootlinkError, match="within 0 s"):
        log.wait_for("never", 0.2)
    threading.Timer(0.2, log.feed, [b"Kernel panic - not syncing\n"]).start()
    with pytest.raises(BootlinkError, match="guest failed"):
        log.wait_for("never", 5, fail="Kernel panic")
    log.close()
    with pytest.raises(BootlinkError, match="QEMU exited"):
        log.wait_for("never", 5)
    assert "bootlink-milestone: /init" in (tmp_path / "console.log").read_text()


def test_vm_command_uses_taps_never_user_networking(tmp_path):
    from bootlink.ramdisk import qemu

    ns = qemu.Namespace(name="bltest-x")
    nics = [qemu.Nic("t0", qemu.mac_for(1)), qemu.Nic("t1", qemu.mac_for(2))]
    vm = qemu.VM(tmp_path / "k", tmp_path / "i", "console=ttyS0", nics, ns)
    cmd = " ".join(vm.command())
    assert "-accel tcg" in cmd and "-netdev user" not in cmd
    assert "tap,id=n1,ifname=t1,script=no,downscript=no" in cmd
    assert "mac=52:54:00:b1:00:02" in cmd and "-no-reboot" in cmd


def test_bad_build_inputs_are_refused_before_any_work(tmp_path):
    """A multi-minute build must not start on inputs that fail at its end."""
    from bootlink.common.errors import KeyFileError

    (tmp_path / "key").write_bytes(bytes(32))
    (tmp_path / "key").chmod(0o644)
    cfg = config_from_dict({"key": str(tmp_path / "key")}, source="test")
    base = build.BuildOptions(output=tmp_path / "out", cache=tmp_path / "cache")
    build.check_inputs(base)  # this checkout, defaults: fine
    with pytest.raises(KeyFileError, match="chmod 600"):
        build.build(dataclasses.replace(base, config=cfg))
    for bad, needle in (
        ({"zstd_level": 99}, "--zstd-level 99: pick 1"),
        ({"zstd_level": -5}, "--zstd-level -5: pick 1"),
        ({"sources": (tmp_path / "nope.list",)}, "no such file; name an apt sources file"),
        ({"source_root": tmp_path}, "name a bootlink checkout"),
    ):
        with pytest.raises(BootlinkError, match=needle):
            build.build(dataclasses.replace(base, **bad))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_discard_tree_detaches_mounts_before_removing(tmp_path):
    """A killed mmdebstrap can leave /proc or /dev mounted inside the half-built root:
    removing it must not walk into them."""
    root = tmp_path / "a cache" / "root.tmp"  # mountinfo writes the space as \\040
    (root / "proc").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "x").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    subprocess.run(["mount", "--bind", str(outside), str(root / "proc")], check=True)
    build.discard_tree(root)
    assert not root.exists() and (outside / "keep").read_text() == "keep"
    build.discard_tree(root)  # nothing there: nothing to do
