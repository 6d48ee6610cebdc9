"""`bootlink setup-server-os`: prepare the laptop's normal OS to become the bootlink server.

Installs the ramdisk, the key (0600), the config, the autokexec unit (enabled), a udev
rule and a NetworkManager rule for the link NIC, and the NBD-root hook of the OS's
initramfs generator (initramfs-tools or dracut, detected), then regenerates the initrds.

Every change is planned first against what is on disk, shown (diff-style) and asked
for (--yes skips the questions, --dry-run only lists them). What is already right is not
touched, so a second run changes nothing. A manifest (/var/lib/bootlink/installed.json)
records what was created, what was replaced (the original is kept under
/var/lib/bootlink/backup/) and which initrds were regenerated; --uninstall puts back
exactly that: originals restored, created files and directories removed, and each
initrd restored byte for byte unless something else rewrote it since (then it is
regenerated without the hook). --root DIR does all of it inside another OS tree, running
the generator there in a chroot (in a private mount namespace that vanishes with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bootlink.common.config import Config, load_config, to_dict
from bootlink.common.errors import BootlinkError
from bootlink.common.keys import load_key_file

from .autokexec import triggers_of

MANIFEST = "/var/lib/bootlink/installed.json"
BACKUP_DIR = "/var/lib/bootlink/backup"
CONFIG_PATH = "/etc/bootlink/config.yaml"
KEY_PATH = "/etc/bootlink/key"
UNIT = "bootlink-autokexec.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
WANTS_PATH = f"/etc/systemd/system/multi-user.target.wants/{UNIT}"
UDEV_RULES = "/etc/udev/rules.d/90-bootlink.rules"
NM_CONF = "/etc/NetworkManager/conf.d/90-bootlink.conf"
DRACUT_MODULE_DIR = "/usr/lib/dracut/modules.d/90bootlink"
DRACUT_CONF = "/etc/dracut.conf.d/90-bootlink.conf"
HOOKS = Path(__file__).resolve().parent / "hooks"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def data_dir() -> Path:
    """systemd/ (unit, udev rule, NetworkManager snippet): in the tree or as package data."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "systemd", here.parent / "bootlink" / "systemd"):
        if (cand / UNIT).is_file():
            return cand
    raise BootlinkError("bootlink's systemd/ files are missing: reinstall bootlink")


