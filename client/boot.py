"""`bootlink client`: gather BootImages from the configured sources, pick one, kexec it.

`--dry-run` does everything but the kexec; `--json` prints the plan (a contract:
{"interface", "server", "kernel_sha256", "initrd_sha256", "cmdline", "nbd_uri"}, extended
with more keys, never renamed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootlink.common.bootimage import BootImage, check_digests
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError, Interrupted
from bootlink.common.output_file import make_dir, removed_on_failure

from . import menu
from .link_source import boot_from_link

log = logging.getLogger("bootlink.client")


def plan_of(image: BootImage) -> dict[str, Any]:
    return {
        "interface": image.extra.get("interface", ""),
        "server": image.provenance.locator,
        "kernel_sha256": image.kernel_sha256,
        "initrd_sha256": image.initrd_sha256,
        "cmdline": image.cmdline,
        "nbd_uri": image.extra.get("nbd_uri", ""),
        # extensions
        "label": image.label,
        "source": image.provenance.source,
        "verified_by": image.provenance.verified_by,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd) if image.initrd else "",
        # kexec.prepare acts on these before loading: the root squashfs is appended to
        # the initrd, an ISO appended to it (initrd mode) or copied into this kernel's
        # /dev/pmemN (pmem mode)
        "rootfs": image.extra.get("rootfs", ""),
        "pmem_iso": image.extra.get("iso", "") if image.extra.get("memmap") else "",
        "initrd_iso": image.extra.get("iso", "") if image.extra.get("initrd_iso") else "",
    }


def resolve_link(spec: str, cfg: Config, workdir: Path, progress: bool) -> list[BootImage]:
    """The laptop link as a `client.sources` kind (see bootlink.client.sources)."""
    if spec != "link":
        raise BootlinkError(f"source '{spec}': the laptop link is spelled just 'link'")
    return [boot_from_link(cfg, progress=progress).image]


def _resolver_for(spec: str):
    if spec.strip() == "link":
        return resolve_link
    # imported only for other sources: they cost ~0.4 s of imports under emulation, on
    # the way to the laptop link, which matters most
    from . import sources

    kind = sources.spec_kind(spec)
    if kind not in sources.SOURCE_KINDS:
        known = ", ".join(sorted([*sources.SOURCE_KINDS, "link"]))
        raise BootlinkError(f"unknown kind '{kind}'; known: {known}")
    return sources.SOURCE_KINDS[kind]


def _made_for(spec: str, resolve) -> Callable[[str], bool]:
    """The folders a failed source leaves for removal (the link's files clean up after
    themselves; it makes no folders)."""
    if resolve is resolve_link:
        return lambda _name: False
    from .sources.resolvers import made_for

    return made_for(spec.strip())


def choose_image(cfg: Config, progress: bool) -> BootImage:
    """Every configured source's images, then the menu (the link ranks first)."""
    if not cfg.client.sources:
        raise BootlinkError(
            "client.sources is empty: list at least one source, e.g. [link] (see "
            "config-example.yaml)"
        )
    workdir = Path(cfg.client.download_dir)
    images, errors = [], []
    with contextlib.ExitStack() as services:  # a Bee node we started, stopped before the menu
        reach = _Reach(services, workdir)
        for spec in cfg.client.sources:
            try:
                resolve = _resolver_for(spec)
                make_dir(workdir)
                spec_cfg = reach.prepare(spec.strip(), cfg)
                with removed_on_failure(workdir, _made_for(spec, resolve)):
                    found = _resolve_patiently(resolve, spec.strip(), spec_cfg, workdir, progress)
                if resolve is not resolve_link:  # the link puts it after its NBD words itself
                    found = [_append_cmdline(img, cfg.client.cmdline_append) for img in found]
                images.extend(found)
            except BootlinkError as exc:
                if len(cfg.client.sources) == 1:
                    raise  # the one source's own one-line error says it best
                log.warning("source %s: %s", spec, exc)
                errors.append(f"{spec}: {exc}")
    if not images:
        raise BootlinkError("no source gave a bootable image (" + "; ".join(errors) + ")")
    images.sort(key=lambda img: img.provenance.source != "link")
    return menu.choose(images, timeout=cfg.client.menu_timeout)


