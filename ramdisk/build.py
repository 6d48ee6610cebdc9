"""`bootlink ramdisk build`: one ramdisk for both roles, from Debian with mmdebstrap.

Steps (each reported with its time; a failure names the step and the fix):
  1. kernel   apt-get download + dpkg -x of the Debian kernel (cached per version)
  2. rootfs   mmdebstrap --variant=essential + the runtime packages (cached per inputs),
              Debian's Python bytecode recompiled deterministically inside it
  3. stage    copy of the rootfs, pruned; kernel modules + depmod; bootlink + /init
  4. pack     clamp mtimes, sorted newc cpio, zstd
  5. config   a second, tiny cpio with config.yaml and the key (kept out of the
              reproducible base: Linux unpacks concatenated cpio archives in order)
  6. manifest package versions and sizes, module count, SHA-256 of every output

Same inputs (pins, SOURCE_DATE_EPOCH, kernel version, bootlink sources) give a
byte-identical ramdisk.cpio.zst.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bootlink.common.bootimage import sha256_file
from bootlink.common.config import Config, to_dict
from bootlink.common.errors import BootlinkError

from . import elfdeps, pack, packages
from . import kernel as kmod

RECIPE_VERSION = 1  # bump when the recipe changes in a way the cache key cannot see
DEFAULT_EPOCH = 1735689600  # 2025-01-01T00:00:00Z, when SOURCE_DATE_EPOCH is not set
# zstd level of the ramdisk. The kernel decompresses it at every boot, and -19's output
# costs ~1.7x the decompression work of -9's (more, shorter matches): -9 makes /init
# start ~0.25 s sooner under emulation for 2.7 MB more (27.3 instead of 24.6 MB).
DEFAULT_ZSTD_LEVEL = 9
FILES_DIR = Path(__file__).resolve().parent / "files"
BEE_PATH = "/usr/local/bin/bee"  # where --bee puts the Bee binary (client.bee_node)
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BuildOptions:
    output: Path
    cache: Path
    config: Config | None = None  # embedded as /etc/bootlink/config.yaml (+ its key)
    pins: dict[str, str] = field(default_factory=dict)
    epoch: int = DEFAULT_EPOCH
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    with_kexec_tools: bool = False
    kernel_package: str | None = None  # "linux-image-6.1.0-56-amd64[=version]"
    variant: str = "slim"  # "slim" (the product) or "full" (stiefelsystem-style, for bench)
    use_cache: bool = True
    sources: tuple[Path, ...] = ()  # apt sources files; default: the host's Debian ones
    source_root: Path | None = None  # a bootlink checkout to install; default: this one
    bee: Path | None = None  # a Bee binary to carry at BEE_PATH (optional)


@dataclass
class BuildResult:
    output: Path
    manifest: dict
    seconds: dict[str, float]

    @property
    def ramdisk(self) -> Path:
        return self.output / "ramdisk.cpio.zst"

    @property
    def initrd(self) -> Path:
        return self.output / "initrd.img"

    @property
    def vmlinuz(self) -> Path:
        return self.output / "vmlinuz"


class Steps:
    """Numbered progress lines on stderr; a failing step is named in the error."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.n = total, 0
        self.seconds: dict[str, float] = {}
        self.stream = stream if stream is not None else sys.stderr

    @contextlib.contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ...", file=self.stream, flush=True)
        t0 = time.monotonic()
        try:
            yield
        except BootlinkError as exc:
            raise BootlinkError(f"ramdisk build step '{name}' failed: {exc}") from None
        except OSError as exc:
            raise BootlinkError(
                f"ramdisk build step '{name}' failed: {exc}: check free space and permissions"
            ) from None
        dt = time.monotonic() - t0
        self.seconds[name] = round(dt, 2)
        print(f"[{self.n}/{self.total}] {what}: done in {dt:.1f} s", file=self.stream, flush=True)


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return DEFAULT_EPOCH
    try:
        return int(value)
    except ValueError:
        raise BootlinkError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number") from None


def host_apt_sources(suite: str = packages.SUITE) -> tuple[Path, ...]:
    """The host's apt source files that name `suite` (third-party repos are left out)."""
    etc = Path("/etc/apt")
    found = [etc / "sources.list"] if (etc / "sources.list").exists() else []
    for pattern in ("*.list", "*.sources"):
        found += sorted((etc / "sources.list.d").glob(pattern))
    picked = tuple(p for p in found if suite in p.read_text(errors="replace"))
    if not picked:
        raise BootlinkError(
            f"no apt source for Debian {suite} in /etc/apt: add one, or pass --sources FILE"
        )
    return picked