# --- what the target tree holds ------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """One file or symlink the installed OS should have."""

    path: str  # absolute inside the target OS
    what: str  # one line for the user
    content: bytes = b""
    mode: int = 0o644
    link: str | None = None  # a symlink to this target instead of a file
    secret: bool = False  # never show the content
    hook: bool = False  # part of the initrd hook: a change means regenerating


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Target:
    """The OS tree we install into; every path the rest of the module names is absolute
    inside it, and only this class turns one into a host path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise BootlinkError(f"--root {root} is not a directory")
        self.live = self.root == Path("/")

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.host(path))

    def matches(self, w: Wanted) -> bool:
        p = self.host(w.path)
        if w.link is not None:
            return p.is_symlink() and os.readlink(p) == w.link
        if p.is_symlink() or not p.is_file():
            return False
        return stat.S_IMODE(p.stat().st_mode) == w.mode and p.read_bytes() == w.content

    def describe_current(self, path: str) -> str:
        p = self.host(path)
        if p.is_symlink():
            return f"symlink to {os.readlink(p)}"
        if p.is_file():
            return f"file, mode {stat.S_IMODE(p.stat().st_mode):04o}"
        return "absent" if not os.path.lexists(p) else "not a regular file"

    def run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        """Run a command of the target OS (in a chroot with /proc, /sys and /dev when the
        target is not this system; the mounts live in a mount namespace of their own)."""
        env = {"PATH": CHROOT_PATH, "LC_ALL": "C", "HOME": "/root", "TERM": "dumb"}
        if self.live:
            full = cmd
        else:
            r = shlex.quote(str(self.root))
            script = (
                f"mount -t proc proc {r}/proc && mount -t sysfs sysfs {r}/sys && "
                f'mount --rbind /dev {r}/dev && exec chroot {r} "$@"'
            )
            full = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
                *cmd,
            ]
        try:
            return subprocess.run(full, capture_output=True, text=True, env=env, check=False)
        except FileNotFoundError:
            raise BootlinkError(f"{full[0]} not found: install it") from None


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Manifest:
    generator: str = ""
    files: dict[str, dict] = field(default_factory=dict)  # path -> {sha256, link, backup}
    dirs: list[str] = field(default_factory=list)  # directories we created
    hook_digest: str = ""  # hook the initrds were last regenerated with
    initrds: dict[str, dict] = field(default_factory=dict)  # path -> {sha256, backup, kver}

    @classmethod
    def load(cls, target: Target) -> Manifest:
        p = target.host(MANIFEST)
        if not p.exists():
            return cls()
        try:
            data = json.loads(p.read_bytes())
            kinds = {"generator": str, "files": dict, "dirs": list, "hook_digest": str}
            kinds["initrds"] = dict
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            for k, kind in kinds.items():
                if k in data and not isinstance(data[k], kind):
                    raise ValueError(f"'{k}' is not a {kind.__name__}")
            for k in ("files", "initrds"):
                if not all(isinstance(v, dict) for v in data.get(k, {}).values()):
                    raise ValueError(f"an entry of '{k}' is not an object")
            return cls(**{k: data[k] for k in kinds if k in data})
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else exc
            raise BootlinkError(
                f"{p} is unreadable ({why}): restore it or remove it (then --uninstall "
                "cannot undo the earlier install)"
            ) from None

    def to_bytes(self) -> bytes:
        data = {"format": 1, **dataclasses.asdict(self)}
        data["dirs"] = sorted(set(self.dirs))
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    def empty(self) -> bool:
        return not (self.files or self.initrds)


@dataclass
class Action:
    title: str
    detail: list[str]
    apply: Callable[[], None]


class Planner:
    def __init__(self, target: Target, manifest: Manifest, generator: str | None) -> None:
        self.t, self.m, self.generator = target, manifest, generator
        self.actions: list[Action] = []
        self.writes: set[str] = set()  # paths whose directories the actions change

    def _check_kind(self, path: str, why: str) -> None:
        """Refuse now, before anything changes, what applying could only trip over: a
        directory (or device, FIFO...) where a file goes, a file where a directory goes."""
        for parent in reversed(Path(path).parents):
            hparent = self.t.host(str(parent))
            if os.path.lexists(hparent) and not hparent.is_dir():
                raise BootlinkError(
                    f"{hparent} is not a directory but {path} goes inside it: move it out "
                    "of the way and run setup-server-os again; nothing was changed"
                )
        hp = self.t.host(path)
        try:
            st = os.lstat(hp)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BootlinkError(
                f"cannot inspect {hp}: {exc.strerror}; nothing was changed"
            ) from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise BootlinkError(
                f"{hp} is {_kind_of(st.st_mode)}, not a file: move it out of the way ({why}) "
                "and run setup-server-os again; nothing was changed"
            )

    def check_writable(self) -> None:
        """Refuse now, before anything changes, a read-only filesystem or a directory we
        may not write in (a --root on a read-only mount would otherwise fail half-way)."""
        if self.actions:
            self.writes.add(MANIFEST)
        seen: set[Path] = set()
        for path in sorted(self.writes):
            d = self.t.host(path).parent
            while not os.path.lexists(d) and d != d.parent:
                d = d.parent
            if d in seen or not d.is_dir():
                continue
            seen.add(d)
            if os.statvfs(d).f_flag & os.ST_RDONLY:
                mnt = _mount_point(d)
                raise BootlinkError(
                    f"{d} is on a read-only filesystem ({mnt}), so {path} cannot be written: "
                    f"remount it read-write (mount -o remount,rw {mnt}) and run "
                    "setup-server-os again; nothing was changed"
                )
            if not os.access(d, os.W_OK):
                raise BootlinkError(
                    f"no permission to write in {d} (for {path}): run setup-server-os as "
                    "root; nothing was changed"
                )

    # -- files

    def put(self, w: Wanted) -> bool:
        """Plan `w` unless already in place; True if something will change."""
        self._check_kind(w.path, f"bootlink installs {w.what} there")
        if self.t.matches(w):
            return False
        entry = self.m.files.get(w.path)
        existed = self.t.exists(w.path)
        backup = entry["backup"] if entry else None
        detail: list[str] = []
        self.writes.add(w.path)
        if existed and entry is None:
            backup = BACKUP_DIR + w.path
            self._check_kind(backup, "bootlink keeps the original there")
            self.writes.add(backup)
            detail.append(f"the current one is kept as {backup} for --uninstall")
        verb = "replace" if existed else "create"
        detail += self._diff(w)

        def apply() -> None:
            if existed and entry is None:
                self._backup(w.path, backup)
            try:
                self._write(w)
            except BaseException:
                if existed and entry is None:  # not recorded: the original is still in place
                    with contextlib.suppress(OSError):
                        self.t.host(backup).unlink()
                raise
            self.m.files[w.path] = {
                "sha256": sha256(w.content) if w.link is None else "",
                "link": w.link,
                "backup": backup,
            }

        self.actions.append(Action(f"{verb} {w.path}: {w.what}", detail, apply))
        return True

    def remove(self, path: str, why: str) -> None:
        entry = self.m.files[path]
        backup = entry.get("backup")
        self._check_kind(path, "bootlink installed a file there")
        self.writes.add(path)
        if backup:
            self._check_kind(backup, "bootlink kept the original there")
            self.writes.add(backup)
        title = f"restore {path} from {backup}" if backup else f"remove {path}"
        changed = self._changed_since(path, entry)
        detail = [f"{why}"]
        if changed:
            detail.append("note: it was changed after bootlink installed it")

        def apply() -> None:
            p = self.t.host(path)
            if os.path.lexists(p):
                p.unlink()
            if backup:
                self._restore(backup, path)
            self.m.files.pop(path, None)

        self.actions.append(Action(title, detail, apply))

    def _changed_since(self, path: str, entry: dict) -> bool:
        p = self.t.host(path)
        if entry.get("link") is not None:
            return not (p.is_symlink() and os.readlink(p) == entry["link"])
        return not p.is_file() or file_sha(p) != entry["sha256"]

    def _diff(self, w: Wanted) -> list[str]:
        p = self.t.host(w.path)
        if w.link is not None:
            return [f"symlink -> {w.link} (now: {self.t.describe_current(w.path)})"]
        old = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        mode = f"mode {w.mode:04o}"
        if old is not None and stat.S_IMODE(p.stat().st_mode) != w.mode:
            mode += f" (now {stat.S_IMODE(p.stat().st_mode):04o})"
        if w.secret:
            return [f"{mode}, {len(w.content)}-byte secret (content not shown)"]
        if _is_text(w.content) and (old is None or _is_text(old)):
            a = [] if old is None else old.decode().splitlines()
            b = w.content.decode().splitlines()
            lines = list(
                difflib.unified_diff(
                    a,
                    b,
                    f"{w.path} (now)" if old is not None else "/dev/null",
                    w.path,
                    lineterm="",
                    n=2,
                )
            )
            return [mode, *lines] if lines else [mode]
        now = "" if old is None else f", now {len(old)} bytes sha256 {sha256(old)[:16]}"
        return [f"{mode}, {len(w.content)} bytes sha256 {sha256(w.content)[:16]}{now}"]

    def _mkdirs(self, path: str) -> None:
        parts = Path(path).parent.parts
        for i in range(2, len(parts) + 1):
            d = str(Path(*parts[:i]))
            hp = self.t.host(d)
            if not hp.exists():
                hp.mkdir(mode=0o755)
                os.chmod(hp, 0o755)
                self.m.dirs.append(d)

    def _write(self, w: Wanted) -> None:
        """Write `w` beside its place and rename it over what is there: a failure leaves
        the old file (or symlink) as it was and no temporary file behind."""
        self._mkdirs(w.path)
        p = self.t.host(w.path)
        tmp = p.with_name(f".{p.name}.bootlink-tmp")
        if os.path.lexists(tmp):  # left by a killed run
            tmp.unlink()
        try:
            if w.link is not None:
                os.symlink(w.link, tmp)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, w.mode)
                try:
                    os.fchmod(fd, w.mode)
                    view = memoryview(w.content)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _backup(self, path: str, backup: str) -> None:
        self._mkdirs(backup)
        src, dst = self.t.host(path), self.t.host(backup)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)

    def _restore(self, backup: str, path: str) -> None:
        src, dst = self.t.host(backup), self.t.host(path)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
            src.unlink()
        else:
            os.replace(src, dst)

    # -- initrds

    def kernel_versions(self) -> list[str]:
        found = set()
        for base in ("/usr/lib/modules", "/lib/modules"):
            d = self.t.host(base)
            if d.is_dir():
                found |= {p.name for p in d.iterdir() if (p / "modules.order").exists()}
        return sorted(v for v in found if self.t.exists(f"/boot/vmlinuz-{v}"))

    def initrd_files(self) -> dict[str, str]:
        """Files initrd generators write, with their current SHA-256."""
        out = {}
        for base, pattern in (
            ("/boot", "initrd.img-*"),
            ("/boot", "initramfs-*"),
            ("/var/lib/initramfs-tools", "*"),
        ):
            d = self.t.host(base)
            if d.is_dir():
                for p in d.glob(pattern):
                    if p.is_file() and not p.is_symlink():
                        out[f"{base}/{p.name}"] = file_sha(p)
        return out

    def regen_commands(self, kvers: list[str]) -> list[list[str]]:
        if self.generator == "initramfs-tools":
            out = []
            for v in kvers:
                mode = "-u" if self.t.exists(f"/boot/initrd.img-{v}") else "-c"
                out.append(["update-initramfs", mode, "-k", v])
            return out
        return [["dracut", "--force", f"/boot/initrd.img-{v}", v] for v in kvers]

    def regenerate(self, why: str, kvers: list[str], digest: str) -> None:
        if not kvers:
            self.actions.append(
                Action(
                    "regenerate initrds: no kernel with modules and /boot/vmlinuz-*",
                    [why],
                    lambda: None,
                )
            )
            return
        cmds = self.regen_commands(kvers)
        for path in self.initrd_files():
            self.writes |= {path, BACKUP_DIR + path}
        for v in kvers:
            self.writes |= {f"/boot/initrd.img-{v}", f"/var/lib/initramfs-tools/{v}"}
        where = "" if self.t.live else f" (chroot {self.t.root})"
        detail = [why, *(f"run{where}: {shlex.join(c)}" for c in cmds)]
        detail.append(
            "writes /boot/initrd.img-<version> (and initramfs-tools' /var/lib/initramfs-tools/"
            f"<version>); originals kept under {BACKUP_DIR}/ for --uninstall"
        )

        def apply() -> None:
            before = self.initrd_files()
            saved = {}
            for path in before:
                if path not in self.m.initrds:
                    saved[path] = BACKUP_DIR + path
                    self._backup(path, saved[path])
            try:
                for c in cmds:
                    print(f"  running {shlex.join(c)} ...", flush=True)
                    proc = self.t.run(c)
                    if proc.returncode != 0:
                        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                        raise BootlinkError(
                            f"{shlex.join(c)} failed: {' | '.join(tail) or 'no output'}: fix "
                            "that and run setup-server-os again"
                        )
            finally:
                after = self.initrd_files()
                for path, sha in after.items():
                    if before.get(path) == sha:
                        continue
                    prev = self.m.initrds.get(path)
                    self.m.initrds[path] = {
                        "sha256": sha,
                        "backup": prev["backup"] if prev else saved.get(path),
                        "kver": _kver(path),
                    }
                for path, backup in saved.items():
                    if path not in self.m.initrds:  # unchanged: no need to keep a copy
                        self.t.host(backup).unlink()
            self.m.hook_digest = digest

        self.actions.append(Action(f"regenerate the initrds with {self.generator}", detail, apply))

    # -- bookkeeping

    def save_manifest(self) -> None:
        p = self.t.host(MANIFEST)
        if self.m.empty() and not self.m.dirs:
            return
        data = self.m.to_bytes()
        if p.is_file() and p.read_bytes() == data:
            return
        self._write(Wanted(MANIFEST, "bootlink's record of its changes", data))


def _saved(planner: Planner) -> bool:
    """Record what was done so far (so --uninstall can undo it); whether that worked."""
    try:
        planner.save_manifest()
    except OSError:
        return False
    return True


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path` (an existing directory)."""
    path = path.resolve()
    dev = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def _is_text(data: bytes) -> bool:
    if len(data) > 256 << 10 or b"\0" in data:
        return False
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _kver(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for prefix in ("initrd.img-", "initramfs-"):
        if name.startswith(prefix):
            return name[len(prefix) :].removesuffix(".img")
    return name  # /var/lib/initramfs-tools/<version>


# --- building the wanted set -----------------------------------------------------------------


def detect_generator(target: Target, choice: str = "auto") -> str:
    have = {
        "initramfs-tools": any(
            target.exists(p) for p in ("/usr/sbin/update-initramfs", "/sbin/update-initramfs")
        ),
        "dracut": any(target.exists(p) for p in ("/usr/bin/dracut", "/usr/sbin/dracut")),
    }
    if choice != "auto":
        if not have[choice]:
            raise BootlinkError(f"--generator {choice}: it is not installed in {target.root}")
        return choice
    found = [g for g, ok in have.items() if ok]
    if not found:
        raise BootlinkError(
            f"no initramfs-tools or dracut in {target.root}: install one (apt-get install "
            "initramfs-tools) so the laptop's initrd can mount its root over NBD"
        )
    if len(found) > 1:
        raise BootlinkError("both initramfs-tools and dracut are installed: pick --generator")
    return found[0]


def hook_files(generator: str) -> list[Wanted]:
    if generator == "initramfs-tools":
        src = HOOKS / "initramfs-tools"
        files = sorted(p for p in src.rglob("*") if p.is_file())
        if not files:
            raise BootlinkError(f"bootlink's initramfs-tools hook is missing from {src}")
        return [
            Wanted(
                f"/etc/initramfs-tools/{p.relative_to(src)}",
                "initramfs-tools NBD-root hook",
                p.read_bytes(),
                0o755,
                hook=True,
            )
            for p in files
        ]
    src = HOOKS / "dracut" / "90bootlink"
    out = [
        Wanted(
            f"{DRACUT_MODULE_DIR}/{p.name}",
            "dracut NBD-root module",
            p.read_bytes(),
            0o755,
            hook=True,
        )
        for p in sorted(src.glob("*.sh"))
    ]
    conf = (
        "# bootlink: put the NBD-root module into every initrd (installed by bootlink "
        "setup-server-os)\n"
        'add_dracutmodules+=" bootlink "\n'
    )
    out.append(Wanted(DRACUT_CONF, "enable the dracut module", conf.encode(), hook=True))
    return out


def _template_header(name: str) -> list[str]:
    """The leading comment of a shipped template, up to its '# Example' line."""
    out = []
    for line in (data_dir() / name).read_text().splitlines():
        if not line.startswith("#") or line.startswith("# Example"):
            break
        out.append(line)
    return out


def render_unit(target: Target) -> bytes:
    text = (data_dir() / UNIT).read_text()
    python = sys.executable if target.live else "/usr/bin/python3"
    return text.replace("/usr/bin/python3 -m bootlink", f"{python} -m bootlink").encode()


def render_udev(cfg: Config) -> bytes | None:
    t = triggers_of(cfg)
    if not (t.macs or t.usb_ids):
        return None
    header = _template_header("90-bootlink.rules")
    tail = f'ENV{{NM_UNMANAGED}}="1", TAG+="systemd", ENV{{SYSTEMD_WANTS}}+="{UNIT}"'
    lines = [
        f'SUBSYSTEM=="net", ACTION!="remove", ATTR{{address}}=="{m}", {tail}'
        for m in sorted(t.macs)
    ]
    for uid in sorted(t.usb_ids):
        vendor, product = uid.split(":")
        lines.append(
            f'SUBSYSTEM=="net", ACTION!="remove", ATTRS{{idVendor}}=="{vendor}", '
            f'ATTRS{{idProduct}}=="{product}", {tail}'
        )
    return ("\n".join(header + lines) + "\n").encode()


def render_nm(cfg: Config, target: Target) -> bytes | None:
    if not target.exists("/etc/NetworkManager"):
        return None
    t = triggers_of(cfg)
    specs = [f"mac:{m}" for m in sorted(t.macs)]
    specs += [f"interface-name:{n}" for n in cfg.link.interfaces]
    if not specs:
        return None
    header = _template_header("bootlink-nm.conf")
    return (
        "\n".join([*header, "[keyfile]", "unmanaged-devices=" + ";".join(specs)]) + "\n"
    ).encode()


def render_config(cfg: Config, source: str) -> bytes:
    data = to_dict(dataclasses.replace(cfg, key=KEY_PATH))
    head = (
        f"# bootlink config, installed by 'bootlink setup-server-os' from {source}.\n"
        "# Edit the original and run setup-server-os again (config-example.yaml documents "
        "every key).\n"
    )
    return (head + yaml.safe_dump(data, sort_keys=True)).encode()


def ramdisk_files(cfg: Config, ramdisk: Path) -> list[Wanted]:
    pairs = {
        "vmlinuz": cfg.autokexec.ramdisk_kernel,
        "ramdisk.cpio.zst": cfg.autokexec.ramdisk_initrd,
    }
    manifest = ramdisk / "manifest.json"
    known = _ramdisk_manifest(manifest) if manifest.is_file() else {}
    out = []
    for name, dest in pairs.items():
        src = ramdisk / name
        if not src.is_file():
            raise BootlinkError(
                f"--ramdisk {ramdisk} has no {name}: give the output directory of "
                "'bootlink ramdisk build'"
            )
        data = src.read_bytes()
        if name in known and sha256(data) != known[name]:
            raise BootlinkError(f"{src} does not match {manifest}: rebuild the ramdisk")
        what = "bootlink ramdisk kernel" if name == "vmlinuz" else "bootlink ramdisk (no key)"
        out.append(Wanted(dest, what, data))
    return out


def _ramdisk_manifest(manifest: Path) -> dict[str, str]:
    """The SHA-256 of each file `bootlink ramdisk build` listed in `manifest`."""
    try:
        data = json.loads(manifest.read_bytes())
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            raise ValueError("no 'files' object")
        known = {}
        for name, entry in files.items():
            sha = entry.get("sha256") if isinstance(entry, dict) else None
            if not isinstance(sha, str):
                raise ValueError(f"no sha256 for {name!r}")
            known[name] = sha
        return known
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else " ".join(str(exc).split())
        raise BootlinkError(
            f"{manifest} is not a bootlink ramdisk manifest ({why}): rebuild with "
            f"'bootlink ramdisk build --output {manifest.parent}'"
        ) from None


def wanted_files(
    cfg: Config, cfg_source: str, target: Target, generator: str, ramdisk: Path | None
) -> list[Wanted]:
    triggers_of(cfg)  # bad MACs / USB ids fail here, before anything is written
    key = load_key_file(cfg.key_path)
    out = [
        Wanted(KEY_PATH, "the shared key", key.secret, 0o600, secret=True),
        Wanted(CONFIG_PATH, "bootlink config", render_config(cfg, cfg_source)),
        Wanted(UNIT_PATH, "autokexec service", render_unit(target)),
        Wanted(WANTS_PATH, "enable it at boot", link=UNIT_PATH),
    ]
    if ramdisk is not None:
        out += ramdisk_files(cfg, ramdisk)
    udev = render_udev(cfg)
    if udev is not None:
        out.append(Wanted(UDEV_RULES, "link NIC: start autokexec, NetworkManager off", udev))
    nm = render_nm(cfg, target)
    if nm is not None:
        out.append(Wanted(NM_CONF, "NetworkManager leaves the link NIC alone", nm))
    return out + hook_files(generator)


def hook_digest(files: list[Wanted]) -> str:
    h = hashlib.sha256()
    for w in sorted((w for w in files if w.hook), key=lambda w: w.path):
        h.update(w.path.encode() + b"\0" + w.content + b"\0")
    return h.hexdigest()


# --- install / uninstall -----------------------------------------------------------------


def plan_install(cfg: Config, cfg_source: str, target: Target, args) -> Planner:
    manifest = Manifest.load(target)
    generator = detect_generator(target, args.generator)
    if manifest.generator and manifest.generator != generator:
        raise BootlinkError(
            f"an earlier install used {manifest.generator}, this OS now has {generator}: "
            "run --uninstall first"
        )
    manifest.generator = generator
    planner = Planner(target, manifest, generator)
    wanted = wanted_files(cfg, cfg_source, target, generator, args.ramdisk)
    for w in wanted:
        planner.put(w)
    wanted_paths = {w.path for w in wanted}
    if args.ramdisk is None:  # keep an installed ramdisk when no new one is given
        wanted_paths |= {cfg.autokexec.ramdisk_kernel, cfg.autokexec.ramdisk_initrd}
    for path in sorted(set(manifest.files) - wanted_paths, reverse=True):
        planner.remove(path, "no longer part of the configuration")
    digest = hook_digest(wanted)
    if args.no_initrd:
        pass
    elif manifest.hook_digest != digest:
        planner.regenerate(
            "the initrds must carry the NBD-root hook", planner.kernel_versions(), digest
        )
    return planner


def plan_uninstall(target: Target) -> Planner:
    manifest = Manifest.load(target)
    planner = Planner(target, manifest, manifest.generator or None)
    for path in sorted(manifest.files, reverse=True):
        planner.remove(path, "installed by bootlink setup-server-os")
    restore, regen = {}, set()
    for path, entry in sorted(manifest.initrds.items()):
        p = target.host(path)
        current = file_sha(p) if p.is_file() else None
        if current == entry["sha256"]:
            restore[path] = entry
        else:
            regen.add(entry["kver"])
    for path, entry in restore.items():
        _plan_initrd_restore(planner, path, entry)
    if regen:
        planner.regenerate(
            "rewritten since bootlink regenerated them: regenerate without the hook",
            sorted(v for v in regen if v in planner.kernel_versions()),
            "",
        )
    if not manifest.empty() or manifest.dirs:
        planner.writes |= {MANIFEST, BACKUP_DIR + "/x", *(d + "/x" for d in manifest.dirs)}
        planner.actions.append(
            Action(
                f"remove {MANIFEST}, {BACKUP_DIR}/ and the directories bootlink created",
                [", ".join(sorted(set(manifest.dirs))) or "none"],
                lambda: _finish_uninstall(planner),
            )
        )
    return planner


def _plan_initrd_restore(planner: Planner, path: str, entry: dict) -> None:
    backup = entry.get("backup")
    planner.writes |= {path, backup} if backup else {path}
    title = f"restore {path} from {backup}" if backup else f"remove {path} (bootlink created it)"

    def apply() -> None:
        p = planner.t.host(path)
        if backup:
            planner._restore(backup, path)
        elif p.exists():
            p.unlink()
        planner.m.initrds.pop(path, None)

    planner.actions.append(Action(title, ["unchanged since bootlink regenerated it"], apply))


def _finish_uninstall(planner: Planner) -> None:
    t, m = planner.t, planner.m
    for entry in list(m.initrds.values()):  # regenerated anew: the old copies are obsolete
        if entry.get("backup") and t.exists(entry["backup"]):
            t.host(entry["backup"]).unlink()
    m.initrds.clear()
    mp = t.host(MANIFEST)
    if mp.exists():
        mp.unlink()
    backups = t.host(BACKUP_DIR)
    if backups.is_dir():
        for d in sorted((p for p in backups.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
        if not any(backups.iterdir()):
            backups.rmdir()
    for d in sorted(set(m.dirs), key=lambda s: s.count("/"), reverse=True):
        p = t.host(d)
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            p.rmdir()
    m.dirs.clear()
    m.generator = ""
    m.hook_digest = ""


# --- the command -----------------------------------------------------------------------------


def _ask(title: str) -> str:
    while True:
        try:
            answer = input(f"apply '{title}'? [y]es/[n]o/[a]ll/[q]uit: ").strip().lower()
        except EOFError:
            return "q"
        if answer[:1] in ("y", "n", "a", "q"):
            return answer[:1]


def run_setup(args) -> int:
    target = Target(args.root)
    if args.uninstall:
        planner = plan_uninstall(target)
    else:
        if args.config is None:
            raise BootlinkError("--config FILE is required (except with --uninstall)")
        cfg = load_config(args.config)
        planner = plan_install(cfg, str(args.config), target, args)
        if not target.exists(cfg.autokexec.ramdisk_kernel) and args.ramdisk is None:
            print(
                f"note: no ramdisk at {cfg.autokexec.ramdisk_kernel}: autokexec will refuse "
                "to start until you run this again with --ramdisk DIR (bootlink ramdisk build)"
            )
    actions = planner.actions
    if actions and not args.dry_run:
        planner.check_writable()
    label = f" in {target.root}" if not target.live else ""
    if not actions:
        print(
            f"nothing to change{label}: bootlink is "
            f"{'not installed' if args.uninstall else 'installed and up to date'}"
        )
        return 0
    print(f"{len(actions)} change(s){label}:")
    apply_all = args.yes
    applied = 0
    try:
        for i, action in enumerate(actions, 1):
            print(f"\n[{i}/{len(actions)}] {action.title}")
            for line in action.detail:
                print(f"    {line}")
            if args.dry_run:
                continue
            if not apply_all:
                answer = _ask(action.title)
                if answer == "q":
                    print("stopped: the remaining changes were not applied")
                    break
                if answer == "n":
                    print("    skipped")
                    continue
                apply_all = answer == "a"
            try:
                action.apply()
            except OSError as exc:
                where = f" ({exc.filename})" if exc.filename else ""
                kept = (
                    "recorded" if _saved(planner) else "NOT recorded (--uninstall cannot undo them)"
                )
                raise BootlinkError(
                    f"'{action.title}' failed: {exc.strerror or exc}{where}; the {applied} "
                    f"change(s) before it are applied and {kept}: fix that and run "
                    "setup-server-os again (or --uninstall to undo them)"
                ) from None
            applied += 1
    except BaseException:
        if not args.dry_run:  # record what was done, so --uninstall can undo it
            _saved(planner)
        raise
    if args.dry_run:
        print("\ndry run: nothing was changed")
        return 0
    try:
        planner.save_manifest()
    except OSError as exc:
        raise BootlinkError(
            f"cannot write {MANIFEST}{label}: {exc.strerror or exc}; {applied} change(s) "
            "were applied but not recorded, so --uninstall cannot undo them: fix that and "
            "run setup-server-os again"
        ) from None
    print(f"\n{applied} of {len(actions)} change(s) applied{label}")
    if not args.uninstall and target.live and applied:
        print(f"start it now with: systemctl daemon-reload && systemctl start {UNIT}")
    return 0
