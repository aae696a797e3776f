"""Arrow arrays to and from numpy without pyarrow's pandas check.

``pa.array``, ``Array.to_numpy`` and ``take`` given numpy indices import pandas where it is
installed, on a process's first call: 0.3-0.9 CPU s that `segment` paid after the network, in its
own process (the table, on one core) and in the label images' process, for nothing pandas does.
Arrays without nulls are converted here from their buffers: the same values, no import.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["arrow_array", "binary_buffers", "numpy_of", "one_array", "taken"]

_NUMERIC = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
    pa.float32(): np.float32, pa.float64(): np.float64,
}


def arrow_array(values: Any, type: pa.DataType) -> pa.Array:  # noqa: A002 - pyarrow's own name
    """``pa.array(values, type=type)`` for a 1-D numpy array without missing values: numbers,
    bool, string (numpy text or str objects) or binary (bytes objects)."""
    values = np.asarray(values)
    n = len(values)
    if pa.types.is_boolean(type):
        bits = np.packbits(values.astype(bool, copy=False), bitorder="little")
        return pa.Array.from_buffers(type, n, [None, pa.py_buffer(bits)])
    if pa.types.is_string(type) or pa.types.is_binary(type):
        items = [s.encode() for s in values.tolist()] if pa.types.is_string(type) else values.tolist()
        lengths = np.fromiter(map(len, items), np.int64, count=n)
        if lengths.sum() >= 2**31:  # beyond 32-bit offsets: pyarrow's own conversion says what it makes of it
            return pa.array(items, type=type)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.Array.from_buffers(type, n, [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items))])
    if type not in _NUMERIC:
        raise TypeError(f"no Arrow {type} array from numpy here")
    return pa.Array.from_buffers(type, n, [None, pa.py_buffer(np.ascontiguousarray(values, _NUMERIC[type]))])


def one_array(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``array`` as one Arrow array: a chunked array's only chunk, or its chunks combined."""
    if isinstance(array, pa.ChunkedArray):
        return array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
    return array


def numpy_of(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``array.to_numpy(zero_copy_only=False)``: numbers as a read-only view of the buffer, bool
    unpacked, binary and string as an object array; arrays with nulls or of other types through
    pyarrow's own conversion."""
    array = one_array(array)
    kind, n = array.type, len(array)
    if array.null_count == 0:
        if kind in _NUMERIC:
            dtype = np.dtype(_NUMERIC[kind])
            if n == 0:
                return np.empty(0, dtype)
            return np.frombuffer(array.buffers()[1], dtype, count=n, offset=array.offset * dtype.itemsize)
        if pa.types.is_boolean(kind):
            if n == 0:
                return np.empty(0, bool)
            bits = np.unpackbits(np.frombuffer(array.buffers()[1], np.uint8), bitorder="little", count=array.offset + n)
            return bits[array.offset :].astype(bool)
        if pa.types.is_binary(kind) or pa.types.is_string(kind):
            out = np.empty(n, dtype=object)
            out[:] = array.to_pylist()
            return out
    return array.to_numpy(zero_copy_only=False)


def binary_buffers(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A binary or string array without nulls as int64 offsets (n + 1) into uint8 data: item
    ``i`` is ``data[offsets[i]:offsets[i + 1]]``, a read-only view of the array's buffers."""
    array = one_array(array)
    kind = array.type
    large = pa.types.is_large_binary(kind) or pa.types.is_large_string(kind)
    if array.null_count or not (large or pa.types.is_binary(kind) or pa.types.is_string(kind)):
        raise TypeError(f"binary_buffers needs binary or string values without nulls, got {kind}")
    n, buffers, width = len(array), array.buffers(), 8 if large else 4
    offsets = np.frombuffer(buffers[1], f"<i{width}", count=n + 1, offset=array.offset * width).astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
    data.flags.writeable = False  # read-only whatever the buffer (one type for compiled readers)
    return offsets, data


def taken(array: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """``array.take(rows)`` for numpy positions ``rows``, one array (chunks combined)."""
    return one_array(array).take(arrow_array(np.asarray(rows, np.int64), pa.int64()))