@dataclass
class _Reach:
    """What sources other than the link need, set up once, right before the first source
    that needs it: the LAN (lan.py), and for swarm: a Bee node of our own if
    client.bee_node names one (bee_node.py; the sources then use it instead of bee_api).
    Imported only then, as the sources are: the laptop link needs none of it."""

    services: contextlib.ExitStack
    workdir: Path
    lan_done: bool = False
    bee: Config | BootlinkError | None = None  # the config using our node, or why it failed

    def prepare(self, spec: str, cfg: Config) -> Config:
        if spec == "link":
            return cfg
        from . import lan, sources

        if not self.lan_done and lan.needs_lan([spec]):
            self.lan_done = True
            lan.ensure_lan(cfg.client.lan)
        if not cfg.client.bee_node or sources.spec_kind(spec) != "swarm":
            return cfg
        if self.bee is None:
            from . import bee_node

            try:
                self.bee = self.services.enter_context(bee_node.using_node(cfg, self.workdir))
            except BootlinkError as exc:
                self.bee = exc  # every swarm: source fails the same way, without retrying
        if isinstance(self.bee, BootlinkError):
            raise self.bee
        return self.bee


ATTEMPTS = 3  # a source whose transfer broke off (not one whose bytes were wrong)
RETRY_PAUSE = 5.0  # seconds before trying again: a cable plugged back in, a node back


def _resolve_patiently(resolve, spec: str, cfg: Config, workdir: Path, progress: bool):
    """resolve(), tried again after a pause when the connection failed or the transfer
    broke off (Interrupted); wrong bytes, a bad signature or a refusal are final. The
    laptop link retries on its own terms (a fresh probe)."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return resolve(spec, cfg, workdir, progress)
        except Interrupted as exc:
            if attempt == ATTEMPTS or resolve is resolve_link:
                raise
            log.warning(
                "source %s: %s; trying again in %g s (attempt %d of %d)",
                spec, exc, RETRY_PAUSE, attempt + 1, ATTEMPTS,
            )  # fmt: skip
            time.sleep(RETRY_PAUSE)
    raise AssertionError("unreachable")


def _append_cmdline(image: BootImage, words: str) -> BootImage:
    """client.cmdline_append goes on whatever kernel is booted, not only the laptop's."""
    if not words.strip():
        return image
    return dataclasses.replace(image, cmdline=f"{image.cmdline} {words.strip()}".strip())


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM and SIGINT unwind like Ctrl-C, so probe namespaces are removed and NICs
    come back; but only the first one raises: from then on both are ignored. A second
    KeyboardInterrupt would land in that very cleanup (e.g. while the probe waits for its
    threads to move the NICs home) and cut it short: the process would exit with NICs
    still in probe namespaces, which destroys a veth and strands a physical NIC. Repeats
    are common, not exotic: timeout(1) signals the child and then its whole process
    group (two SIGTERMs), and people press Ctrl-C twice. The cleanup is bounded
    (Probe.close), so ignoring them cannot hang the client; SIG_IGN rather than a flag
    so that one arriving as the interpreter exits (it restores SIG_DFL for Python
    handlers, not for SIG_IGN) cannot kill it with another exit status either."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _interrupts_unwind() -> Iterator[None]:
    """_interrupt on SIGTERM and SIGINT while the body runs; the previous handlers after,
    unless an interrupt is on its way out (repeats must stay ignored until exit)."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except KeyboardInterrupt:
        raise  # on its way out: _interrupt made repeats ignored, and so they stay
    except BaseException:
        _restore(previous)
        raise
    _restore(previous)


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run_client(cfg: Config, dry_run: bool, as_json: bool) -> int:
    with _interrupts_unwind():
        return _run_client(cfg, dry_run, as_json)


def _run_client(cfg: Config, dry_run: bool, as_json: bool) -> int:
    image = choose_image(cfg, progress=not as_json)
    if dry_run:
        check_digests(image)  # what kexec would check on the files it loads
    plan = plan_of(image)
    if as_json:
        print(json.dumps(plan, indent=2, sort_keys=True))
    else:
        print(f"boot: {image.describe()}\ncmdline: {image.cmdline}", file=sys.stderr)
    if dry_run:
        log.info("dry run: not executing kexec")
        return 0
    from bootlink.common import kexec  # here: its imports would delay the probe at boot

    kexec.load_and_execute(image)
    return 1  # not reached: load_and_execute raises if the kexec does not happen