def mmdebstrap_command(
    target: Path, pkgs: list[str], opts: BuildOptions, sources: tuple[Path, ...]
) -> list[str]:
    """The mmdebstrap invocation (pure: unit-tested and hashed into the cache key)."""
    full = opts.variant == "full"
    cmd = [
        "mmdebstrap",
        "--mode=root",
        "--variant=" + ("minbase" if full else "essential"),
        "--include=" + ",".join(pkgs),
        "--aptopt=APT::Install-Recommends " + ('"true"' if full else '"false"'),
        '--aptopt=Acquire::Languages "none"',
        # merged /usr through symlinks, not the usrmerge package (which pulls in perl)
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    ]
    if not full:
        cmd += [f"--dpkgopt=path-exclude={p}" for p in packages.DPKG_EXCLUDES]
    if opts.pins:
        prefs = packages.apt_preferences(opts.pins)
        cmd.append(
            "--setup-hook=mkdir -p \"$1/etc/apt/preferences.d\" && printf '%s' "
            + _shquote(prefs)
            + ' > "$1/etc/apt/preferences.d/bootlink-pins"'
        )
    if not full:
        # Debian's postinst compiled the bytecode with a random hash seed and timestamp
        # checks; recompile all of it deterministically (unchecked-hash: no source stat).
        cmd.append(
            '--customize-hook=chroot "$1" env PYTHONHASHSEED=0 SOURCE_DATE_EPOCH='
            + str(opts.epoch)
            + " python3 -m compileall -q -f -j0 --invalidation-mode unchecked-hash"
            " /usr/lib/python3 /usr/lib/python3.11 >/dev/null"
        )
    cmd += [
        '--customize-hook=rm -f "$1/etc/apt/preferences.d/bootlink-pins"',
        '--customize-hook=: > "$1/etc/machine-id"',
        packages.SUITE,
        str(target),
        *[str(s) for s in sources],
    ]
    return cmd


def _shquote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def rootfs_key(pkgs: list[str], opts: BuildOptions, sources: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(mmdebstrap_command(Path("T"), pkgs, opts, ()), sort_keys=True).encode())
    for s in sources:
        h.update(s.read_bytes())
    h.update(f"recipe={RECIPE_VERSION}".encode())
    return h.hexdigest()[:16]


def discard_tree(path: Path) -> None:
    """Remove a half-built root. mmdebstrap --mode=root mounts /proc, /sys and /dev into
    it while it runs; if one is still mounted (it was killed), detach it first, or the
    removal would walk into the host's /dev."""
    if not path.exists():
        return
    for mnt in _mounts_inside(path):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    left = _mounts_inside(path)
    if left:
        raise BootlinkError(
            f"{path} (a half-built root) still has {left[0]} mounted: unmount it "
            f"(umount -R {path}) and remove {path}"
        )
    shutil.rmtree(path, ignore_errors=True)


def _mounts_inside(path: Path) -> list[str]:
    """Mount points below `path`, deepest first (mountinfo escapes space, tab, \\, \\n
    as octal)."""
    inside = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [
            re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            for line in f
        ]
    return sorted((m for m in points if m.startswith(inside)), reverse=True)


def build_rootfs(pkgs: list[str], opts: BuildOptions, sources: tuple[Path, ...]) -> Path:
    """mmdebstrap into cache/rootfs/<key> (reused when the same inputs come again)."""
    key = rootfs_key(pkgs, opts, sources)
    dest = opts.cache / "rootfs" / f"{opts.variant}-{key}"
    if opts.use_cache and (dest / ".complete").exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    discard_tree(tmp)
    cmd = mmdebstrap_command(tmp, pkgs, opts, sources)
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(opts.epoch), LC_ALL="C.UTF-8")
    log = opts.cache / "rootfs" / f"{opts.variant}-{key}.log"
    with open(log, "w") as logf:
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, check=False)
        except FileNotFoundError:
            raise BootlinkError("mmdebstrap not found: apt-get install mmdebstrap") from None
        except BaseException:  # Ctrl-C: hundreds of MB of half a root would stay behind
            discard_tree(tmp)
            raise
    if proc.returncode != 0:
        discard_tree(tmp)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise BootlinkError(f"mmdebstrap exited {proc.returncode}: {' | '.join(tail)} (log: {log})")
    tmp.rename(dest)
    (dest / ".complete").write_text(key + "\n")
    return dest


