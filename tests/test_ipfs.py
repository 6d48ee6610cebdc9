"""IPFS CIDs, dag-pb/UnixFS and CAR: kubo's CIDs, Debian's ipfs_cid, and parser fuzzing."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootlink.common import ipfs
from bootlink.common.ipfs import CID, IpfsFormatError

KiB = 1024


def test_hello_world_kubo_v0():
    assert (
        str(ipfs.cid_of_bytes(b"hello world\n")) == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    )


def test_empty_file_vectors():
    # `ipfs add` of an empty file: the well-known empty UnixFS file / empty raw block.
    assert str(ipfs.cid_of_bytes(b"")) == "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    assert str(ipfs.cid_of_bytes(b"", "kubo-v1")) == (
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    )


def test_v1_single_chunk_is_raw_block():
    # kubo --cid-version=1 (raw leaves): a one-chunk file is its raw leaf.
    cid = ipfs.cid_of_bytes(b"hello world\n", "kubo-v1")
    assert str(cid) == "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    assert cid.codec == ipfs.RAW


def _ipfs_cid_tool(path) -> dict:
    out = subprocess.run(["ipfs_cid", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout[: out.stdout.index("}") + 1])


@pytest.mark.skipif(shutil.which("ipfs_cid") is None, reason="Debian's ipfs-cid not installed")
@pytest.mark.parametrize(
    "size",
    [0, 1, 256 * KiB - 1, 256 * KiB, 256 * KiB + 1, 3 * 1000 * 1000, 174 * 256 * KiB + 5],
)
def test_kubo_v0_matches_debian_ipfs_cid(tmp_path, size):
    """ipfs_cid (Debian ipfs-cid) implements kubo's default import (256 KiB, 174 links,
    dag-pb leaves); it prints that DAG's root as CIDv0 and CIDv1. It knows no other layout."""
    data = bytes((i * 7 + 3) % 251 for i in range(size))
    path = tmp_path / "f"
    path.write_bytes(data)
    ours = ipfs.cid_of_file(path, "kubo-v0")
    theirs = _ipfs_cid_tool(path)
    assert str(ours) == theirs["CIDv0"]
    assert str(CID(1, ours.codec, ours.mh_code, ours.digest)) == theirs["CIDv1"]


def _dag(data: bytes, layout: str):
    blocks = {}
    root = ipfs.cid_of_bytes(data, layout, lambda c, b: blocks.__setitem__(c.multihash, (c, b)))
    return root, blocks


