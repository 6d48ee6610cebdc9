"""End-to-end scenarios in QEMU, shared by `bootlink test-qemu`, `bootlink demo`, the
pytest system test and the boot benchmark.

client scenario: a laptop-side `bootlink server` runs in a private namespace on the tap of
  the guest's live NIC (the guest has three NICs; the other two taps are dead cables);
  the guest boots the ramdisk as client, finds the server, downloads, kexecs into the
  Debian kernel whose initramfs-tools initrd (with bootlink's hook) mounts the exported
  disk's root over NBD; the target's init prints a marker line.
server scenario: the guest boots the ramdisk as server, exporting a virtio disk, with
  the boot files embedded in its config layer; a `bootlink client --dry-run --json` in the
  namespace finds it, downloads and checks the NBD export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bootlink.common.config import Config, config_from_dict, iso_memory_range, to_dict
from bootlink.common.errors import BootlinkError
from bootlink.common.keys import generate_key_file, load_key_file, write_private_file

from . import build as rbuild
from . import qemu, target
from .kernel import Kernel, fetch_kernel

LIVE_NIC = 1  # of three: a dead cable on either side of the live one
GUEST_CMDLINE = "console=ttyS0 loglevel=5 panic=-1"
TARGET_CMDLINE = "ro console=ttyS0 loglevel=5 panic=-1"
FAIL_RE = r"Kernel panic|bootlink-milestone: bootlink \S+ failed|rescue shell"


@dataclass
class Artifacts:
    """Everything a scenario boots; built once, cached under `cache`."""

    cache: Path
    ramdisk: Path  # ramdisk.cpio.zst (no config)
    vmlinuz: Path
    kernel: Kernel
    disk: target.TargetDisk
    target_initrd: Path
    manifest: dict


def prepare(cache: Path, out: Path, zstd_level: int = rbuild.DEFAULT_ZSTD_LEVEL) -> Artifacts:
    """Build (or reuse) the ramdisk, the target disk and the target initrd."""
    cache, out = Path(cache), Path(out)
    res = rbuild.build(rbuild.BuildOptions(output=out, cache=cache, zstd_level=zstd_level))
    kernel = fetch_kernel(cache)
    print("[e2e] target disk (ext4 root with a marker init, GPT) ...", file=sys.stderr)
    disk = target.build_target_disk(cache)
    print("[e2e] target initrd (Debian initramfs-tools + bootlink hook, cached) ...",
          file=sys.stderr)  # fmt: skip
    t0 = time.monotonic()
    initrd = target.build_target_initrd(cache, kernel, rbuild.host_apt_sources())
    print(f"[e2e] target initrd ready in {time.monotonic() - t0:.1f} s: {initrd}",
          file=sys.stderr)  # fmt: skip
    return Artifacts(cache, res.ramdisk, res.vmlinuz, kernel, disk, initrd, res.manifest)


def make_initrd(art: Artifacts, cfg: Config, dest: Path, embed: dict[str, Path]) -> Path:
    """ramdisk + a config layer (config, key and `embed`ded files): what QEMU boots."""
    layer = dest.with_suffix(".config.cpio.zst")
    rbuild.config_layer(cfg, layer, rbuild.DEFAULT_EPOCH, embed)
    rbuild._concat([art.ramdisk, layer], dest, 0o600)
    layer.unlink()
    return dest


@dataclass
class Result:
    scenario: str
    ok: bool
    milestones: dict[str, float] = field(default_factory=dict)
    marker: str = ""
    detail: str = ""
    console_log: str = ""
    plan: dict = field(default_factory=dict)


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A helper process (server or client) with output to `log`; killed by PID after."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _bootlink_cmd() -> list[str]:
    return [sys.executable, "-m", "bootlink"]


def _nics(count: int = 3) -> list[qemu.Nic]:
    return [qemu.Nic(f"bltap{i}", qemu.mac_for(i + 1)) for i in range(count)]


def _write_config(data: dict, path: Path) -> Config:
    cfg = config_from_dict(data, source=str(path))
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=True))
    return cfg


def _key(workdir: Path, key_from: Path | None) -> Path:
    """A fresh key per run, or a copy of the user's (mode 0600) when one is given."""
    key = workdir / "key"
    key.unlink(missing_ok=True)
    if key_from is None:
        generate_key_file(key)
    else:
        write_private_file(key, load_key_file(key_from).secret)
    return key