def installed_packages(root: Path) -> list[dict]:
    out = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
         "-f=${Package}\t${Version}\t${Installed-Size}\t${db:Status-Abbrev}\n"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pkgs = []
    for line in out.splitlines():
        name, version, size, status = [*line.split("\t"), "", "", ""][:4]
        if status.startswith("ii"):
            pkgs.append({"name": name, "version": version, "installed_kib": int(size or 0)})
    return sorted(pkgs, key=lambda p: p["name"])


def check_pins(pins: dict[str, str], got: list[dict]) -> None:
    have = {p["name"]: p["version"] for p in got}
    wrong = [f"{n} {v} (got {have.get(n, 'none')})" for n, v in pins.items() if have.get(n) != v]
    if wrong:
        raise BootlinkError(
            f"pinned versions not installable: {', '.join(wrong[:5])}: the mirror dropped them; "
            "build without --pins to take current versions"
        )


def bootlink_packages(source_root: Path | None = None) -> dict[str, Path]:
    """bootlink's import packages and their source folders (setup.py's package_dir)."""
    root = Path(source_root) if source_root else REPO_ROOT
    setup_py = root / "setup.py"
    if setup_py.exists():
        tree = ast.parse(setup_py.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "SUBPACKAGES"
            ):
                mapping = ast.literal_eval(node.value)
                return {name: root / folder for name, folder in mapping.items()}
    # Installed (not from a checkout): the folders already sit at bootlink/<sub>.
    import bootlink

    base = Path(bootlink.__file__).resolve().parent
    found = {"bootlink": base}
    for init in sorted(base.rglob("__init__.py")):
        rel = init.parent.relative_to(base)
        if rel.parts and "__pycache__" not in rel.parts:
            found["bootlink." + ".".join(rel.parts)] = init.parent
    return found


def install_bootlink(root: Path, source_root: Path | None = None) -> int:
    """Copy bootlink's sources (not bytecode or tests) into the image's dist-packages."""
    dist = root / "usr" / "lib" / "python3" / "dist-packages"
    count = 0
    for name, src in sorted(bootlink_packages(source_root).items()):
        dst = dist / Path(*name.split("."))
        dst.mkdir(parents=True, exist_ok=True)
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if "__pycache__" in rel.parts or path.suffix == ".pyc" or path.is_dir():
                continue
            # Sub-folders that are packages of their own are copied under their own name.
            if any((src / Path(*rel.parts[:i]) / "__init__.py").exists()
                   for i in range(1, len(rel.parts))):  # fmt: skip
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)
            count += 1
    return count


def prune(root: Path, variant: str) -> int:
    """Remove what only installing needed; returns bytes freed."""
    if variant == "full":
        # stiefelsystem's recipe keeps everything but drops Python's bytecode.
        caches = sorted(root.glob("usr/lib/python3*/**/__pycache__"))
        freed = sum(_tree_size(p) for p in caches)
        for p in caches:
            shutil.rmtree(p, ignore_errors=True)
        return freed
    before = elfdeps.missing_libraries(root)
    freed = 0
    for rel in packages.PRUNE_PATHS:
        p = root / rel
        if p.is_symlink() or p.is_file():
            freed += p.lstat().st_size
            p.unlink()
        elif p.is_dir():
            freed += _tree_size(p)
            shutil.rmtree(p)
    dynload = root / "usr/lib/python3.11/lib-dynload"
    for so in sorted(dynload.glob("*.so")):
        if so.name.split(".")[0] in packages.LIB_DYNLOAD_DROP:
            freed += so.stat().st_size
            so.unlink()
    freed += prune_programs(root)
    freed += stub_icu_data(root)
    freed += sourceless_python(root)
    plugdir = root / "usr/lib/x86_64-linux-gnu/nbdkit"
    for sub in ("plugins", "filters"):
        for so in sorted((plugdir / sub).glob("*.so")):
            if so.name not in packages.NBDKIT_KEEP:
                freed += so.stat().st_size
                so.unlink()
    freed += elfdeps.prune_unused_libraries(root)
    elfdeps.check_nothing_lost(root, before)
    return freed


