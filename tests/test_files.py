"""The one atomic-write helper (common/files.py): a reader sees the old file or the whole new one."""

from __future__ import annotations

import os
import stat

import pytest

from fedhydra.common.files import atomic_path, write_atomic


def test_write_atomic_writes_text_and_bytes_and_leaves_no_temporary_file(tmp_path):
    write_atomic(tmp_path / "sub" / "a.txt", "line 1\nline 2\n")
    write_atomic(tmp_path / "sub" / "b.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "a.txt").read_bytes() == b"line 1\nline 2\n"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.txt", "b.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_path_keeps_the_suffix_sets_the_mode_and_can_fsync(tmp_path):
    seen = []
    with atomic_path(tmp_path / "plot.png", suffix=".png", mode=0o644, durable=True) as tmp:
        seen.append(tmp)
        tmp.write_bytes(b"png")
    assert seen[0].suffix == ".png" and seen[0].parent == tmp_path and not seen[0].exists()
    assert stat.S_IMODE(os.stat(tmp_path / "plot.png").st_mode) == 0o644
    write_atomic(tmp_path / "key", b"secret", mode=0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "key").st_mode) == 0o600
