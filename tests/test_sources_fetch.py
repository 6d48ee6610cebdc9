"""Publish -> fetch -> verify against local Bee / IPFS stand-ins, and every refusal.

The round trip runs the fake nodes as separate processes inside a network namespace
reached over a veth pair with private (ULA) addresses, so real sockets and real routing
are involved; the fault tests run the fakes in-process on 127.0.0.1 to poke their state.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakes import bee as fake_bee
from fakes import ipfs_gateway as fake_ipfs
from smallfs import mounted_tmpfs

from bootlink.cli import main as bootlink_main
from bootlink.client import menu, sources
from bootlink.client.sources import ipfs as ipfs_src
from bootlink.client.sources import swarm as swarm_src
from bootlink.client.sources import web as web_src
from bootlink.common import ipfs, output_file, swarm
from bootlink.common.config import config_from_dict
from bootlink.common.errors import BootlinkError
from bootlink.common.keys import generate_key_file
from bootlink.common.signing import ManifestError

FAKES = Path(__file__).parent / "fakes"
KERNEL = os.urandom(300_000)
INITRD = os.urandom(1_100_000)


@pytest.fixture
def image_files(tmp_path):
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    k.write_bytes(KERNEL)
    i.write_bytes(INITRD)
    return k, i


def cli(*args, capsys=None) -> str:
    rc = bootlink_main([*map(str, args)])
    out = capsys.readouterr() if capsys else None
    assert rc == 0, out.err if out else rc
    return out.out.strip() if out else ""


def make_key(tmp_path, capsys, name="sign.key") -> tuple[Path, str]:
    path = tmp_path / name
    pub = cli("sign-key", "--key", path, capsys=capsys).splitlines()[0]
    return path, pub


# ---------------------------------------------------------------- namespace fixture


def _run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def fake_nodes_in_netns():
    """Bee (:1633) and IPFS (:8080, also /api/v0/add) in a fresh netns at fd6c:626c::2."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"blsrc{tag}", f"blsh{tag}", f"blsn{tag}"
    procs: list[subprocess.Popen] = []
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", ns)
        _run("ip", "addr", "add", "fd6c:626c::1/64", "dev", host_if, "nodad")
        _run("ip", "-n", ns, "addr", "add", "fd6c:626c::2/64", "dev", ns_if, "nodad")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "set", ns_if, "up")
        _run("ip", "link", "set", host_if, "up")
        deadline = time.monotonic() + 5
        while Path(f"/sys/class/net/{host_if}/operstate").read_text().strip() != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host_if} never came up")
            time.sleep(0.02)
        for script, port in (("bee.py", 1633), ("ipfs_gateway.py", 8080)):
            p = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    str(FAKES / script),
                    "--listen",
                    "fd6c:626c::2",
                    "--port",
                    str(port),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(p)
            line = p.stdout.readline()
            assert line.startswith("READY"), f"{script} did not start: {line!r}"
        yield "http://[fd6c:626c::2]:1633", "http://[fd6c:626c::2]:8080"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_publish_fetch_roundtrip_over_netns(tmp_path, capsys, image_files):
    kernel, initrd = image_files
    with fake_nodes_in_netns() as (bee_url, ipfs_url):
        key, pub = make_key(tmp_path, capsys)
        cfgfile = tmp_path / "c.yaml"
        cfgfile.write_text(
            f"client:\n  bee_api: '{bee_url}'\n  ipfs_gateway: '{ipfs_url}'\n"
            f"  trusted_keys: ['{pub}']\n  menu_timeout: 1\n"
            f"server:\n  boot: {{kernel: {kernel}, initrd: {initrd}, "
            "cmdline: 'root=/dev/nbd0p1 ro'}\n"
        )
        swarm_spec = cli(
            "publish",
            "--config",
            cfgfile,
            "--to",
            "swarm",
            "--sign-key",
            key,
            "--label",
            "Swarm image",
            "--quiet",
            capsys=capsys,
        )
        ipfs_spec = cli(
            "publish",
            "--config",
            cfgfile,
            "--to",
            "ipfs",
            "--api",
            ipfs_url,
            "--sign-key",
            key,
            "--layout",
            "v1-2025",
            "--label",
            "IPFS image",
            "--quiet",
            capsys=capsys,
        )
        assert swarm_spec.startswith("swarm:") and ipfs_spec.startswith("ipfs:b")

        cfg = config_from_dict(
            {
                "client": {
                    "bee_api": bee_url,
                    "ipfs_gateway": ipfs_url,
                    "trusted_keys": [pub],
                    "sources": [swarm_spec, ipfs_spec],
                }
            }
        )
        images, errors = sources.resolve_all(cfg, tmp_path / "work", progress=False)
        assert errors == []
        assert [i.label for i in images] == ["Swarm image", "IPFS image"]
        for image in images:
            assert image.kernel.read_bytes() == KERNEL
            assert image.initrd.read_bytes() == INITRD
            assert image.cmdline == "root=/dev/nbd0p1 ro"
            assert f"trusted key {pub[:16]}" in image.provenance.verified_by
        assert (
            images[0].provenance.source == "swarm"
            and "swarm BMT" in images[0].provenance.verified_by
        )
        assert (
            images[1].provenance.source == "ipfs"
            and "match their CIDs" in images[1].provenance.verified_by
        )
        import io

        chosen = menu.choose(images, timeout=1, stdin=io.StringIO("2\n"), stdout=io.StringIO())
        assert chosen is images[1]

        # plain file fetches over the namespace link, by reference computed offline
        ref = cli("ref", "swarm", initrd, capsys=capsys)
        cli(
            "fetch",
            f"swarm:{ref}",
            "--bee",
            bee_url,
            "--output",
            tmp_path / "o1",
            "--quiet",
            capsys=capsys,
        )
        assert (tmp_path / "o1").read_bytes() == INITRD


