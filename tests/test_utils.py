import os
import stat

import pytest

from tbps.utils import atomic_write, atomic_write_bytes, sha256_file


def test_atomic_write_replaces_whole_file_and_keeps_normal_permissions(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with atomic_write(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "index.bin"
    atomic_write_bytes(target, b"complete")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["index.bin"]
    assert sha256_file(target) == "eebbf6457e46a7f63acdf9b97390f790ba443d60cfa44b607da7e5c40aa1cc1d"
