"""Atomic outputs: a final name appears only when complete; OS errors become one-line OutputErrors."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from wsi_mtl import atomic
from wsi_mtl.atomic import atomic_path, output_error, write_json_atomic
from wsi_mtl.errors import OutputError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def test_atomic_path_renames_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name == f".out.txt.partial-{os.getpid()}"
        tmp.write_text("hello")
        assert not final.exists()
    assert final.read_text() == "hello"
    assert _leftovers(tmp_path) == []


def test_atomic_path_exception_leaves_no_file(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_path_keeps_previous_file_on_error(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_text("new, unfinished")
            raise KeyboardInterrupt
    assert final.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_directory(tmp_path: Path) -> None:
    final = tmp_path / "store.zarr"
    with pytest.raises(ValueError):
        with atomic_path(final) as tmp:
            (tmp / "a").mkdir(parents=True)
            (tmp / "a" / "b").write_text("x")
            raise ValueError("interrupted")
    assert not final.exists() and _leftovers(tmp_path) == []
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "c").write_text("y")
    assert (final / "c").read_text() == "y"


def test_disk_full_on_replace_is_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    final = tmp_path / "objects.geojson"
    with pytest.raises(OutputError, match=r"^disk full while writing .*objects\.geojson") as info:
        with atomic_path(final) as tmp:
            tmp.write_text("data")
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 30
    assert not final.exists() and _leftovers(tmp_path) == []


def test_permission_denied_on_open_is_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic, "open", denied, raising=False)
    final = tmp_path / "run.json"
    with pytest.raises(OutputError, match=r"^cannot write .*run\.json: permission denied$"):
        write_json_atomic(final, {"a": 1})
    assert not final.exists() and _leftovers(tmp_path) == []


def test_read_only_file_system_is_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(src: str, dst: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.os, "replace", read_only)
    with pytest.raises(OutputError, match="read-only file system"):
        write_json_atomic(tmp_path / "x.json", [])


def test_other_os_errors_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def io_error(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "replace", io_error)
    with pytest.raises(OSError) as info:
        write_json_atomic(tmp_path / "x.json", [])
    assert not isinstance(info.value, OutputError) and info.value.errno == errno.EIO
    assert _leftovers(tmp_path) == []


def test_output_error_mapping() -> None:
    assert "disk full" in str(output_error(OSError(errno.ENOSPC, "x"), "/a/b"))
    assert "permission denied" in str(output_error(OSError(errno.EPERM, "x"), "/a/b"))
    assert output_error(OSError(errno.ENOENT, "x"), "/a/b") is None


def test_write_json_atomic_handles_numpy_and_nan(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    write_json_atomic(path, {"n": np.int64(3), "x": np.float32(0.5), "bad": math.nan, "inf": [np.float64("inf")]})
    assert json.loads(path.read_text()) == {"n": 3, "x": 0.5, "bad": None, "inf": [None]}
    write_json_atomic(path, {"n": 4})
    assert json.loads(path.read_text()) == {"n": 4}
    assert _leftovers(tmp_path) == []
