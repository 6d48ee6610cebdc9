"""SHA-256 of many messages side by side (common/_sha256mb.c) against hashlib."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootlink.common import sha256_lanes

# Lengths around the padding edges (55/56 bytes left: one or two final blocks) and some
# that span many blocks.
LENGTHS = st.one_of(
    st.integers(0, 200), st.sampled_from([55, 56, 63, 64, 119, 120, 127, 128]), st.integers(0, 9000)
)


def _spans(lengths: list[int], gap: int) -> list[tuple[int, int]]:
    spans, at = [], 0
    for n in lengths:
        spans.append((at, at + n))
        at += n + gap
    return spans


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(LENGTHS, min_size=1, max_size=40), gap=st.integers(0, 3))
def test_digests_equal_hashlib_for_any_lengths_and_counts(lengths, gap):
    """Lanes of different lengths end at different blocks; more than one group of 16;
    a last group too small for lanes goes through hashlib; messages at odd offsets."""
    spans = _spans(lengths, gap)
    data = os.urandom(spans[-1][1] + 1)
    want = [hashlib.sha256(data[a:b]).digest() for a, b in spans]
    assert sha256_lanes.digests(bytearray(data), spans) == want
    assert sha256_lanes.digests(data, spans) == want  # bytes: read in place too


def test_digests_from_an_mmap_leave_it_usable():
    """The CAR receiver's buffers are anonymous mmaps it reuses: the call must release
    its export of the buffer (else the mmap could not be closed)."""
    buf = mmap.mmap(-1, 1 << 20)
    buf[:] = os.urandom(1 << 20)
    spans = _spans([65536 - i for i in range(16)], 0)
    assert sha256_lanes.digests(buf, spans) == [hashlib.sha256(buf[a:b]).digest() for a, b in spans]
    buf.close()


def test_read_only_views_other_than_bytes_are_refused():
    if not sha256_lanes.width():
        pytest.skip("no lanes here: hashlib takes any buffer")
    with pytest.raises(ValueError, match="writable"):
        sha256_lanes.digests(memoryview(bytes(4096)), _spans([100] * 16, 0))


def test_spans_outside_the_buffer_are_refused_not_read():
    if not sha256_lanes.width():
        pytest.skip("no lanes here: hashlib slices never read past the end")
    buf = bytearray(4096)
    with pytest.raises(ValueError, match="outside the buffer"):
        sha256_lanes.digests(buf, [*_spans([100] * 15, 0), (4000, 4097)])
    with pytest.raises(ValueError, match="outside the buffer"):
        sha256_lanes.digests(buf, [*_spans([100] * 15, 0), (200, 100)])


def test_native_lanes_are_used_where_they_were_built():
    """A build that compiled _sha256mb.c on a CPU with AVX-512 BW must use it: without
    it IPFS block checks silently run ~2x slower (the tests above would still pass)."""
    built = list(Path(sha256_lanes.__file__).parent.glob("_sha256mb*.so"))
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(cpu.split())
    if not built or not {"avx512f", "avx512vl", "avx512bw"} <= flags:
        pytest.skip("no _sha256mb build or no AVX-512 here")
    if os.environ.get("BOOTLINK_SHA256_HASHLIB"):
        pytest.skip("hashlib forced")
    assert sha256_lanes.width() == 16