def _scenario_setup(art: Artifacts, workdir: Path, key_from: Path | None):
    """What both scenarios start from: the key, a private copy of the laptop disk, NICs."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = _key(workdir, key_from)
    disk = workdir / "laptop-disk.img"
    subprocess.run(["cp", "--sparse=always", str(art.disk.image), str(disk)], check=True)
    return key, disk, _nics()


# QEMU's pc machine keeps guest RAM below 4 GiB up to 3.5 GiB; from there on it puts 3 GiB
# below 4 GiB and the rest at 4 GiB and up.
_PC_SPLIT_FROM, _PC_LOW = 3584 << 20, 3 << 30


def memmap_for(iso_memory: str, memory_mib: int) -> tuple[str, int]:
    """client.iso_memory as the guest's memmap= argument, and QEMU RAM (MiB) holding it.

    The range must be real RAM (pmem over a hole reads back nothing), and the ramdisk
    keeps `memory_mib` beside it. QEMU only touches the guest RAM the guest uses."""
    if not iso_memory:
        return "", memory_mib
    rng = iso_memory_range(iso_memory)
    if rng is None:
        raise BootlinkError(f"iso memory {iso_memory!r} is not SIZE!START: write e.g. 2G!4G")
    size, start = rng
    need = max(memory_mib << 20, 0) + size
    if start >= 4 << 30:
        need = max(need, _PC_SPLIT_FROM, start + size - (4 << 30) + _PC_LOW)
    else:
        need = max(need, start + size)
    return f"memmap={iso_memory.strip().upper()}", -(-need // (1 << 20))


def run_client_scenario(
    art: Artifacts,
    workdir: Path,
    timeout: float = 240.0,
    cpus: int = 1,
    memory: int = 1024,
    key_from: Path | None = None,
    root_arg: str | None = None,
    iso_memory: str = "",
) -> Result:
    """Guest = client (ramdisk), host namespace = `bootlink server`; waits for the marker.

    `root_arg` replaces the target's `root=UUID=...` (e.g. "root=/dev/nbd0p1").
    `iso_memory` (client.iso_memory, "SIZE!START") boots the guest with memmap= as the
    stick would, with enough QEMU RAM behind the range."""
    memmap, memory = memmap_for(iso_memory, memory)
    key, disk, nics = _scenario_setup(art, workdir, key_from)
    live = nics[LIVE_NIC].tap
    host_cfg_path = workdir / "server.yaml"
    _write_config(
        {
            "key": str(key),
            "link": {"interfaces": [live]},
            "server": {
                "disk": str(disk),
                "boot": {
                    "kernel": str(art.vmlinuz),
                    "initrd": str(art.target_initrd),
                    "cmdline": f"{root_arg or 'root=UUID=' + art.disk.fs_uuid} {TARGET_CMDLINE}",
                },
            },
        },
        host_cfg_path,
    )
    guest_cfg = config_from_dict(
        {"key": str(key), "client": {"timeout": 90, "menu_timeout": 0}}, source="guest"
    )
    initrd = make_initrd(art, guest_cfg, workdir / "client-initrd.img", {})
    console = workdir / "client-console.log"
    res = Result("client", False, console_log=str(console))
    with qemu.namespace() as ns:
        for nic in nics:
            ns.add_tap(nic.tap)
        server_cmd = [*ns.exec_prefix, *_bootlink_cmd(), "server", "--config", str(host_cfg_path)]
        with _process(server_cmd, workdir / "server.log") as server:
            vm = qemu.VM(
                art.vmlinuz, initrd, f"{GUEST_CMDLINE} bootlink.role=client {memmap}".rstrip(),
                nics, ns, memory_mib=memory, cpus=cpus, log_path=console,
            )  # fmt: skip
            with vm:
                try:
                    line = vm.wait_for(art.disk.marker, timeout, fail=FAIL_RE)
                    res.ok, res.marker = True, line.text
                    res.milestones = _milestones(vm.console, line)
                except BootlinkError as exc:
                    res.detail = str(exc)
                    res.milestones = _milestones(vm.console, None)
            if server.poll() is not None:
                res.detail += f"\nserver exited with {server.returncode}"
    res.detail += "\nserver log tail:\n" + _tail(workdir / "server.log")
    return res


def run_server_scenario(
    art: Artifacts,
    workdir: Path,
    timeout: float = 240.0,
    cpus: int = 1,
    memory: int = 1024,
    key_from: Path | None = None,
) -> Result:
    """Guest = server (ramdisk, virtio disk), host namespace = `bootlink client --dry-run`."""
    key, disk, nics = _scenario_setup(art, workdir, key_from)
    live = nics[LIVE_NIC].tap
    guest_cfg = config_from_dict(
        {
            "key": str(key),
            "server": {
                "disk": "/dev/vda",
                "boot": {
                    "kernel": "/etc/bootlink/boot/vmlinuz",
                    "initrd": "/etc/bootlink/boot/initrd.img",
                    "cmdline": f"root=UUID={art.disk.fs_uuid} {TARGET_CMDLINE}",
                },
            },
        },
        source="guest",
    )
    embed = {
        "etc/bootlink/boot/vmlinuz": art.vmlinuz,
        "etc/bootlink/boot/initrd.img": art.target_initrd,
    }
    initrd = make_initrd(art, guest_cfg, workdir / "server-initrd.img", embed)
    client_cfg = workdir / "client.yaml"
    _write_config(
        {"key": str(key), "link": {"interfaces": [live]}, "client": {"timeout": 90}}, client_cfg
    )
    console = workdir / "server-console.log"
    res = Result("server", False, console_log=str(console))
    with qemu.namespace() as ns:
        for nic in nics:
            ns.add_tap(nic.tap)
        vm = qemu.VM(
            art.vmlinuz, initrd, f"{GUEST_CMDLINE} bootlink.role=server", nics, ns,
            memory_mib=memory, cpus=cpus, log_path=console,
            extra=["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"],
        )  # fmt: skip
        with vm:
            try:
                vm.wait_for(r"bootlink-milestone: bootlink server", timeout, fail=FAIL_RE)
                t0 = time.monotonic() - vm.console.t0
                client_cmd = [
                    *ns.exec_prefix, *_bootlink_cmd(), "client", "--config", str(client_cfg),
                    "--dry-run", "--json",
                ]  # fmt: skip
                proc = subprocess.run(
                    client_cmd, capture_output=True, text=True, timeout=timeout, check=False
                )
                (workdir / "client.log").write_text(proc.stderr)
                res.milestones = _milestones(vm.console, None)
                res.milestones["client started"] = round(t0, 3)
                res.milestones["client done"] = round(time.monotonic() - vm.console.t0, 3)
                res.milestones = dict(sorted(res.milestones.items(), key=lambda kv: kv[1]))
                if proc.returncode != 0:
                    res.detail = f"client exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                else:
                    res.plan = json.loads(proc.stdout)
                    res.ok = bool(res.plan.get("nbd_uri"))
                    res.marker = json.dumps(res.plan, sort_keys=True)
            except (BootlinkError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                res.detail = str(exc)
                res.milestones = _milestones(vm.console, None)
            res.detail += "\nguest console tail:\n" + vm.console.tail(30)
    return res


# Console lines that mark the later milestones (the client's own log lines).
PATTERNS = {
    "server serving": r"bootlink\.server: serving",
    "probing": r"bootlink\.client\.link: probing",
    "server found": r"bootlink\.client\.probe: server .* found on",
    "downloaded": r"download: 100%.*done",
    "kexec": r"bootlink\.kexec: .*executing",
    "target root attached": r"bootlink: NBD root attached",
}
KERNEL_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]")


def _milestones(console: qemu.ConsoleLog | None, marker: qemu.ConsoleLine | None) -> dict:
    """Seconds since QEMU start: the ramdisk's milestones, the client's log lines, and the
    second kernel's start (first kernel-stamped line after the kexec minus its stamp)."""
    if console is None:
        return {}
    out = console.milestones()
    after_kexec = False
    for ln in console.lines:
        stamp = KERNEL_STAMP.match(ln.text)
        if after_kexec and "second kernel" not in out and stamp:
            out["second kernel"] = round(ln.t - float(stamp.group(1)), 3)
        for name, pat in PATTERNS.items():
            if name not in out and re.search(pat, ln.text):
                out[name] = ln.t
                after_kexec = after_kexec or name == "kexec"
    if marker is not None:
        out["target marker"] = marker.t
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def workdir_for(base: Path | None) -> Path:
    return Path(base) if base else Path(tempfile.mkdtemp(prefix="bootlink-e2e-"))


def as_dict(res: Result) -> dict:
    return dataclasses.asdict(res)
