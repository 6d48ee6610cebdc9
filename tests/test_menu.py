"""The console boot menu: default, timeout, choice, and one image without asking."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from bootlink.client.menu import choose
from bootlink.common.bootimage import BootImage, Provenance
from bootlink.common.errors import BootlinkError


def img(label: str) -> BootImage:
    return BootImage(label, Path("/k"), None, "", Provenance("web", "u", "sha256"))


IMAGES = [img("one"), img("two"), img("three")]


def test_single_image_returned_without_asking():
    out = io.StringIO()
    assert choose([IMAGES[0]], stdin=io.StringIO("2\n"), stdout=out).label == "one"
    assert out.getvalue() == ""


def test_no_image_is_an_error():
    with pytest.raises(BootlinkError, match="no bootable image"):
        choose([], stdin=io.StringIO(""), stdout=io.StringIO())


def test_number_picks_image_and_menu_lists_all():
    out = io.StringIO()
    assert choose(IMAGES, stdin=io.StringIO("3\n"), stdout=out).label == "three"
    text = out.getvalue()
    assert " * 1) one [web: sha256]" in text and "   2) two" in text


def test_enter_and_eof_take_default():
    assert choose(IMAGES, default=1, stdin=io.StringIO("\n"), stdout=io.StringIO()).label == "two"
    assert choose(IMAGES, default=1, stdin=io.StringIO(""), stdout=io.StringIO()).label == "two"


def test_invalid_answer_asks_again():
    out = io.StringIO()
    assert choose(IMAGES, stdin=io.StringIO("9\nx\n2\n"), stdout=out).label == "two"
    assert "'9' is not a number from 1 to 3" in out.getvalue()


def test_timeout_boots_default_on_a_silent_console():
    r, w = os.pipe()  # a console nobody types on
    try:
        with os.fdopen(r, "r") as stdin:
            t = time.monotonic()
            got = choose(IMAGES, timeout=0.3, default=2, stdin=stdin, stdout=io.StringIO())
            elapsed = time.monotonic() - t
    finally:
        os.close(w)
    assert got.label == "three"
    assert 0.25 <= elapsed < 2


def test_zero_timeout_does_not_wait():
    r, w = os.pipe()
    try:
        with os.fdopen(r, "r") as stdin:
            assert choose(IMAGES, timeout=0, stdin=stdin, stdout=io.StringIO()).label == "one"
    finally:
        os.close(w)


def test_typed_answer_before_timeout_wins():
    r, w = os.pipe()
    os.write(w, b"2\n")
    try:
        with os.fdopen(r, "r") as stdin:
            assert choose(IMAGES, timeout=5, stdin=stdin, stdout=io.StringIO()).label == "two"
    finally:
        os.close(w)
