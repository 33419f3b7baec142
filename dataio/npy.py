"""``.npy`` arrays read without Python's ``ast``: shard fields, memory-mapped files, ``.npz`` records.

``np.load`` parses an ``.npy`` header with ``ast.literal_eval``. On CPython 3.11 that fails now and
then with ``SystemError: AST constructor recursion depth mismatch``: the interpreter keeps one
AST-constructor depth counter, and a garbage collection that runs during the header's parse, and
finalizes an object whose ``__del__`` (or weakref callback) builds an AST of its own, resets it
(CPython gh-106905 and its relatives; ``tests/test_dataio_npy.py`` provokes it). In a DataLoader
worker, where the parent's garbage is inherited at fork, that turned a good sample into a skipped
``bad_array`` one, or a stopped training under ``on_error=raise``, depending on what ran before.

The headers ``np.save`` writes have one fixed form; it is parsed here with a regular expression.
Any other header (another writer's spacing, a structured or object dtype, a size that does not
match) goes to ``np.load``, which gives the same arrays and the same errors as before. The same
parse serves files mapped from disk (``open_npy``: the evaluator's saved similarities, GloVe,
precomp features) and the evaluator's ``.npz`` resume records (``load_npz``).
"""
from __future__ import annotations

import io
import math
import os
import re
import zipfile
import zlib

import numpy as np

_MAGIC = b"\x93NUMPY"
# np.lib.format's own layout: keys sorted, ", }" at the end, padded with spaces to a multiple of 64
_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (True|False), "
                     r"'shape': \(((?:\d+, )*\d*,?)\), \} *\n")


def _header_span(data: bytes) -> tuple[int, int] | None:
    """(start, length) of the header text of ``.npy`` bytes (from their first 12 on), or None."""
    if len(data) < 10 or data[:6] != _MAGIC or data[6] not in (1, 2, 3):
        return None
    if data[6] == 1:
        return 10, int.from_bytes(data[8:10], "little")
    return 12, int.from_bytes(data[8:12], "little")


def _header(data: bytes) -> tuple[np.dtype, bool, tuple[int, ...], int] | None:
    """(dtype, fortran order, shape, offset of the array data) of an ``np.save`` header, or None."""
    span = _header_span(data)
    if span is None:
        return None
    start, size = span
    try:
        text = data[start:start + size].decode("latin1" if data[6] < 3 else "utf8")
    except UnicodeDecodeError:
        return None
    m = _HEADER.fullmatch(text)
    if m is None:
        return None
    try:
        dtype = np.dtype(m[1])
    except TypeError:
        return None
    if dtype.hasobject:  # '|O' fits the pattern; structured descrs (lists) do not
        return None
    shape = tuple(int(x) for x in m[3].split(",") if x.strip())
    return dtype, m[2] == "True", shape, start + size


def load_npy(data: bytes) -> np.ndarray:
    """The array of ``.npy`` bytes (a writable copy); never unpickles. Raises as ``np.load`` does."""
    head = _header(data)
    if head is not None:
        dtype, fortran, shape, offset = head
        count = math.prod(shape)
        if len(data) - offset == count * dtype.itemsize:
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")
    return np.load(io.BytesIO(data), allow_pickle=False)


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """``np.load(path, mmap_mode="r")`` without ``ast``: a read-only memory map of an ``.npy`` file.
    Empty arrays, other headers and a size that does not match go to ``np.load`` and its errors."""
    with open(path, "rb") as f:
        prefix = f.read(12)
        span = _header_span(prefix)
        if span is not None:
            prefix += f.read(max(0, sum(span) - len(prefix)))
        size = os.fstat(f.fileno()).st_size
    head = _header(prefix)
    if head is not None:
        dtype, fortran, shape, offset = head
        count = math.prod(shape)
        if count and size - offset == count * dtype.itemsize:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran else "C")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``np.savez`` file by name, each read by ``load_npy``. Anything that is not a
    whole such file (empty, cut short, not a zip, a damaged member) raises ValueError naming it."""
    try:
        with zipfile.ZipFile(path) as z:
            return {name.removesuffix(".npy"): load_npy(z.read(name)) for name in z.namelist()}
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a whole .npz file ({type(err).__name__}: {err})") from err
