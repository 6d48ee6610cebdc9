"""The Python half of the ramdisk's /init: kernel command line -> config -> role.

/init (shell) mounts, loads drivers, then runs `python3 -m bootlink.ramdisk.boot`. This
reads `bootlink.*` keys from /proc/cmdline:

  bootlink.role=server|client|selftest   which role to run (default client)
  bootlink.config=/path                  config file (default: the embedded
                                         /etc/bootlink/config.yaml)
  bootlink.args="--dry-run --json"       extra arguments for the role's command
  bootlink.<section>.<key>=<value>       override one config key, value as YAML
                                         (bootlink.server.disk=/dev/nvme0n1,
                                         bootlink.link.interfaces=[eth1])
  bootlink.key=/path                     the key file (a top-level config key)

and runs `bootlink <role> --config /run/bootlink/config.yaml` in this process (a second
interpreter start costs seconds under emulation). Keys the target kernel's NBD hook
reads (bootlink.nbd_host...) are ignored here.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_CONFIG = Path("/etc/bootlink/config.yaml")
RUN_CONFIG = Path("/run/bootlink/config.yaml")
ROLES = ("server", "client", "selftest")
# Read by /init itself or by the target kernel's initrd hook, never config overrides.
RESERVED = {
    "role", "config", "args", "shell", "poweroff", "importtime",
    "nbd_host", "nbd_port", "nbd_export", "if_mac", "nbd_ro",
}  # fmt: skip
SECTIONS = ("key", "link", "server", "client")


class BootArgsError(ValueError):
    """The kernel command line holds a bootlink.* key that cannot be used."""


@dataclass
class BootArgs:
    role: str = "client"
    config: Path | None = None
    args: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # nested, as in the YAML


def milestone(name: str) -> None:
    """One console line the QEMU harness and a human can both read (uptime in seconds)."""
    try:
        up = Path("/proc/uptime").read_text().split()[0]
    except OSError:
        up = f"{time.monotonic():.2f}"
    print(f"bootlink-milestone: {name} uptime={up}", flush=True)


def parse_cmdline(cmdline: str) -> BootArgs:
    out = BootArgs()
    try:
        words = shlex.split(cmdline)
    except ValueError as exc:
        raise BootArgsError(f"kernel command line does not parse ({exc})") from None
    for word in words:
        if not word.startswith("bootlink."):
            continue
        key, sep, value = word[len("bootlink.") :].partition("=")
        if not sep:
            raise BootArgsError(f"'{word}' has no value: write bootlink.{key}=VALUE")
        if key == "role":
            if value not in ROLES:
                raise BootArgsError(f"bootlink.role={value}: use one of {', '.join(ROLES)}")
            out.role = value
        elif key == "config":
            out.config = Path(value)
        elif key == "args":
            out.args = shlex.split(value)
        elif key in RESERVED:
            continue
        else:
            path = key.split(".")
            if path[0] not in SECTIONS or (path[0] == "key") != (len(path) == 1):
                raise BootArgsError(
                    f"bootlink.{key}: not a config key; use bootlink.<section>.<key>=value "
                    f"with section one of link, server, client (or bootlink.key=PATH)"
                )
            import yaml

            try:
                parsed = yaml.safe_load(value) if value else ""
            except yaml.YAMLError:
                parsed = value
            node = out.overrides
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = parsed
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config(args: BootArgs, embedded: Path = EMBEDDED_CONFIG) -> dict[str, Any]:
    """The config as data: the file (named or embedded) with the command line's overrides."""
    import yaml

    path = args.config or embedded
    data: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise BootArgsError(f"{path} is not a YAML mapping of config keys")
        data = loaded or {}
    elif args.config is not None:
        raise BootArgsError(f"bootlink.config={path}: no such file in the ramdisk")
    elif not args.overrides:
        raise BootArgsError(
            "no config: embed one (bootlink ramdisk build --config F) or pass "
            "bootlink.config=/path or bootlink.<section>.<key>=value"
        )
    return merge(data, args.overrides)


def selftest() -> int:
    """What the roles need, imported and run once: proves the ramdisk is complete."""
    import importlib

    for mod in (
        "cryptography.hazmat.primitives.cmac", "yaml", "pyroute2", "psutil", "nbd",
        "Cryptodome.Cipher.AES", "sqlite3", "http.server", "urllib.request", "ctypes",
        "bootlink.client.boot", "bootlink.server.main",
        "pycdlib", "bootlink.client.sources.iso",  # iso: sources (imported only when used)
    ):  # fmt: skip
        importlib.import_module(mod)
    milestone("imports ok")
    import ssl

    from bootlink.client import lan

    # https:// sources verify the server against the CA store (ca-certificates), and
    # sources on the LAN take a DHCP lease with busybox's udhcpc.
    cas = ssl.create_default_context().cert_store_stats()["x509_ca"]
    if not cas:
        raise SystemExit("selftest: no CA certificates: https:// sources cannot verify servers")
    milestone(f"tls trust store: {cas} CAs; dhcp client: {' '.join(lan._udhcpc())}")
    from bootlink import cli

    parser = cli.build_parser()
    parser.format_help()
    milestone("bootlink --help ran")
    return 0


# The role's heavy imports, done while /init still loads drivers (an optimisation only:
# a missing module is reported when the role really imports it).
PREFETCH = {
    "client": ("bootlink.client.boot", "bootlink.cli"),
    "server": ("bootlink.server.main", "bootlink.cli"),
    "selftest": (),
}


def prefetch(role: str) -> None:
    import contextlib
    import importlib

    for name in PREFETCH.get(role, ()):
        with contextlib.suppress(Exception):  # the role's own import reports it
            importlib.import_module(name)


def wait_for_drivers(flag: str | None, timeout: float = 120.0) -> None:
    """Block until /init says the drivers are loaded (it creates `flag`)."""
    if not flag:
        return
    deadline = time.monotonic() + timeout
    while not Path(flag).exists():
        if time.monotonic() > deadline:
            print(f"bootlink: {flag} never appeared; going on anyway", flush=True)
            return
        time.sleep(0.02)


def main() -> int:
    import os

    milestone("python up")
    try:
        args = parse_cmdline(Path("/proc/cmdline").read_text())
    except (BootArgsError, OSError) as exc:
        print(f"bootlink: {exc}", file=sys.stderr, flush=True)
        return 2
    prefetch(args.role)
    milestone(f"{args.role} code imported")
    wait_for_drivers(os.environ.get("BOOTLINK_DRIVERS_READY"))
    if args.role == "selftest":
        return selftest()
    import yaml

    from bootlink.common.config import config_from_dict, to_dict
    from bootlink.common.errors import BootlinkError

    try:
        data = resolve_config(args)
        cfg = config_from_dict(data, source=str(args.config or EMBEDDED_CONFIG))
    except (BootArgsError, BootlinkError, yaml.YAMLError) as exc:
        print(f"bootlink: config: {exc}", file=sys.stderr, flush=True)
        return 2
    RUN_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    RUN_CONFIG.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=True))
    from bootlink import cli

    argv = [args.role, "--config", str(RUN_CONFIG), *args.args]
    milestone(f"bootlink {' '.join(argv)}")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