def prune_programs(root: Path) -> int:
    """Remove the programs nothing here runs (packages.KEEP_PROGRAMS stay) and link
    busybox's applets in their place for the rescue shell; returns bytes freed."""
    freed = 0
    for d in packages.PROGRAM_DIRS:
        for p in sorted((root / d).iterdir()):
            if p.name not in packages.KEEP_PROGRAMS and not p.is_dir():
                freed += p.lstat().st_size
                p.unlink()
    listing = subprocess.run(
        ["chroot", str(root), "busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in sorted(set(listing) - set(packages.BUSYBOX_SKIP)):
        if not any((root / d / applet).exists() for d in packages.PROGRAM_DIRS):
            (root / packages.PROGRAM_DIRS[0] / applet).symlink_to("busybox")
    return freed


ICU_STUB_C = """\
/* bootlink: stands in for ICU's 30 MB data library. libnbd links libxml2, which links
 * ICU, but libnbd only parses URIs with it and never converts a charset. ICU checks this
 * header's magic before any use, finds it invalid, and returns an error: no crash. */
const struct { unsigned short size; unsigned char magic1, magic2; unsigned char pad[60]; }
    icudt72_dat = { 0, 0, 0, { 0 } };
"""


def stub_icu_data(root: Path) -> int:
    """Replace libicudata (30 MB, 10 MB compressed) by an empty stub; bytes freed.

    Skipped (the real data stays) when no C compiler is there or nothing needs ICU."""
    libdir = root / "usr/lib/x86_64-linux-gnu"
    real = sorted(libdir.glob("libicudata.so.*.*"))
    cc = shutil.which("cc") or shutil.which("gcc")
    if not real or cc is None:
        return 0
    soname = ".".join(real[0].name.split(".")[:3])  # libicudata.so.72
    major = soname.rsplit(".", 1)[1]
    size = real[0].stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "icudata.c"
        src.write_text(ICU_STUB_C.replace("icudt72_dat", f"icudt{major}_dat"))
        out = Path(tmp) / soname
        subprocess.run(
            [cc, "-shared", "-nostdlib", "-O2", "-fPIC", "-Wl,--build-id=none",
             f"-Wl,-soname,{soname}", "-o", str(out), str(src)],
            check=True, capture_output=True,
        )  # fmt: skip
        real[0].unlink()
        shutil.copyfile(out, real[0])
        os.chmod(real[0], 0o644)
    return size - real[0].stat().st_size


PYTHON_TREES = ("usr/lib/python3.11", "usr/lib/python3/dist-packages")


def sourceless_python(root: Path) -> int:
    """Bytecode next to each module and no sources, for the standard library and the
    Debian packages (bootlink keeps its sources: its tracebacks matter). Saves 13 MB of
    unpacking at every boot; tracebacks there show file and line, not the text."""
    env = dict(os.environ, PYTHONHASHSEED="0", SOURCE_DATE_EPOCH="0")
    subprocess.run(
        ["chroot", str(root), "python3", "-m", "compileall", "-q", "-f", "-b", "-j0",
         *("/" + t for t in PYTHON_TREES)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    freed = 0
    for tree in PYTHON_TREES:
        for dirpath, dirnames, filenames in os.walk(root / tree):
            for name in filenames:
                p = Path(dirpath) / name
                if name.endswith(".py") and p.with_suffix(".pyc").exists():
                    freed += p.stat().st_size
                    p.unlink()
            if "__pycache__" in dirnames:
                freed += _tree_size(Path(dirpath) / "__pycache__")
                shutil.rmtree(Path(dirpath) / "__pycache__")
                dirnames.remove("__pycache__")
    return freed


def _tree_size(p: Path) -> int:
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() or f.is_symlink())


def install_init(root: Path) -> None:
    for src in sorted(FILES_DIR.rglob("*")):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        rel = src.relative_to(FILES_DIR)
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        os.chmod(dst, 0o755 if rel.parts[0] in ("init", "sbin") else 0o644)
    for d in ("proc", "sys", "dev", "run", "tmp", "etc/bootlink", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)


def config_layer(cfg: Config, dest: Path, epoch: int, embed: dict[str, Path] | None = None) -> int:
    """A zstd cpio with /etc/bootlink/config.yaml, the key it names (mode 0600) and `embed`
    (in-image path -> host file: the server's boot files when the laptop has none).

    Compressed like the rest: after a zstd archive Linux expects another compressed one
    ("invalid magic at start of compressed archive" otherwise)."""
    from bootlink.common.keys import load_key_file

    key = load_key_file(cfg.key_path)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        etc = root / "etc" / "bootlink"
        etc.mkdir(parents=True)
        data = to_dict(dataclasses.replace(cfg, key="/etc/bootlink/key"))
        (etc / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=True))
        fd = os.open(etc / "key", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.secret)
        _copy_into(root, embed or {})
        return _pack_layer(root, dest, epoch, 0o600)  # the key is in it


def check_bee_binary(binary: Path) -> None:
    """Refused before the build starts, not after its minutes of work."""
    try:
        with open(binary, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        head = b""
        why = exc.strerror
    else:
        why = "not an executable program"
    if (head != b"\x7fELF" and not head.startswith(b"#!")) or not os.access(binary, os.X_OK):
        raise BootlinkError(
            f"--bee {binary}: {why}: pass the Bee binary for linux/amd64 (a release from "
            "github.com/ethersphere/bee, made executable)"
        )


def bee_layer(binary: Path, dest: Path, epoch: int) -> int:
    """A zstd cpio with a Bee binary at BEE_PATH (client.bee_node runs it for swarm:
    sources when the desktop's LAN has no Bee node)."""
    check_bee_binary(binary)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _copy_into(root, {BEE_PATH: binary})
        return _pack_layer(root, dest, epoch, 0o644)


def _copy_into(root: Path, files: dict[str, Path]) -> None:
    """in-image path -> host file, modes kept (a program stays executable)."""
    for rel, src in sorted(files.items()):
        dst = root / rel.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        shutil.copymode(src, dst)


def _pack_layer(root: Path, dest: Path, epoch: int, mode: int) -> int:
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755)
    tree = root.parent / (root.name + ".cpio")
    try:
        pack.pack_cpio(root, tree, epoch)
        os.chmod(tree, mode)  # zstd gives the output the input's mode
        size = pack.zstd_compress(tree, dest, level=3)
        os.chmod(dest, mode)
        return size
    finally:
        tree.unlink(missing_ok=True)


def _hash_tree(h: hashlib._Hash, base: Path) -> None:
    for p in sorted(base.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            h.update(str(p.relative_to(base)).encode() + b"\0" + p.read_bytes() + b"\0")


def system_layer(
    rootfs: Path, kernel: kmod.Kernel, opts: BuildOptions, work: Path
) -> tuple[Path, dict]:
    """Debian root, pruned, + kernel modules + /init: cached per inputs (the slow zstd)."""
    h = hashlib.sha256(
        json.dumps(
            [rootfs.name, kernel.deb_sha256, packages.MODULE_GLOBS, packages.PRUNE_PATHS,
             packages.NBDKIT_KEEP, opts.epoch, opts.zstd_level, opts.variant, RECIPE_VERSION]
        ).encode()
    )  # fmt: skip
    _hash_tree(h, FILES_DIR)
    for mod in ("build.py", "elfdeps.py", "kernel.py", "pack.py", "packages.py"):
        h.update((Path(__file__).parent / mod).read_bytes())
    dest = opts.cache / "layers" / f"system-{h.hexdigest()[:16]}"
    if opts.use_cache and (dest / "facts.json").exists():
        return dest / "system.cpio.zst", json.loads((dest / "facts.json").read_text())
    stage = work / "system"
    subprocess.run(["cp", "-a", f"{rootfs}/.", str(stage)], check=True)
    (stage / ".complete").unlink(missing_ok=True)
    freed = prune(stage, opts.variant)
    index = kmod.read_index(kernel.modules_dir)
    modules = kmod.select_modules(index, packages.MODULE_GLOBS)
    module_bytes = kmod.install_modules(kernel, modules, stage)
    install_init(stage)
    facts = {
        "modules": {"count": len(modules), "bytes": module_bytes},
        "pruned_bytes": freed,
        "tree_bytes": _tree_size(stage),
    }
    cpio = work / "system.cpio"
    facts["cpio_bytes"] = pack.pack_cpio(stage, cpio, opts.epoch)
    shutil.rmtree(stage)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pack.zstd_compress(cpio, tmp / "system.cpio.zst", opts.zstd_level)
    cpio.unlink()
    (tmp / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest / "system.cpio.zst", facts


def pyroute2_names_used(tree: Path) -> set[str]:
    """Names bootlink takes from the top-level pyroute2 package (`from pyroute2 import`)."""
    names: set[str] = set()
    for py in sorted(tree.rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_bytes(), str(py))):
            if isinstance(node, ast.ImportFrom) and node.module == "pyroute2" and not node.level:
                names.update(alias.name for alias in node.names)
    return names


def trim_pyroute2_entry_points(rootfs: Path, stage: Path) -> None:
    """`import pyroute2` loads every class its entry points name (NDB, IPDB, nftables,
    ...: about 60 modules, seconds under emulation). The image's copy lists only the names
    bootlink imports; the file goes into the bootlink layer, which Linux unpacks after the
    system layer, so it replaces Debian's there."""
    dist = "usr/lib/python3/dist-packages"
    infos = sorted((rootfs / dist).glob("pyroute2-*.dist-info/entry_points.txt"))
    if not infos:
        return
    used = pyroute2_names_used(stage / dist / "bootlink")
    out, section = [], ""
    for line in infos[0].read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[pyroute2]" and "=" in line and line.split("=")[0].strip() not in used:
            continue
        out.append(line)
    dest = stage / infos[0].relative_to(rootfs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(out) + "\n")


class _SkipCompile(Exception):
    pass


def bootlink_layer(rootfs: Path, opts: BuildOptions, work: Path) -> tuple[Path, dict]:
    """bootlink's Python package with bytecode compiled by the ramdisk's own python3."""
    stage = work / "bootlink"
    n_files = install_bootlink(stage, opts.source_root)
    # Compile with the image's interpreter (its version decides the bytecode), inside a
    # scratch folder of the cached root, with a fixed hash seed and no timestamps.
    scratch = Path(tempfile.mkdtemp(prefix="bootlink-pyc-", dir=rootfs / "tmp"))
    try:
        if opts.variant == "full":  # stiefelsystem-style: no bytecode at all
            raise _SkipCompile
        src = stage / "usr" / "lib" / "python3" / "dist-packages" / "bootlink"
        shutil.copytree(src, scratch / "bootlink")
        env = dict(os.environ, PYTHONHASHSEED="0", SOURCE_DATE_EPOCH=str(opts.epoch))
        inside = "/" + str((scratch / "bootlink").relative_to(rootfs))
        proc = subprocess.run(
            ["chroot", str(rootfs), "python3", "-m", "compileall", "-q", "-f",
             "--invalidation-mode", "unchecked-hash", "-d",
             "/usr/lib/python3/dist-packages/bootlink", inside],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BootlinkError(f"compiling bootlink's bytecode failed: {proc.stdout[-300:]}")
        shutil.rmtree(src)
        shutil.copytree(scratch / "bootlink", src)
    except _SkipCompile:
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    trim_pyroute2_entry_points(rootfs, stage)
    for d in ("usr", "usr/lib", "usr/lib/python3", "usr/lib/python3/dist-packages"):
        os.chmod(stage / d, 0o755)
    cpio = work / "bootlink.cpio"
    size = pack.pack_cpio(stage, cpio, opts.epoch)
    out = work / "bootlink.cpio.zst"
    pack.zstd_compress(cpio, out, opts.zstd_level)
    return out, {"bootlink_files": n_files, "cpio_bytes": size}


def _concat(parts: list[Path], dest: Path, mode: int = 0o644) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    os.chmod(dest, mode)


def check_inputs(opts: BuildOptions) -> None:
    """Refuse bad inputs before minutes of work: the key the config names (the config
    layer is packed last), the zstd level, the apt sources, the bootlink checkout, the
    Bee binary."""
    if opts.config is not None:
        from bootlink.common.keys import load_key_file

        load_key_file(opts.config.key_path)
    if not 1 <= opts.zstd_level <= 22:
        raise BootlinkError(f"--zstd-level {opts.zstd_level}: pick 1 (fast) to 22 (smallest)")
    for src in opts.sources:
        if not Path(src).is_file():
            raise BootlinkError(f"--sources {src}: no such file; name an apt sources file")
    if opts.source_root and not (Path(opts.source_root) / "setup.py").is_file():
        raise BootlinkError(
            f"--source-root {opts.source_root} has no setup.py: name a bootlink checkout"
        )
    for name, folder in bootlink_packages(opts.source_root).items():
        if not folder.is_dir():
            raise BootlinkError(
                f"--source-root {opts.source_root or REPO_ROOT}: {name} is missing "
                f"({folder}); name a bootlink checkout"
            )
    if opts.bee:
        check_bee_binary(opts.bee)


def build(opts: BuildOptions) -> BuildResult:
    t_start = time.monotonic()
    steps = Steps(6 if opts.config else 5)
    check_inputs(opts)
    out = Path(opts.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BootlinkError(f"cannot create {out}: {exc.strerror}; pass another --output") from None
    pkgs = packages.package_list(opts.with_kexec_tools)
    if opts.variant == "full":
        pkgs = packages.package_list(True, ["systemd-sysv"])
    sources = opts.sources or host_apt_sources()

    with steps.step("kernel", "Debian kernel (apt-get download, cached)"):
        kernel = kmod.fetch_kernel(opts.cache, opts.kernel_package)
    with steps.step("rootfs", f"Debian {packages.SUITE} root with mmdebstrap (cached)"):
        rootfs = build_rootfs(pkgs, opts, sources)
        installed = installed_packages(rootfs)
        check_pins(opts.pins, installed)

    work = Path(tempfile.mkdtemp(prefix="stage-", dir=opts.cache))
    try:
        with steps.step(
            "system", f"system layer: prune, modules, /init, cpio, zstd -{opts.zstd_level} (cached)"
        ):
            system, facts = system_layer(rootfs, kernel, opts, work)
            system_path = system
        with steps.step("bootlink", "bootlink layer: sources + bytecode, cpio, zstd"):
            layer, bl_facts = bootlink_layer(rootfs, opts, work)
            layer_path_bl = out / "bootlink.cpio.zst"
            shutil.copyfile(layer, layer_path_bl)
            layers = [system, layer]
            if opts.bee:
                layers.append(out / "bee.cpio.zst")
                bee_layer(opts.bee, layers[-1], opts.epoch)
            # One file for both roles: Linux unpacks concatenated archives in order.
            _concat(layers, out / "ramdisk.cpio.zst")
            shutil.copyfile(kernel.vmlinuz, out / "vmlinuz")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    files = {"vmlinuz": out / "vmlinuz", "ramdisk.cpio.zst": out / "ramdisk.cpio.zst"}
    if opts.config:
        with steps.step("config", "config layer (config.yaml + key, mode 0600)"):
            layer_path = out / "config.cpio.zst"
            config_layer(opts.config, layer_path, opts.epoch)
            os.chmod(layer_path, 0o600)
            _concat([out / "ramdisk.cpio.zst", layer_path], out / "initrd.img", 0o600)
            files["initrd.img"] = out / "initrd.img"
    with steps.step("manifest", "manifest"):
        cpio_size = facts["cpio_bytes"] + bl_facts["cpio_bytes"]
        manifest = {
            "format": 1,
            "variant": opts.variant,
            "suite": packages.SUITE,
            "source_date_epoch": opts.epoch,
            "zstd_level": opts.zstd_level,
            "kernel": {
                "package": kernel.package,
                "version": kernel.version,
                "release": kernel.release,
                "deb_sha256": kernel.deb_sha256,
            },
            "requested_packages": pkgs,
            "packages": installed,
            "modules": facts["modules"],
            "layers": {
                "system": sha256_file(system_path),
                "bootlink": sha256_file(layer_path_bl),
                **({"bee": sha256_file(out / "bee.cpio.zst")} if opts.bee else {}),
            },
            "bootlink_files": bl_facts["bootlink_files"],
            "uncompressed_bytes": cpio_size,
            "tree_bytes": facts["tree_bytes"],
            "pruned_bytes": facts["pruned_bytes"],
            # initrd.img/config.cpio.zst hold the key: their hashes are listed, never their bytes.
            "files": {
                name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                for name, p in sorted(files.items())
            },
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (out / "manifest.json").write_text(text)
        (out / "pins.txt").write_text("".join(f"{p['name']}={p['version']}\n" for p in installed))
    steps.seconds["total"] = round(time.monotonic() - t_start, 2)
    (out / "build-times.json").write_text(json.dumps(steps.seconds, indent=2) + "\n")
    size = manifest["files"]["ramdisk.cpio.zst"]["size"]
    print(
        f"ramdisk: {out / 'ramdisk.cpio.zst'} {size / 1e6:.1f} MB "
        f"({cpio_size / 1e6:.0f} MB unpacked, {len(installed)} packages, "
        f"{facts['modules']['count']} modules) in {steps.seconds['total']:.0f} s",
        file=sys.stderr,
    )
    return BuildResult(out, manifest, steps.seconds)
