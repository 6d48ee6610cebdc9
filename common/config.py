"""bootlink's YAML configuration, validated into typed dataclasses.

The keys documented in DESIGN.md are a contract between releases: new keys may be added
(with defaults), existing ones are never renamed. `config-example.yaml` documents every
key. Validation is generic over the dataclass fields below, so adding a key is adding a
field; errors name the file, the dotted key and what to write instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DEFAULT_CONFIG = Path("/etc/bootlink/config.yaml")


@dataclass(frozen=True)
class LinkConfig:
    interfaces: list[str] = field(default_factory=list)  # [] = every NIC but lo
    mtu: int = 1500
    discovery_port: int = 7471  # UDP, IPv6 link-local multicast ff02::1
    http_port: int = 7472  # TCP, sealed boot payload
    nbd_port: int = 10809  # TCP, the IANA NBD port


@dataclass(frozen=True)
class BootFiles:
    kernel: str = "/boot/vmlinuz"
    initrd: str = "/boot/initrd.img"
    cmdline: str = ""


@dataclass(frozen=True)
class ServerConfig:
    disk: str = ""
    read_only: bool = False
    export_name: str = "bootlink"
    boot: BootFiles = field(default_factory=BootFiles)


@dataclass(frozen=True)
class ClientConfig:
    timeout: float = 30.0
    cmdline_append: str = ""
    sources: list[str] = field(default_factory=lambda: ["link"])
    download_dir: str = "/run/bootlink"  # tmpfs in the ramdisk; kernel+initrd land here
    # Sources other than the laptop link (swarm:<ref>, ipfs:<cid>, https://...):
    bee_api: str = "http://localhost:1633"  # Bee node API used for swarm: sources
    # A Bee binary to run as an ultra-light node for swarm: sources instead (in the
    # ramdisk: /usr/local/bin/bee from `ramdisk build --bee`). "" = use bee_api.
    bee_node: str = ""
    ipfs_gateway: str = "http://localhost:8080"  # trustless gateway used for ipfs: sources
    trusted_keys: list[str] = field(default_factory=list)  # Ed25519 public keys (files or hex)
    allow_unsigned: list[str] = field(default_factory=list)  # source specs allowed unsigned
    menu_timeout: float = 5.0  # seconds before the boot menu takes its default
    # How sources other than the link reach their nodes: "auto" = DHCP on every NIC
    # when nothing is configured (the ramdisk), "dhcp" = always, "none" = never.
    lan: str = "auto"
    # "SIZE!START" (e.g. "2G!4G"): the stick's kernel gets memmap=SIZE!START, so that RAM
    # becomes /dev/pmem0 where a distro ISO is staged for the next kernel. "" = off.
    iso_memory: str = ""


@dataclass(frozen=True)
class AutokexecConfig:
    """The laptop's normal OS: when to kexec into the bootlink ramdisk as server."""

    macs: list[str] = field(default_factory=list)  # link NICs whose appearance triggers
    usb_ids: list[str] = field(default_factory=list)  # "vvvv:pppp" USB NICs that trigger
    remote_trigger: bool = True  # a desktop's authenticated trigger request
    confirm: bool = False  # ask on the console first (Enter/y: now, n: no)
    confirm_timeout: float = 10.0  # seconds; no answer by then means yes
    ramdisk_kernel: str = "/var/lib/bootlink/vmlinuz"
    ramdisk_initrd: str = "/var/lib/bootlink/ramdisk.img"
    extra_cmdline: str = ""  # appended to the ramdisk's kernel command line


@dataclass(frozen=True)
class Config:
    key: str = "/etc/bootlink/key"
    link: LinkConfig = field(default_factory=LinkConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    autokexec: AutokexecConfig = field(default_factory=AutokexecConfig)
    source: str = "<defaults>"  # where this config came from, for error messages

    @property
    def key_path(self) -> Path:
        return Path(self.key)


def load_config(path: Path | str) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found: copy config-example.yaml there and edit it"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"config file {path} is a directory: name the YAML file (see config-example.yaml)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not a text (UTF-8) YAML file: {exc.reason} at byte {exc.start}; "
            "give bootlink's YAML config (see config-example.yaml)"
        ) from None
    return parse_config(text, source=str(path))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:  # 1-based lines
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" then overriding keys is how merging works
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, line, seen[key])
                    seen[key] = line
                except TypeError:
                    continue  # unhashable: the base class reports it
        return super().construct_mapping(node, deep=deep)


