"""Ed25519-signed image manifests: signing, trust decisions, strict parsing."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from bootlink.common import signing
from bootlink.common.errors import BootlinkError, KeyFileError
from bootlink.common.signing import FileEntry, Manifest, ManifestError

SHA = "ab" * 32


def manifest(**kw) -> Manifest:
    files = {
        "kernel": FileEntry("vmlinuz", 10, SHA, "swarm:" + "11" * 32),
        "initrd": FileEntry(
            "initrd.img", 20, SHA, "ipfs:QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
        ),
    }
    return Manifest(kw.get("label", "Debian"), kw.get("cmdline", "root=/dev/sda1 ro"), files)


def key_pair():
    k = Ed25519PrivateKey.generate()
    return k, signing.public_bytes(k)


def test_sign_verify_roundtrip():
    k, pub = key_pair()
    env = signing.sign_manifest(manifest(), k)
    parsed = signing.parse_envelope(env.to_bytes())
    v = signing.verify_envelope(parsed, [pub], allow_unsigned=False, where="test")
    assert v.manifest == manifest()
    assert v.key == pub
    assert "trusted key" in v.describe()


def test_untrusted_key_refused_and_named():
    k, pub = key_pair()
    _, other = key_pair()
    env = signing.parse_envelope(signing.sign_manifest(manifest(), k).to_bytes())
    with pytest.raises(ManifestError, match=f"untrusted key.*{pub.hex()[:16]}"):
        signing.verify_envelope(env, [other], allow_unsigned=False, where="swarm:x")


def test_tampered_manifest_refused_even_if_unsigned_allowed():
    k, pub = key_pair()
    doc = json.loads(signing.sign_manifest(manifest(), k).to_bytes())
    doc["manifest"]["cmdline"] = "init=/bin/sh"
    env = signing.parse_envelope(json.dumps(doc).encode())
    with pytest.raises(ManifestError, match="does not verify"):
        signing.verify_envelope(env, [pub], allow_unsigned=True, where="x")


def test_unsigned_refused_unless_allowed():
    env = signing.parse_envelope(signing.unsigned_envelope(manifest()).to_bytes())
    with pytest.raises(ManifestError, match="not signed"):
        signing.verify_envelope(env, [], allow_unsigned=False, where="x")
    v = signing.verify_envelope(env, [], allow_unsigned=True, where="x")
    assert v.key is None and "allow_unsigned" in v.describe()


def test_signature_is_over_canonical_bytes_not_layout():
    k, pub = key_pair()
    env = signing.sign_manifest(manifest(), k)
    doc = json.loads(env.to_bytes())
    compact = json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()
    v = signing.verify_envelope(
        signing.parse_envelope(compact), [pub], allow_unsigned=False, where="x"
    )
    assert v.key == pub


def test_signature_has_context_prefix():
    k, pub = key_pair()
    raw_sig = k.sign(manifest().canonical_bytes())  # a signature over the bare JSON
    env = signing.Envelope(manifest(), (signing.Signature(pub, raw_sig),))
    with pytest.raises(ManifestError):
        signing.verify_envelope(env, [pub], allow_unsigned=False, where="x")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.update(version=2), "version"),
        (lambda m: m.update(extra=1), "unknown key"),
        (lambda m: m.update(cmdline="a\nb"), "cmdline"),
        (lambda m: m["files"].pop("kernel"), "kernel is missing"),
        (lambda m: m["files"]["kernel"].update(name="../x"), "plain file name"),
        (lambda m: m["files"]["kernel"].update(sha256="AB" * 32), "sha256"),
        (lambda m: m["files"]["kernel"].update(size=-1), "size"),
        (lambda m: m["files"]["kernel"].update(size=True), "size"),
        (lambda m: m["files"].update(bootloader={}), "unknown key"),
    ],
)
def test_manifest_parser_refuses(mutate, match):
    d = manifest().to_dict()
    mutate(d)
    with pytest.raises(ManifestError, match=match):
        signing.manifest_from_dict(d)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(json_values)
def test_envelope_parser_only_raises_manifest_errors(value):
    data = json.dumps({"manifest": value, "signatures": []}).encode()
    try:
        signing.parse_envelope(data)
    except ManifestError:
        pass


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_envelope_parser_on_bytes(blob):
    try:
        signing.parse_envelope(blob)
    except ManifestError:
        pass


@settings(max_examples=50, deadline=None)
@given(
    label=st.text(min_size=1, max_size=50).filter(str.isprintable),
    cmdline=st.text(max_size=100).filter(str.isprintable),
)
def test_manifest_roundtrip_property(label, cmdline):
    m = manifest(label=label, cmdline=cmdline)
    assert signing.manifest_from_dict(json.loads(m.canonical_bytes())) == m


# ---------------------------------------------------------------- key files


def test_signing_key_file(tmp_path):
    path = tmp_path / "sign.key"
    pub = signing.generate_signing_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert signing.public_bytes(signing.load_signing_key(path)) == pub
    with pytest.raises(KeyFileError, match="already exists"):
        signing.generate_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        signing.load_signing_key(path)


def test_parse_public_key_forms(tmp_path):
    k, pub = key_pair()
    assert signing.parse_public_key(pub.hex()) == pub
    hexfile = tmp_path / "k.hex"
    hexfile.write_text(pub.hex() + "\n")
    assert signing.parse_public_key(str(hexfile)) == pub
    pem = tmp_path / "k.pem"
    pem.write_bytes(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert signing.parse_public_key(str(pem)) == pub
    with pytest.raises(BootlinkError):
        signing.parse_public_key("nothex")