# ---------------------------------------------------------------- in-process fakes


@pytest.fixture
def bee():
    with fake_bee.serving() as node:
        yield node


@pytest.fixture
def gw():
    with fake_ipfs.serving() as node:
        yield node


FETCHES = ["swarm-stream", "swarm-chunks", "ipfs-car", "ipfs-raw", "web"]


def _fetch_into(kind: str, bee, gw, data: bytes, out: Path):
    """Publish `data` on the in-process node `kind` needs, then fetch it into `out`."""
    if kind.startswith("swarm"):
        state, url = bee
        ref = state.store_bytes(data)
        return swarm_src.fetch(ref, url, out, progress=False, mode=kind.split("-")[1])
    state, url = gw
    root, _ = state.add_bytes(data, ipfs.LAYOUTS["kubo-v1"])
    if kind == "web":
        return web_src.fetch(f"{url}/ipfs/{root}", out, progress=False)
    return ipfs_src.fetch(root, url, out, mode=kind.split("-")[1], progress=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
@pytest.mark.parametrize("upfront", [True, False], ids=["size-known", "filled-midway"])
@pytest.mark.parametrize("kind", FETCHES)
def test_full_download_dir_is_one_line_and_leaves_nothing(
    bee, gw, tmp_path, monkeypatch, kind, upfront
):
    """A boot file bigger than the (tmpfs) download directory: refused before the download
    when its size is known, or named when the disk fills up mid-way (in any writer thread);
    either way nothing is left behind and the fix is named."""
    data = os.urandom(3 << 20)
    if not upfront:  # the up-front check off: the writes themselves hit ENOSPC
        monkeypatch.setattr(output_file, "check_space", lambda *a: None)
    with mounted_tmpfs(tmp_path / "small", "2m") as small:
        with pytest.raises(output_file.WriteFailed) as ei:
            _fetch_into(kind, bee, gw, data, small / "initrd")
        msg = one_line(ei.value)
        if upfront:
            assert msg.startswith(f"{small} has 2.0 MiB free but initrd takes 3.0 MiB: ")
        else:
            assert msg.startswith(f"{small} is full (0 bytes left): initrd.part could not")
        assert msg.endswith(
            "free space there or download to a larger filesystem (client.download_dir or "
            "--output; the ramdisk's is RAM)"
        )
        assert os.listdir(small) == []
        got = _fetch_into(kind, bee, gw, data[: 1 << 20], small / "initrd")  # what fits does
        assert (small / "initrd").read_bytes() == data[: 1 << 20] and got.size == 1 << 20


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("mode", swarm_src.MODES)
def test_swarm_lying_node_detected_and_chunk_named(bee, tmp_path, mode):
    state, url = bee
    data = os.urandom(200 * swarm.CHUNK_SIZE + 5)
    leaves = []
    ref = swarm.reference_of_bytes(data, lambda a, s, p: leaves.append(a) if len(p) == s else None)
    state.store_bytes(data)
    bad = leaves[150]
    state.corrupt.add(bad)
    out = tmp_path / "out"
    with pytest.raises(swarm_src.SwarmChunkError) as ei:
        swarm_src.fetch(ref, url, out, progress=False, mode=mode)
    msg = one_line(ei.value)
    assert msg.startswith(f"swarm chunk {bad.hex()} ") and " from http://127.0.0.1:" in msg
    assert "does not hash to its address" in msg and "try another --bee" in msg
    assert not out.exists() and not (tmp_path / "out.part").exists()
    state.corrupt.clear()
    got = swarm_src.fetch(ref, url, out, progress=False, mode=mode)
    assert out.read_bytes() == data and got.chunks == 201 + 2 + 1


def test_swarm_missing_chunk_named(bee, tmp_path):
    state, url = bee
    ref = state.store_bytes(b"x" * 3 * swarm.CHUNK_SIZE)
    state.missing.add(ref)
    with pytest.raises(BootlinkError, match=f"{ref.hex()} not found"):
        swarm_src.fetch(ref, url, tmp_path / "o", progress=False)


@pytest.mark.parametrize("level", [1, 4])
def test_swarm_erasure_coded_upload_named(bee, tmp_path, level):
    """Bee uploads erasure-coded unless told Swarm-Redundancy-Level: 0; its root chunk's
    span carries level | 0x80 in the top byte (bee pkg/file/redundancy/span.go)."""
    state, url = bee
    payload = os.urandom(2 * swarm.REF_SIZE)
    span = 3 * swarm.CHUNK_SIZE | (0x80 | level) << 56
    root = swarm.chunk_address(span, payload)
    state.chunks[root] = (span, payload)
    with pytest.raises(swarm_src.SwarmChunkError) as ei:
        swarm_src.fetch(root, url, tmp_path / "o", progress=False)
    msg = one_line(ei.value)
    assert f"erasure coding (redundancy level {level}" in msg
    assert "Swarm-Redundancy-Level: 0" in msg and not (tmp_path / "o.part").exists()


def test_swarm_publish_detects_lying_reference(bee, tmp_path, image_files):
    state, url = bee
    state.lie_reference = True
    with pytest.raises(BootlinkError, match="returned reference") as ei:
        swarm_src.upload_file(image_files[0], url, fake_bee.BATCH_ID, progress=False)
    one_line(ei.value)


def test_swarm_publish_needs_batch_and_finds_it(bee, tmp_path, image_files):
    _, url = bee
    assert swarm_src.find_batch(url) == fake_bee.BATCH_ID
    with pytest.raises(BootlinkError, match="batch"):
        swarm_src.upload_file(image_files[0], url, "ee" * 32, progress=False)


@pytest.mark.parametrize("mode", ["car", "raw"])
def test_ipfs_wrong_block_refused_and_named(gw, tmp_path, mode):
    state, url = gw
    data = os.urandom(1_200_000)
    root, _ = state.add_bytes(data, ipfs.LAYOUTS["kubo-v0"])
    node = ipfs.PBNode.decode(state.blocks[root.multihash])
    bad = node.links[2].cid
    state.corrupt.add(bad.multihash)
    with pytest.raises(ipfs_src.IpfsBlockError) as ei:
        ipfs_src.fetch(root, url, tmp_path / "o", mode=mode, progress=False)
    msg = one_line(ei.value)
    assert f"ipfs block {bad}" in msg and "does not match its CID" in msg
    assert not (tmp_path / "o").exists()
    state.corrupt.clear()
    ipfs_src.fetch(root, url, tmp_path / "o", mode=mode, progress=False)
    assert (tmp_path / "o").read_bytes() == data


@pytest.mark.parametrize("layout", sorted(ipfs.LAYOUTS))
def test_ipfs_fetch_every_layout(gw, tmp_path, layout):
    state, url = gw
    data = os.urandom(2_500_000)
    root, _ = state.add_bytes(data, ipfs.LAYOUTS[layout])
    assert root == ipfs.cid_of_bytes(data, layout)
    got = ipfs_src.fetch(root, url, tmp_path / "o", progress=False)
    assert (tmp_path / "o").read_bytes() == data and got.size == len(data)


def test_truncated_car_refused(gw, tmp_path):
    state, url = gw
    root, _ = state.add_bytes(os.urandom(1_500_000), ipfs.LAYOUTS["kubo-v1"])
    state.truncate_after = 3
    with pytest.raises(ipfs_src.IpfsBlockError, match="truncated") as ei:
        ipfs_src.fetch(root, url, tmp_path / "o", progress=False)
    assert f"CAR for ipfs {root}" in one_line(ei.value)


def test_car_roots_are_ignored(gw, tmp_path):
    state, url = gw
    data = os.urandom(600_000)
    root, _ = state.add_bytes(data, ipfs.LAYOUTS["kubo-v0"])
    state.wrong_roots = True
    ipfs_src.fetch(root, url, tmp_path / "o", progress=False)
    assert (tmp_path / "o").read_bytes() == data


def test_ipfs_publish_detects_wrong_cid(gw, image_files):
    state, url = gw
    state.lie_cid = True
    with pytest.raises(BootlinkError, match="returned CID"):
        ipfs_src.add_file(image_files[1], url, "kubo-v1", progress=False)


def _publish(tmp_path, capsys, url, files, *extra) -> str:
    kernel, initrd = files
    return cli(
        "publish",
        "--to",
        "swarm",
        "--api",
        url,
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--cmdline",
        "quiet",
        "--quiet",
        *extra,
        capsys=capsys,
    )


def test_manifest_signed_by_untrusted_key_refused(bee, tmp_path, capsys, image_files):
    _, url = bee
    key, pub = make_key(tmp_path, capsys)
    _, other = make_key(tmp_path, capsys, "other.key")
    spec = _publish(tmp_path, capsys, url, image_files, "--sign-key", key)
    cfg = config_from_dict({"client": {"bee_api": url, "trusted_keys": [other]}})
    with pytest.raises(ManifestError, match=f"untrusted key.*{pub[:16]}") as ei:
        sources.resolve(spec, cfg, tmp_path / "w", progress=False)
    one_line(ei.value)
    # and accepted once the key is trusted
    cfg = config_from_dict({"client": {"bee_api": url, "trusted_keys": [other, pub]}})
    (image,) = sources.resolve(spec, cfg, tmp_path / "w", progress=False)
    assert image.kernel.read_bytes() == KERNEL


def test_unsigned_manifest_refused_unless_allowed(bee, tmp_path, capsys, image_files):
    _, url = bee
    spec = _publish(tmp_path, capsys, url, image_files, "--unsigned")
    cfg = config_from_dict({"client": {"bee_api": url}})
    with pytest.raises(ManifestError, match="not signed"):
        sources.resolve(spec, cfg, tmp_path / "w", progress=False)
    cfg = config_from_dict({"client": {"bee_api": url, "allow_unsigned": [spec]}})
    (image,) = sources.resolve(spec, cfg, tmp_path / "w", progress=False)
    assert "allow_unsigned" in image.provenance.verified_by


def test_manifest_pinning_wrong_file_refused(bee, tmp_path, capsys, image_files):
    state, url = bee
    key, pub = make_key(tmp_path, capsys)
    spec = _publish(tmp_path, capsys, url, image_files, "--sign-key", key)
    # A validly signed manifest whose kernel reference points at other bytes than it pins.
    from bootlink.common import signing

    env = signing.parse_envelope(b"".join(state.iter_file(bytes.fromhex(spec[6:]))))
    m = env.manifest
    other_ref = state.store_bytes(b"evil" * 1000)
    files = dict(m.files)
    files["kernel"] = signing.FileEntry(
        "vmlinuz", 4000, files["kernel"].sha256, f"swarm:{other_ref.hex()}"
    )
    forged = signing.sign_manifest(
        signing.Manifest(m.label, m.cmdline, files), signing.load_signing_key(key)
    )
    ref = state.store_bytes(forged.to_bytes())
    cfg = config_from_dict({"client": {"bee_api": url, "trusted_keys": [pub]}})
    with pytest.raises(ManifestError, match=r"kernel vmlinuz .* has sha256 .* refused"):
        sources.resolve(f"swarm:{ref.hex()}", cfg, tmp_path / "w", progress=False)


def test_raw_file_is_not_a_manifest(bee, tmp_path):
    state, url = bee
    ref = state.store_bytes(KERNEL)
    cfg = config_from_dict({"client": {"bee_api": url}})
    with pytest.raises(ManifestError, match="not a bootlink image manifest"):
        sources.resolve(f"swarm:{ref.hex()}", cfg, tmp_path / "w", progress=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_web_signed_manifest_with_relative_files(tmp_path, capsys, image_files):
    key, pub = make_key(tmp_path, capsys)
    www = tmp_path / "www"
    kernel, initrd = image_files
    cli(
        "publish",
        "--to",
        "dir",
        "--output",
        www,
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--cmdline",
        "console=ttyS0",
        "--sign-key",
        key,
        "--quiet",
        capsys=capsys,
    )
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www))
    )
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/manifest.json"
    try:
        cfg = config_from_dict({"client": {"trusted_keys": [pub]}})
        (image,) = sources.resolve(url, cfg, tmp_path / "w", progress=False)
        assert image.initrd.read_bytes() == INITRD and image.provenance.source == "web"
        with pytest.raises(ManifestError, match=r"not signed|untrusted"):
            sources.resolve(url, config_from_dict({}), tmp_path / "w2", progress=False)
        # a tampered file on the server is refused by the manifest's sha256
        (www / "initrd.img").write_bytes(b"tampered")
        with pytest.raises(BootlinkError, match=r"initrd\.img") as ei:
            sources.resolve(url, cfg, tmp_path / "w3", progress=False)
        one_line(ei.value)
    finally:
        srv.shutdown()
        srv.server_close()