@pytest.mark.parametrize("layout", sorted(ipfs.LAYOUTS))
def test_layout_shapes(layout):
    lay = ipfs.LAYOUTS[layout]
    data = bytes(range(256)) * (lay.chunk_size * (lay.max_links + 2) // 256 // 8)  # few leaves
    data = data[: lay.chunk_size * 3 + 5]
    root, blocks = _dag(data, layout)
    assert root.version == lay.cid_version
    node = ipfs.PBNode.decode(blocks[root.multihash][1])
    unixfs = ipfs.UnixFSData.decode(node.data)
    assert unixfs.filesize == len(data)
    assert list(unixfs.blocksizes) == [lay.chunk_size] * 3 + [5]
    leaf_codecs = {link.cid.codec for link in node.links}
    assert leaf_codecs == {ipfs.RAW if lay.raw_leaves else ipfs.DAG_PB}
    # reassemble from leaves
    out = b""
    for link in node.links:
        block = blocks[link.cid.multihash][1]
        out += (
            block if lay.raw_leaves else ipfs.UnixFSData.decode(ipfs.PBNode.decode(block).data).data
        )
    assert out == data


def test_v1_2025_fanout_is_1024():
    lay = ipfs.LAYOUTS["v1-2025"]
    small = ipfs.Layout("t", 16, lay.max_links, True, 1)  # same fan-out, tiny chunks
    imp_blocks = {}
    imp = ipfs.Importer(small, lambda c, b: imp_blocks.__setitem__(c.multihash, b))
    imp.update(b"x" * 16 * 1025)
    root = imp.finish()
    node = ipfs.PBNode.decode(imp_blocks[root.multihash])
    assert len(node.links) == 2  # 1024 leaves under the first child, 1 under the second
    first = ipfs.PBNode.decode(imp_blocks[node.links[0].cid.multihash])
    assert len(first.links) == 1024


def test_tsize_is_cumulative():
    root, blocks = _dag(b"z" * (256 * KiB * 2 + 1), "kubo-v0")
    node = ipfs.PBNode.decode(blocks[root.multihash][1])
    for link in node.links:
        assert link.tsize == len(blocks[link.cid.multihash][1])


# ---------------------------------------------------------------- CIDs and bases


@given(st.binary(max_size=80))
def test_base32_roundtrip(data):
    assert ipfs.b32decode(ipfs.b32encode(data)) == data


@given(st.binary(max_size=80))
def test_base58_roundtrip(data):
    assert ipfs.b58decode(ipfs.b58encode(data)) == data


@given(st.binary(min_size=32, max_size=32), st.sampled_from([ipfs.RAW, ipfs.DAG_PB]))
def test_cid_string_roundtrip(digest, codec):
    for cid in (CID(1, codec, ipfs.SHA2_256, digest), CID(0, ipfs.DAG_PB, ipfs.SHA2_256, digest)):
        assert CID.parse(str(cid)) == cid
        assert CID.decode(cid.to_bytes()) == (cid, len(cid.to_bytes()))


@given(st.text(max_size=70))
def test_cid_parse_only_raises_format_errors(text):
    """Whatever a user pastes: one line saying it is not a CID and where a right one comes
    from (no decoder's bare complaint)."""
    try:
        CID.parse(text)
    except IpfsFormatError as exc:
        msg = str(exc)
        assert "\n" not in msg and "is not a " in msg
        assert msg.endswith("copy it as 'bootlink publish' or 'bootlink ref ipfs FILE' printed it")


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_roundtrip(n):
    enc = ipfs.encode_varint(n)
    assert ipfs.decode_varint(enc) == (n, len(enc))


# ---------------------------------------------------------------- protobuf / dag-pb

cids = st.builds(
    lambda d, v: CID(v, ipfs.DAG_PB if v == 0 else ipfs.RAW, ipfs.SHA2_256, d),
    st.binary(min_size=32, max_size=32),
    st.sampled_from([0, 1]),
)
links = st.builds(
    ipfs.PBLink,
    cids,
    st.one_of(st.none(), st.text(max_size=20)),
    st.one_of(st.none(), st.integers(0, 2**40)),
)
nodes = st.builds(
    ipfs.PBNode,
    st.lists(links, max_size=5).map(tuple),
    st.one_of(st.none(), st.binary(max_size=50)),
)


@given(nodes)
def test_dag_pb_roundtrip(node):
    assert ipfs.PBNode.decode(node.encode()) == node


@given(
    st.builds(
        ipfs.UnixFSData,
        st.sampled_from([0, 1, 2]),
        st.binary(max_size=40),
        st.one_of(st.none(), st.integers(0, 2**50)),
        st.lists(st.integers(0, 2**40), max_size=6).map(tuple),
    )
)
def test_unixfs_roundtrip(data):
    assert ipfs.UnixFSData.decode(data.encode()) == data


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_dag_pb_decoder_never_crashes(blob):
    for decoder in (ipfs.PBNode.decode, ipfs.UnixFSData.decode):
        try:
            decoder(blob)
        except IpfsFormatError:
            pass


def test_dag_pb_refuses_data_before_links():
    node = ipfs.PBNode((ipfs.PBLink(CID.for_block(b"a", ipfs.RAW, 1), "", 1),), b"x")
    enc = node.encode()
    # move Data (field 1) in front of the link: valid protobuf, invalid dag-pb
    data_field = ipfs.pb_bytes(1, b"x")
    swapped = data_field + enc[: -len(data_field)]
    with pytest.raises(IpfsFormatError):
        ipfs.PBNode.decode(swapped)


# ---------------------------------------------------------------- CAR


def _car(blocks, roots=None):
    blocks = list(blocks)
    return ipfs.encode_car(roots if roots is not None else [blocks[0][0]], blocks)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8))
def test_car_roundtrip(payloads):
    blocks = [(CID.for_block(p, ipfs.RAW, 1), p) for p in payloads]
    reader = ipfs.CarReader(io.BytesIO(_car(blocks)))
    assert reader.header["version"] == 1
    assert list(reader) == blocks


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=4), st.data())
def test_car_truncation_always_detected(payloads, data):
    blocks = [(CID.for_block(p, ipfs.RAW, 1), p) for p in payloads]
    car = _car(blocks)
    header_len = len(ipfs.encode_car_header([blocks[0][0]]))
    cut = data.draw(st.integers(min_value=0, max_value=len(car) - 1))
    got = []
    with pytest.raises(IpfsFormatError):
        reader = ipfs.CarReader(io.BytesIO(car[:cut]))
        for item in reader:
            got.append(item)
        # a cut exactly between sections parses cleanly but yields fewer blocks
        if cut >= header_len and len(got) < len(blocks):
            raise IpfsFormatError("fewer blocks")
    assert len(got) < len(blocks)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_car_reader_never_crashes(blob):
    try:
        for _ in ipfs.CarReader(io.BytesIO(blob)):
            pass
    except IpfsFormatError:
        pass


def test_car_refuses_oversized_section():
    big = ipfs.encode_car_header([]) + ipfs.encode_varint(ipfs.MAX_BLOCK + 1000) + b"\0" * 10
    with pytest.raises(IpfsFormatError, match="cap"):
        list(ipfs.CarReader(io.BytesIO(big)))


def test_car_header_roots_parse():
    root = CID.for_block(b"r", ipfs.DAG_PB, 0)
    car = _car([(CID.for_block(b"x", ipfs.RAW, 1), b"x")], roots=[root])
    assert ipfs.CarReader(io.BytesIO(car)).header["roots"] == [root]
