"""Arrow <-> numpy without pyarrow's pandas check (``wsi_mtl.export._arrow``), and the exports
that use it: they import no pandas, where pandas is installed, and write what they wrote before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from wsi_mtl.export._arrow import arrow_array, binary_buffers, numpy_of, taken

try:
    from test_derive import make_result_dir
except ImportError:  # tests collected as a package
    from .test_derive import make_result_dir  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (np.array([1, -2, 3], np.int32), pa.int32()),
        (np.array([1.5, np.nan, -0.0], np.float64), pa.float64()),
        (np.array([True, False, True, True, False, False, True, False, True]), pa.bool_()),
        (np.array(["nuclei", "gland", "", "épithélial"]), pa.string()),
        (np.array([b"\x01\x02", b"", b"wkb"], dtype=object), pa.binary()),
        (np.array([], np.float64), pa.float64()),
    ],
)
def test_arrays_match_pyarrows_own_conversion(values: np.ndarray, kind: pa.DataType) -> None:
    made = arrow_array(values, kind)
    ref = pa.array(values.tolist() if kind in (pa.string(), pa.binary()) else values, type=kind)
    assert made.type == ref.type and made.null_count == ref.null_count == 0
    np.testing.assert_array_equal(made.to_numpy(zero_copy_only=False), ref.to_numpy(zero_copy_only=False))  # NaN == NaN here
    back = numpy_of(made)
    np.testing.assert_array_equal(back, made.to_numpy(zero_copy_only=False))
    for part in (made.slice(1), made.slice(1, 2)):  # offsets into the buffers
        np.testing.assert_array_equal(numpy_of(part), part.to_numpy(zero_copy_only=False))
    rows = np.array([len(values) - 1, 0]) if len(values) else np.array([], np.int64)
    assert taken(made, rows).equals(made.take(pa.array(rows, type=pa.int64())))


def test_chunked_and_null_arrays() -> None:
    chunked = pa.chunked_array([pa.array([1.0, 2.0]), pa.array([3.0])])
    np.testing.assert_array_equal(numpy_of(chunked), [1.0, 2.0, 3.0])
    assert taken(chunked, np.array([2, 0])).to_pylist() == [3.0, 1.0]
    with_nulls = pa.array([1.0, None, 3.0])  # pyarrow's own conversion (NaN where missing)
    np.testing.assert_array_equal(numpy_of(with_nulls), [1.0, np.nan, 3.0])
    with pytest.raises(TypeError, match="no Arrow"):
        arrow_array(np.zeros(2), pa.date32())


def test_exports_import_no_pandas(tmp_path: Path) -> None:
    """`wsimtl export` on a result with objects (table, GeoJSON, preview, label images in their
    own process, summary) runs without importing pandas in any of its processes."""
    pytest.importorskip("pandas", reason="nothing to guard where pandas is not installed")
    result_dir = make_result_dir(tmp_path)
    log = tmp_path / "pandas_imports.txt"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # every process of the run, the forkserver's children too
        "import importlib.abc, os, sys, traceback\n"
        "class _Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pandas':\n"
        f"            with open({str(log)!r}, 'a') as fh:\n"
        "                fh.write(f'pid {os.getpid()}:\\n' + ''.join(traceback.format_stack(limit=12)))\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hook())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = f"from wsi_mtl.cli import main; main(['export', {str(result_dir)!r}, '--workers', '2', '-q'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    assert pq.read_metadata(result_dir / "objects.parquet").num_rows > 0  # objects went through every export
    assert (result_dir / "preview.png").is_file()
    assert not log.exists(), log.read_text()


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary(), pa.string(), pa.large_string()])
def test_binary_buffers_give_each_item_in_place(kind: pa.DataType) -> None:
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    items = ["ab", "", "ü€", "x" * 40, "z"] if text else [b"\x01\x03", b"", "ü€".encode(), b"x" * 40, b"\x00\xff"]
    full = pa.array(items, type=kind)
    for array in (full, full.slice(1, 3), pa.chunked_array([full.slice(0, 2), full.slice(2)])):
        offsets, data = binary_buffers(array)
        expected = [i if isinstance(i, bytes) else i.encode() for i in array.to_pylist()]
        assert [data[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])] == expected
        assert offsets.dtype == np.int64 and not data.flags.writeable


def test_binary_buffers_refuse_other_arrays() -> None:
    with pytest.raises(TypeError, match="binary or string"):
        binary_buffers(pa.array([1, 2]))
    with pytest.raises(TypeError, match="without nulls"):
        binary_buffers(pa.array([b"a", None]))