def test_fetch_cli_web_needs_hash(capsys, tmp_path):
    rc = bootlink_main(["fetch", "https://example.invalid/x.iso", "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "sha256" in capsys.readouterr().err


def _one_error_line(capsys, args) -> str:
    assert bootlink_main([*map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_misuse_is_one_line_naming_the_fix(capsys, tmp_path, image_files):
    kernel, initrd = image_files
    (tmp_path / "empty").write_bytes(b"")
    sk = tmp_path / "sk"
    assert bootlink_main(["sign-key", "--key", str(sk)]) == 0
    capsys.readouterr()
    pub = ["publish", "--to", "dir", "--output", tmp_path / "p", "--unsigned"]
    cases = [
        (["fetch", "iso:/x.iso", "--output", tmp_path / "o"], "add --image"),
        (["fetch", "swarm:" + "ab" * 32, "--output", tmp_path], "is a directory: name the file"),
        (["ref", "swarm", tmp_path], "not a regular file; name the file to hash"),
        (
            [*pub, "--kernel", tmp_path / "empty", "--initrd", initrd],
            "kernel " + str(tmp_path / "empty") + " is empty",
        ),
        (
            [*pub, "--sign-key", sk, "--kernel", kernel, "--initrd", initrd],
            "contradict each other",
        ),
    ]
    for args, needle in cases:
        assert needle in _one_error_line(capsys, args)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_client_with_no_sources_says_so(capsys, tmp_path):
    generate_key_file(tmp_path / "key")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"key: {tmp_path / 'key'}\nclient: {{sources: []}}\n")
    line = _one_error_line(capsys, ["client", "--config", cfg, "--dry-run"])
    assert "client.sources is empty" in line


def test_unknown_source_kind():
    with pytest.raises(BootlinkError, match="unknown kind 'ftp'"):
        sources.resolve("ftp://x", config_from_dict({}), Path("/tmp/unused-bootlink"))


def test_source_whose_stream_broke_is_tried_again_a_lying_one_is_not(
    bee, tmp_path, capsys, image_files, monkeypatch, caplog
):
    """The node cuts the initrd's /bytes stream once (a chunk it cannot retrieve yet, as
    Bee does; a cable pulled looks the same): the client tries the source again and
    gets the image. A chunk that does not hash to its address is final at once."""
    from bootlink.client import boot

    state, url = bee
    key, pub = make_key(tmp_path, capsys)
    spec = _publish(tmp_path, capsys, url, image_files, "--sign-key", key)
    leaves: list[bytes] = []
    swarm.reference_of_bytes(INITRD, lambda a, span, p: leaves.append(a) if len(p) == span else 0)
    state.missing.add(leaves[100])
    stream = state.iter_file

    def once_cut(ref):
        try:
            yield from stream(ref)
        except KeyError:
            state.missing.clear()  # the node has it now
            raise

    state.iter_file = once_cut
    monkeypatch.setattr(boot, "RETRY_PAUSE", 0.01)
    cfg = config_from_dict(
        {
            "client": {
                "sources": [spec],
                "bee_api": url,
                "trusted_keys": [pub],
                "download_dir": str(tmp_path / "dl"),
                "menu_timeout": 0,
                "lan": "none",
            }
        }
    )
    image = boot.choose_image(cfg, progress=False)
    assert image.initrd.read_bytes() == INITRD
    assert "truncated" in caplog.text and "trying again in 0.01 s (attempt 2 of 3)" in caplog.text

    caplog.clear()
    state.corrupt.add(leaves[100])
    with pytest.raises(BootlinkError, match="does not hash to its address"):
        boot.choose_image(cfg, progress=False)
    assert "trying again" not in caplog.text


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """A web server answering every path its own way: an HTML 404 page, a redirect loop,
    a 503 with a JSON message."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", f"/loop{len(self.path)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, ctype, body = {
            "/gone": (404, "text/html", b"<html><body>" + b"<p>Not here</p>\n" * 200 + b"</html>"),
            "/busy": (503, "application/json", b'{"message": "node syncing"}'),
        }[self.path]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/gone", "HTTP 404 Not Found; check the URL"),
        ("/loop", "more than 5 redirects; check the URL"),
        ("/busy", "HTTP 503 node syncing; the server failed: retry later or use another mirror"),
    ],
)
def test_web_errors_are_one_short_line_with_a_fix(tmp_path, path, expected):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{path}"
        with pytest.raises(BootlinkError) as ei:
            web_src.fetch(url, tmp_path / "out", progress=False)
    finally:
        server.shutdown()
        server.server_close()
    msg = str(ei.value)
    assert msg.endswith(expected) and "\n" not in msg and "<" not in msg, msg
    assert len(msg) < 200 and not list(tmp_path.iterdir())


def test_failed_image_fetch_leaves_no_folders(bee, tmp_path, capsys):
    """fetch --image of a reference that is not there: one line, and the output folder
    it would have made is not left behind (nor one inside an existing folder)."""
    _state, url = bee
    missing = "swarm:" + "ab" * 32
    for out in (tmp_path / "new", tmp_path):
        args = ["fetch", missing, "--image", "--output", out, "--bee", url]
        assert _one_error_line(capsys, args)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class _GatewayTimesOut(http.server.BaseHTTPRequestHandler):
    """What kubo's gateway answers when it cannot retrieve content within
    Gateway.RetrievalTimeout: 504 (boxo gateway/errors.go)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"ipfs resolve -r /ipfs/...: context deadline exceeded"
        self.send_response(504)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("mode", ["car", "raw"])
def test_ipfs_gateway_timeout_is_worth_another_try(tmp_path, mode):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatewayTimesOut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cid = ipfs.cid_of_bytes(b"x" * 100, "kubo-v1")
    try:
        with pytest.raises(ipfs_src.IpfsStreamBroken) as ei:  # Interrupted: retried
            ipfs_src.fetch(
                cid, f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "o",
                mode=mode, progress=False,
            )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert "HTTP 504" in str(ei.value) and "could not retrieve it in time; retry" in str(ei.value)
    assert not list(tmp_path.iterdir())