def parse_config(text: str, source: str = "<string>") -> Config:
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{source}: line {exc.line}: key '{exc.key}' is given twice in the same mapping "
            f"(first on line {exc.first}): keep one of them"
        ) from None
    except yaml.reader.ReaderError as exc:  # a control character such as NUL
        raise ConfigError(
            f"{source} is not a text YAML file: character U+{exc.character:04X} at position "
            f"{exc.position} is not allowed; give bootlink's YAML config (see "
            "config-example.yaml)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML: fix the syntax there") from None
    if data is None:
        data = {}
    cfg = dataclasses.replace(_build(Config, data, source, prefix=""), source=source)
    _validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = dataclasses.replace(_build(Config, data, source, prefix=""), source=source)
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (for embedding into a ramdisk or printing)."""
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping of keys, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for name in data:
        if name not in known:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{name}': valid keys here are "
                f"{', '.join(sorted(known))}"
            )
    kwargs = {}
    for name in known:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, prefix + name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, source, key + ".")
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, source, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, e.g. [a, b]; got {_kind(value)}")
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping; got {_kind(value)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be a whole number; got {value!r}")
        return value
    if hint is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{source}: '{key}' must be a number, e.g. 30; got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{source}: '{key}' must be a finite number, e.g. 30; got {value!r}")
        return number
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{source}: '{key}' must be text; got {_kind(value)}")
        return str(value)
    return value


def _number(value: Any) -> float | None:
    """A float key's value as a float (inf/nan included: the caller refuses them); None if
    it is no number. YAML 1.1 reads 1e3 (no dot) as text, so numeric text counts too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), repr(value))


_MEM_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
ISO_MEMORY_MIN_START = 4 << 30  # kexec-tools places segments below 4 GiB by the firmware map
ISO_MEMORY_ALIGN = 128 << 20  # a memory section: nd_pmem maps the range as device pages


def iso_memory_range(text: str) -> tuple[int, int] | None:
    """client.iso_memory "SIZE!START" as (size, start) in bytes; None if off or malformed."""
    m = re.fullmatch(r"(\d+)([KMGT]?)!(\d+)([KMGT]?)", text.strip().upper())
    if not m:
        return None
    size = int(m.group(1)) << _MEM_UNITS[m.group(2)]
    start = int(m.group(3)) << _MEM_UNITS[m.group(4)]
    return size, start


MAX_SECONDS = 366 * 24 * 3600  # a year: far below what timers take (threading.TIMEOUT_MAX)


def _check_seconds(cfg: Config, key: str, value: float, zero: str) -> None:
    """A duration: > 0 (or >= 0 when `zero` says what 0 means) and at most MAX_SECONDS."""
    low_ok = value >= 0 if zero else value > 0
    if low_ok and value <= MAX_SECONDS:
        return
    allowed = f"0..{MAX_SECONDS} seconds ({zero})" if zero else f"> 0 and <= {MAX_SECONDS} seconds"
    raise ConfigError(f"{cfg.source}: '{key}' must be {allowed}; got {value:g}")


def _validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    for name in ("discovery_port", "http_port", "nbd_port"):
        port = getattr(cfg.link, name)
        if not 1 <= port <= 65535:
            raise ConfigError(f"{cfg.source}: 'link.{name}' must be 1..65535; got {port}")
    if not 1280 <= cfg.link.mtu <= 65535:
        raise ConfigError(
            f"{cfg.source}: 'link.mtu' must be 1280..65535 (IPv6 minimum 1280); got {cfg.link.mtu}"
        )
    twice = sorted({n for n in cfg.link.interfaces if cfg.link.interfaces.count(n) > 1})
    if twice:
        raise ConfigError(
            f"{cfg.source}: 'link.interfaces' names {', '.join(twice)} twice: list each NIC once"
        )
    if "lo" in cfg.link.interfaces:
        raise ConfigError(
            f"{cfg.source}: 'link.interfaces' cannot use lo (loopback is no link): name the "
            "link NIC, or leave the list empty for every NIC"
        )
    _check_seconds(cfg, "client.timeout", cfg.client.timeout, zero="")
    if cfg.client.menu_timeout >= 0:  # negative: wait for a choice (GRUB's timeout=-1)
        _check_seconds(
            cfg, "client.menu_timeout", cfg.client.menu_timeout, zero="0 = boot the default at once"
        )
    _check_seconds(cfg, "autokexec.confirm_timeout", cfg.autokexec.confirm_timeout, zero="")
    if cfg.client.lan not in ("auto", "dhcp", "none"):
        raise ConfigError(
            f"{cfg.source}: 'client.lan' must be auto, dhcp or none; got {cfg.client.lan!r}"
        )
    if cfg.client.iso_memory:
        rng = iso_memory_range(cfg.client.iso_memory)
        if (
            rng is None
            or rng[0] <= 0
            or rng[1] < ISO_MEMORY_MIN_START
            or rng[0] % ISO_MEMORY_ALIGN
            or rng[1] % ISO_MEMORY_ALIGN
        ):
            raise ConfigError(
                f"{cfg.source}: 'client.iso_memory' must be SIZE!START with START 4G or more, "
                f'both multiples of 128M (e.g. "2G!4G"), or "" for off; '
                f"got {cfg.client.iso_memory!r}"
            )
    if not cfg.server.export_name or "/" in cfg.server.export_name:
        raise ConfigError(
            f"{cfg.source}: 'server.export_name' must be a non-empty name without '/'"
        )
