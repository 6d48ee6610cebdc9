"""Console boot menu (kboot/petitboot style): numbered images, a default, a timeout.

With one image there is nothing to ask: it is returned at once. Otherwise the list is
shown with the default marked; the default boots when the timeout passes with no input,
on an empty line, or at end of input (no console). Typing starts interaction: after a
wrong answer the menu waits without a timeout, since someone is clearly there.
`menu_timeout` 0 boots the default immediately; a negative timeout waits forever.

Input and output streams are parameters so tests (and a serial console) can drive it.
"""

from __future__ import annotations

import io
import select
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from bootlink.common.bootimage import BootImage
from bootlink.common.errors import BootlinkError


def render(images: Sequence[BootImage], default: int) -> str:
    lines = ["bootlink: choose an image to boot"]
    for i, img in enumerate(images):
        mark = "*" if i == default else " "
        lines.append(f" {mark}{i + 1:2d}) {img.describe()}")
    return "\n".join(lines)


def _readline(stream: TextIO, timeout: float | None) -> str | None:
    """A line, "" at end of input, or None on timeout (`timeout` None: wait forever)."""
    if timeout is not None:
        try:
            fd = stream.fileno()
        except (AttributeError, io.UnsupportedOperation, ValueError):
            fd = None
        if fd is not None:
            ready, _, _ = select.select([fd], [], [], max(timeout, 0))
            if not ready:
                return None
    line = stream.readline()
    return line if line else ""


def choose(
    images: Sequence[BootImage],
    *,
    timeout: float = 5.0,
    default: int = 0,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> BootImage:
    if not images:
        raise BootlinkError(
            "no bootable image from any source: check client.sources and the messages above"
        )
    if len(images) == 1:
        return images[0]
    if not 0 <= default < len(images):
        default = 0
    stdin = stdin if stdin is not None else sys.stdin
    out = stdout if stdout is not None else sys.stderr
    print(render(images, default), file=out)
    if timeout == 0:
        print(f"booting {default + 1} (menu_timeout is 0)", file=out, flush=True)
        return images[default]
    deadline = None if timeout < 0 else time.monotonic() + timeout
    when = "" if deadline is None else f", default {default + 1} in {timeout:g} s"
    prompt = f"boot which image? [1-{len(images)}, Enter = {default + 1}{when}]: "
    while True:
        print(prompt, end="", file=out, flush=True)
        remaining = None if deadline is None else deadline - time.monotonic()
        line = _readline(stdin, remaining)
        if line is None:
            print(f"\ntimeout: booting {default + 1}", file=out, flush=True)
            return images[default]
        if line == "":
            print(f"\nno input: booting {default + 1}", file=out, flush=True)
            return images[default]
        answer = line.strip()
        if not answer:
            return images[default]
        if answer.isdigit() and 1 <= int(answer) <= len(images):
            return images[int(answer) - 1]
        print(f"'{answer}' is not a number from 1 to {len(images)}", file=out)
        deadline = None  # someone is at the console: stop the countdown
        prompt = f"boot which image? [1-{len(images)}, Enter = {default + 1}]: "
