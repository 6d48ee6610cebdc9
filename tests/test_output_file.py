"""Where downloads are written: a full, read-only or missing place is one line naming the
fix, and a failed write leaves nothing behind. On a real (small) tmpfs, as the ramdisk's
download directory is."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from smallfs import mounted_tmpfs

from bootlink.common import output_file
from bootlink.common.output_file import OutputFile, WriteFailed, make_dir

if os.geteuid() != 0:
    pytest.skip("needs root to mount a small tmpfs", allow_module_level=True)


@pytest.fixture
def small(tmp_path):
    with mounted_tmpfs(tmp_path / "small") as where:
        yield where


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_commit_renames_only_a_complete_file(tmp_path):
    with OutputFile(tmp_path / "f") as out:
        out.write(b"abc")
        out.pwrite(b"XY", 1)
        assert out.tell() == 3
        assert not (tmp_path / "f").exists() and (tmp_path / "f.part").exists()
        assert out.commit() == tmp_path / "f"
    assert (tmp_path / "f").read_bytes() == b"aXY"
    assert not (tmp_path / "f.part").exists()


def test_leaving_without_commit_removes_the_part_file(tmp_path):
    (tmp_path / "f").write_bytes(b"the previous good copy")
    with pytest.raises(RuntimeError), OutputFile(tmp_path / "f") as out:
        out.write(b"half")
        raise RuntimeError("the stream broke")
    assert not (tmp_path / "f.part").exists()
    assert (tmp_path / "f").read_bytes() == b"the previous good copy"


def test_disk_filling_up_midway_is_one_line_and_leaves_nothing(small):
    block = os.urandom(256 << 10)
    with pytest.raises(WriteFailed) as ei, OutputFile(small / "initrd") as out:
        for _ in range(8):  # 2 MiB into 1 MiB
            out.write(block)
    msg = one_line(ei.value)
    assert msg.startswith(f"{small} is full (0 bytes left): initrd.part could not be written")
    assert "client.download_dir or --output" in msg
    assert os.listdir(small) == []  # the space is given back


def test_disk_filling_up_in_worker_threads(small):
    """Swarm and IPFS write from hashing threads: the error is the same line there."""
    errors = []
    with OutputFile(small / "f") as out:

        def work(i: int) -> None:
            try:
                out.pwrite(os.urandom(512 << 10), i * (512 << 10))
            except WriteFailed as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors and all(" is full " in one_line(e) for e in errors)
    assert os.listdir(small) == []


def test_known_size_refused_before_anything_is_written(small):
    with pytest.raises(WriteFailed) as ei:
        OutputFile(small / "kernel", size=4 << 20)
    msg = one_line(ei.value)
    assert msg.startswith(f"{small} has 1.0 MiB free but kernel takes 4.0 MiB: free space")
    assert os.listdir(small) == []
    with OutputFile(small / "kernel", size=512 << 10) as out:  # what fits is let through
        out.write(os.urandom(512 << 10))
        out.commit()


def test_read_only_and_missing_directories_named(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        with pytest.raises(WriteFailed) as ei:
            OutputFile(ro / "f")
        assert one_line(ei.value) == (
            f"cannot write {ro}/f.part: Read-only file system; {ro} is read-only: download "
            "to a writable filesystem (client.download_dir or --output; the ramdisk's is RAM)"
        )
        with pytest.raises(WriteFailed, match=r"Read-only file system; .* is read-only"):
            make_dir(ro / "sub" / "dir")
    with pytest.raises(WriteFailed) as ei:
        OutputFile(tmp_path / "nowhere" / "f")
    assert one_line(ei.value).endswith(
        f"No such file or directory; {tmp_path}/nowhere does not exist: create it or name "
        "an existing directory"
    )
    with pytest.raises(WriteFailed) as ei:  # there, but takes no new files
        make_dir(Path("/proc/bootlink-test"))
    assert one_line(ei.value).endswith("; /proc refuses new files: pick another directory")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(WriteFailed, match="Not a directory"):
        make_dir(tmp_path / "file" / "sub")


def test_removed_on_failure_takes_only_what_the_failed_body_made(tmp_path):
    old = tmp_path / "d"
    old.mkdir()
    (old / "kept").write_text("x")
    with pytest.raises(KeyboardInterrupt), output_file.removed_on_failure(old):
        (old / "swarm-1").mkdir()
        (old / "swarm-1" / "manifest.json").write_text("{}")
        (old / "loose.part").write_text("p")
        raise KeyboardInterrupt
    assert sorted(os.listdir(old)) == ["kept"]
    with output_file.removed_on_failure(old):
        (old / "ok").mkdir()  # a body that succeeds keeps what it made
    assert sorted(os.listdir(old)) == ["kept", "ok"]
    new = tmp_path / "new"
    with pytest.raises(ValueError), output_file.removed_on_failure(new):
        new.mkdir()
        raise ValueError
    assert not new.exists()
