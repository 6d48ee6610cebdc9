"""The Debian kernel both the ramdisk and the QEMU tests boot, and module selection.

The kernel package is fetched with `apt-get download` (whatever `linux-image-amd64`
depends on, or an exact package/version) and unpacked with `dpkg -x` into a cache
directory keyed by package and version, so it is downloaded once per version.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bootlink.common.errors import BootlinkError

META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class Kernel:
    package: str  # linux-image-6.1.0-56-amd64
    version: str  # Debian package version, 6.1.192-2
    release: str  # uname -r, 6.1.0-56-amd64
    root: Path  # dpkg -x tree: boot/, lib/modules/<release>/
    deb: Path
    deb_sha256: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.release}"


SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tool(name: str) -> str:
    """Full path of a system tool; /sbin is often missing from a user's PATH."""
    found = shutil.which(name) or shutil.which(name, path=SBIN_PATH)
    return found or name


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    cmd = [tool(cmd[0]), *cmd[1:]]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BootlinkError(f"{what}: {cmd[0]} not found: install it with apt-get") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BootlinkError(f"{what} failed ({' '.join(cmd[:3])}...): {tail[0]}")
    return proc.stdout


def resolve_package(package: str | None = None) -> tuple[str, str]:
    """(package, candidate version) of the kernel to use; default: what the meta package wants."""
    if package is None:
        out = _run(["apt-cache", "depends", META_PACKAGE], "finding the Debian kernel package")
        deps = re.findall(r"Depends:\s*(linux-image-\S+)", out)
        if not deps:
            raise BootlinkError(
                f"apt-cache knows no dependency of {META_PACKAGE}: run apt-get update first"
            )
        package = deps[0]
    name, _, version = package.partition("=")
    if not version:
        out = _run(["apt-cache", "policy", name], f"looking up {name}")
        m = re.search(r"Candidate:\s*(\S+)", out)
        if not m or m.group(1) == "(none)":
            raise BootlinkError(f"no installable version of {name}: run apt-get update first")
        version = m.group(1)
    return name, version


def fetch_kernel(cache: Path, package: str | None = None) -> Kernel:
    """Download and unpack the kernel package into `cache`/kernel (once per version)."""
    from bootlink.common.bootimage import sha256_file

    name, version = resolve_package(package)
    release = name.removeprefix("linux-image-")
    base = Path(cache) / "kernel" / f"{name}_{version}"
    root = base / "root"
    done = base / ".complete"
    debs = sorted(base.glob("*.deb"))
    if not done.exists():
        base.mkdir(parents=True, exist_ok=True)
        if not debs:
            # apt drops privileges to _apt, which may not write into the cache.
            _run(
                ["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{name}={version}"],
                f"downloading {name} {version}",
                cwd=base,
            )
            debs = sorted(base.glob("*.deb"))
        if not debs:
            raise BootlinkError(f"apt-get download left no .deb in {base}: check apt's output")
        if root.exists():
            shutil.rmtree(root)
        _run(["dpkg", "-x", str(debs[0]), str(root)], f"unpacking {debs[0].name}")
        # The package ships no modules.dep: depmod once over the full tree.
        _run(["depmod", "-b", str(root), release], "depmod over the kernel package")
        (base / "deb.sha256").write_text(sha256_file(debs[0]) + "\n")
        done.write_text(version + "\n")
    kernel = Kernel(
        name, version, release, root, debs[0], (base / "deb.sha256").read_text().strip()
    )
    if not kernel.vmlinuz.is_file():
        raise BootlinkError(f"{kernel.vmlinuz} missing: remove {base} and build again")
    return kernel


@dataclass(frozen=True)
class ModuleIndex:
    deps: dict[str, list[str]]  # "kernel/fs/ext4/ext4.ko" -> its dependencies (same form)
    by_name: dict[str, str]  # "ext4" -> "kernel/fs/ext4/ext4.ko"
    softdeps: dict[str, list[str]]  # "ext4" -> ["crc32c"] (pre: and post:)
    aliases: list[tuple[str, str]]  # ("crc32c", "crc32c_generic") glob patterns


def _modname(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def read_index(modules_dir: Path) -> ModuleIndex:
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {_modname(m): m for m in deps}
    softdeps: dict[str, list[str]] = {}
    softfile = modules_dir / "modules.softdep"
    if softfile.exists():
        for line in softfile.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "softdep":
                softdeps[parts[1].replace("-", "_")] = [
                    p for p in parts[2:] if p not in ("pre:", "post:")
                ]
    aliases = []
    for line in (modules_dir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.append((parts[1], parts[2].replace("-", "_")))
    return ModuleIndex(deps, by_name, softdeps, aliases)


def select_modules(index: ModuleIndex, globs: Iterable[str]) -> list[str]:
    """Modules matching `globs` (relative to kernel/) plus their hard and soft deps, sorted."""
    wanted: set[str] = set()
    for pattern in globs:
        hits = [m for m in index.deps if fnmatch.fnmatch(m.removeprefix("kernel/"), pattern + "*")]
        wanted.update(h for h in hits if fnmatch.fnmatch(h, "*.ko*"))
    todo = list(wanted)
    while todo:
        mod = todo.pop()
        more = list(index.deps.get(mod, []))
        for soft in index.softdeps.get(_modname(mod), []):
            more += _resolve_name(index, soft)
        for dep in more:
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return sorted(wanted)


def _resolve_name(index: ModuleIndex, name: str) -> list[str]:
    """A softdep names a module or an alias (crc32c -> crc32c_generic, crc32c_intel)."""
    name = name.replace("-", "_")
    if name in index.by_name:
        return [index.by_name[name]]
    return [
        index.by_name[mod]
        for pattern, mod in index.aliases
        if fnmatch.fnmatch(name, pattern) and mod in index.by_name
    ]


def install_modules(
    kernel: Kernel, modules: list[str], dest_root: Path, compress: bool = True
) -> int:
    """Copy `modules` and the kernel's module metadata into dest_root, run depmod; bytes copied."""
    src = kernel.modules_dir
    dst = Path(dest_root) / "lib" / "modules" / kernel.release
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for rel in modules:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
        total += target.stat().st_size
    # Compressed one by one: the ramdisk unpacks 2/3 fewer module bytes at boot (only the
    # few modules in use are ever decompressed, by kmod, when loaded).
    kos = [str(dst / rel) for rel in modules if rel.endswith(".ko")]
    if compress and kos:
        _run(["zstd", "-q", "-19", "-T1", "--rm", "--no-progress", *kos], "compressing modules")
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(src / meta, dst / meta)
    _run(["depmod", "-b", str(dest_root), kernel.release], "depmod over the ramdisk's modules")
    return total
