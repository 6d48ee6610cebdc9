"""Bad config values and files: each one exit status 2 and exactly one stderr line naming the
file or key and the fix, never a traceback (the commands must not start on them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bootlink.cli import main
from bootlink.common.config import MAX_SECONDS, parse_config
from bootlink.common.errors import ConfigError


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def config_file(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "c.yaml"
    if isinstance(text, str):
        text = text.encode()
    p.write_bytes(text)
    return p


# --- files that are not UTF-8 text --------------------------------------------------------

BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4


@pytest.mark.parametrize(
    "cmd",
    [
        ["client", "--dry-run"],
        ["server"],
        ["usb", "create", "--image", "{tmp}/stick.img", "--ramdisk", "{tmp}"],
        ["ramdisk", "build", "--output", "{tmp}/out"],
        ["setup-server-os", "--root", "{tmp}", "--dry-run"],
    ],
)
def test_binary_config_file_is_one_line(tmp_path, capsys, cmd):
    cfg = config_file(tmp_path, BINARY)
    before = sorted(os.listdir(tmp_path))
    args = [a.replace("{tmp}", str(tmp_path)) for a in cmd]
    assert main([*args, "--config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert f"{cfg} is not a text (UTF-8) YAML file: " in line, line
    assert "config-example.yaml" in line
    assert sorted(os.listdir(tmp_path)) == before  # nothing created


def test_nul_in_a_utf8_config_is_one_line(tmp_path, capsys):
    cfg = config_file(tmp_path, "client:\n  timeout: 3\0\n")
    assert main(["client", "--dry-run", "--config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert f"{cfg} is not a text YAML file" in line and "U+0000" in line, line


def test_config_path_that_is_a_directory(tmp_path, capsys):
    assert main(["client", "--dry-run", "--config", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert f"{tmp_path} is a directory" in line and "name the YAML file" in line


# --- numbers ------------------------------------------------------------------------------

FLOAT_KEYS = [
    ("client", "timeout"),
    ("client", "menu_timeout"),
    ("autokexec", "confirm_timeout"),
]


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN", "inf", "nan", "1e999"])
def test_non_finite_numbers_refused(section, key, value):
    with pytest.raises(ConfigError) as ei:
        parse_config(f"{section}: {{{key}: {value}}}", source="cfg.yaml")
    msg = str(ei.value)
    assert msg.startswith("cfg.yaml: ") and f"'{section}.{key}' must be a finite number" in msg
    assert "e.g. 30" in msg and "\n" not in msg


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS)
@pytest.mark.parametrize(
    ("value", "expected"), [("1e3", 1000.0), ("2.5E1", 25.0), ("'45'", 45.0), ("7", 7.0)]
)
def test_numeric_text_is_a_number(section, key, value, expected):
    cfg = parse_config(f"{section}: {{{key}: {value}}}")
    assert getattr(getattr(cfg, section), key) == expected


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS)
@pytest.mark.parametrize("value", ["abc", "'1e3x'", "''", "true", "[1]", "{a: 1}", "30s"])
def test_real_non_numbers_still_refused(section, key, value):
    with pytest.raises(ConfigError) as ei:
        parse_config(f"{section}: {{{key}: {value}}}", source="cfg.yaml")
    msg = str(ei.value)
    assert f"'{section}.{key}' must be a number, e.g. 30" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("client: {timeout: 0}", "'client.timeout' must be > 0 and <= "),
        ("client: {timeout: -5}", "'client.timeout' must be > 0 and <= "),
        ("client: {timeout: 1e300}", "'client.timeout' must be > 0 and <= "),
        ("client: {menu_timeout: 1e12}", "(0 = boot the default at once); got 1e+12"),
        ("autokexec: {confirm_timeout: -1}", "'autokexec.confirm_timeout' must be > 0 and <= "),
        ("autokexec: {confirm_timeout: 0}", "'autokexec.confirm_timeout' must be > 0 and <= "),
    ],
)
def test_durations_out_of_range(text, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="cfg.yaml")
    msg = str(ei.value)
    assert needle in msg and msg.startswith("cfg.yaml: ") and "\n" not in msg
    assert "seconds" in msg


def test_durations_at_their_limits_are_accepted():
    cfg = parse_config(
        f"client: {{timeout: {MAX_SECONDS}, menu_timeout: 0}}\n"
        "autokexec: {confirm_timeout: 0.5}\n"
    )
    assert cfg.client.timeout == MAX_SECONDS and cfg.client.menu_timeout == 0
    assert cfg.autokexec.confirm_timeout == 0.5
    # a negative menu timeout waits for a choice (GRUB's timeout=-1), as menu.py does
    assert parse_config("client: {menu_timeout: -1}").client.menu_timeout == -1


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("client:\n  timeout: .inf\n", "'client.timeout' must be a finite number"),
        ("client:\n  timeout: .nan\n", "'client.timeout' must be a finite number"),
        ("client:\n  menu_timeout: .inf\n", "'client.menu_timeout' must be a finite number"),
        ("autokexec:\n  confirm_timeout: -1\n", "'autokexec.confirm_timeout' must be > 0"),
        ("client:\n  timeout: soon\n", "'client.timeout' must be a number"),
    ],
)
def test_bad_numbers_through_the_cli(tmp_path, capsys, text, needle):
    cfg = config_file(tmp_path, text)
    assert main(["client", "--dry-run", "--config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"bootlink client: error: {cfg}: ") and needle in line, line


# --- duplicate keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("client:\n  timeout: 3\n  sources: [link]\n  timeout: 4\n", "timeout", 4, 2),
        ("key: /a\nlink: {}\nkey: /b\n", "key", 3, 1),
        ("client: {timeout: 3}\nclient: {timeout: 4}\n", "client", 2, 1),
        ("server:\n  boot:\n    kernel: /a\n    kernel: /b\n", "kernel", 4, 3),
        ("client: {timeout: 3, timeout: 4}\n", "timeout", 1, 1),
    ],
)
def test_duplicate_keys_refused(tmp_path, capsys, text, key, line, first):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="cfg.yaml")
    msg = str(ei.value)
    assert msg.startswith(f"cfg.yaml: line {line}: key '{key}' is given twice") and "\n" not in msg
    assert f"first on line {first}" in msg and "keep one of them" in msg
    cfg = config_file(tmp_path, text)
    assert main(["client", "--dry-run", "--config", str(cfg)]) == 2
    assert f"line {line}: key '{key}' is given twice" in one_error_line(capsys)


def test_yaml_merge_keys_are_not_duplicates():
    cfg = parse_config("client:\n  <<: {timeout: 3, menu_timeout: 1}\n  timeout: 4\n")
    assert cfg.client.timeout == 4 and cfg.client.menu_timeout == 1


def test_same_key_in_different_mappings_is_fine():
    cfg = parse_config("client: {timeout: 3}\nautokexec: {confirm_timeout: 3}\n")
    assert cfg.client.timeout == 3 and cfg.autokexec.confirm_timeout == 3


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("link: {interfaces: [eth0, eth1, eth0]}", "names eth0 twice: list each NIC once"),
        ("link: {interfaces: [lo]}", "cannot use lo (loopback is no link)"),
    ],
)
def test_link_interfaces_each_once_and_no_loopback(text, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_config(text, source="cfg.yaml")
