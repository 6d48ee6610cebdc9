"""Config validation and key-file safety: every bad input is one line naming the fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bootlink.cli import main
from bootlink.common.config import load_config, parse_config
from bootlink.common.errors import ConfigError, KeyFileError
from bootlink.common.keys import Purpose, generate_key_file, load_key_file

REPO = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_documents_every_key():
    cfg = load_config(REPO / "config-example.yaml")
    text = (REPO / "config-example.yaml").read_text()
    import dataclasses

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            if f.name == "source":
                continue
            value = getattr(obj, f.name)
            yield prefix + f.name
            if dataclasses.is_dataclass(value):
                yield from keys(value, prefix + f.name + ".")

    for key in keys(cfg):
        assert f"{key.rsplit('.', 1)[-1]}:" in text, f"config-example.yaml lacks {key}"


def test_defaults_and_contract_keys():
    cfg = parse_config("")
    assert cfg.key == "/etc/bootlink/key"
    assert cfg.link.interfaces == [] and cfg.link.mtu == 1500
    assert cfg.server.read_only is False and cfg.server.boot.kernel == "/boot/vmlinuz"
    assert cfg.client.timeout == 30 and cfg.client.sources == ["link"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("link: {mtu: big}", "'link.mtu' must be a whole number"),
        ("link: {mtu: 500}", "'link.mtu' must be 1280..65535"),
        ("link: {interfaces: eth0}", "'link.interfaces' must be a list"),
        ("server: {read_only: yes please}", "'server.read_only' must be true or false"),
        ("server: {boot: {kernal: /x}}", "unknown key 'server.boot.kernal'"),
        ("clinet: {}", "unknown key 'clinet'"),
        ("client: {timeout: 0}", "'client.timeout' must be > 0"),
        ("link: [1, 2]", "link must be a mapping"),
        ("key: [unclosed", "is not valid YAML"),
        ("link: {nbd_port: 70000}", "'link.nbd_port' must be 1..65535"),
        ("client: {iso_memory: 2G!1G}", "'client.iso_memory' must be SIZE!START with START 4G"),
        ("client: {iso_memory: 2G}", "'client.iso_memory' must be SIZE!START"),
        ("client: {iso_memory: 100M!4G}", "both multiples of 128M"),
        ("client: {iso_memory: 0!4G}", "'client.iso_memory' must be SIZE!START"),
        ("client: {iso_memory: 2G@4G}", "'client.iso_memory' must be SIZE!START"),
    ],
)
def test_config_errors_name_key_and_fix(text, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="cfg.yaml")
    msg = str(ei.value)
    assert needle in msg and msg.startswith("cfg.yaml") and "\n" not in msg


def test_missing_config_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"copy config-example\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_keygen_mode_and_reload(tmp_path):
    path = tmp_path / "key"
    old = os.umask(0)
    try:
        key = generate_key_file(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key_file(path) == key
    assert key.subkey(Purpose.DISCOVERY) != key.subkey(Purpose.TRANSFER)
    assert key.secret.hex() not in repr(key)
    with pytest.raises(KeyFileError, match="--force"):
        generate_key_file(path)


@pytest.mark.parametrize(
    ("mode", "content", "needle"),
    [
        (0o640, os.urandom(32), "chmod 600"),
        (0o604, os.urandom(32), "chmod 600"),
        (0o600, os.urandom(31), "holds 31 bytes"),
        (0o600, os.urandom(33), "holds 33 bytes"),
    ],
)
def test_unsafe_or_malformed_key_refused(tmp_path, mode, content, needle):
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=needle):
        load_key_file(path)


def test_key_that_is_a_fifo_link_or_huge_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo", 0o600)  # opened blocking, this would wait for a writer
    with pytest.raises(KeyFileError, match="is not a regular file: name the file"):
        load_key_file(tmp_path / "fifo")
    generate_key_file(tmp_path / "key")
    (tmp_path / "link").symlink_to(tmp_path / "key")
    with pytest.raises(KeyFileError, match="is a symbolic link: name the file it points to"):
        load_key_file(tmp_path / "link")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # resolve() would raise on this one
    with pytest.raises(KeyFileError, match="is a symbolic link"):
        load_key_file(tmp_path / "loop")
    (tmp_path / "big").write_bytes(bytes(100_000))
    (tmp_path / "big").chmod(0o600)
    with pytest.raises(KeyFileError, match="holds more than 4096 bytes, not 32"):
        load_key_file(tmp_path / "big")


def test_every_command_refuses_a_bad_key_with_one_line(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    (tmp_path / "disk").write_bytes(bytes(1 << 20))  # a good disk: only the key is wrong
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"key: {key}\nserver: {{disk: {tmp_path / 'disk'}}}\n")
    for cmd in (["server"], ["client", "--dry-run"]):
        assert main([*cmd, "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "chmod 600" in err[0], err


def test_keygen_cli(tmp_path, capsys):
    assert main(["keygen", "--key", str(tmp_path / "k")]) == 0
    assert "key id" in capsys.readouterr().out
    assert main(["keygen", "--key", str(tmp_path / "k")]) == 2
    assert main(["keygen", "--key", str(tmp_path / "missing-dir" / "k")]) == 2


def test_keygen_never_replaces_what_is_not_a_key_file(tmp_path, capsys):
    """--force replaces an old key, never a device, directory or symlink; a planted
    <key>.tmp symlink catches nothing; each refusal is one line, nothing left behind."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "k.tmp").symlink_to(victim)  # the old fixed temp name, planted
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(victim)
    assert main(["keygen", "--key", str(tmp_path / "k")]) == 0
    assert victim.read_text() == "precious" and (tmp_path / "k").stat().st_size == 32
    for name in ("fifo", "dir", "link"):
        for cmd in ("keygen", "sign-key"):
            assert main([cmd, "--key", str(tmp_path / name), "--force"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "is not a regular file: choose another path" in err[0]
    assert (tmp_path / "dir").is_dir() and (tmp_path / "link").is_symlink()
    assert victim.read_text() == "precious"
    assert main(["keygen", "--key", ""]) == 2
    assert "names no file" in capsys.readouterr().err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["dir", "fifo", "k", "k.tmp", "link", "victim"]


def test_keygen_on_a_full_or_read_only_filesystem_is_one_line(tmp_path, capsys):
    from smallfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "small", size="64k") as small:
        (small / "fill").write_bytes(b"\0" * (64 << 10))  # as full as tmpfs lets it be
        for cmd in ("keygen", "sign-key"):
            assert main([cmd, "--key", str(small / "k")]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "is full" in err[0] and "another path" in err[0], err
        (small / "fill").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        assert main(["keygen", "--key", str(small / "k")]) == 2
        err = capsys.readouterr().err
        assert "read-only" in err and "Traceback" not in err
        assert sorted(p.name for p in small.iterdir()) == []


def test_iso_memory_default_off_and_parsed():
    from bootlink.common.config import iso_memory_range

    assert parse_config("").client.iso_memory == ""
    cfg = parse_config('client: {iso_memory: "2G!4G"}')
    assert iso_memory_range(cfg.client.iso_memory) == (2 << 30, 4 << 30)
    assert iso_memory_range("512m!4352M") == (512 << 20, 4352 << 20)
    assert iso_memory_range("2G") is None
