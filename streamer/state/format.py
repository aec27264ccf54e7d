"""Binary encoding of per-entity state rows: raw little-endian float32 behind a header.

No pickle anywhere. One entity's blob is::

    offset size  field
    0      4     magic b"STRE"
    4      2     format version (uint16 LE), currently 1
    6      2     reserved, 0
    8      4     layout id: CRC-32 of the layout's canonical JSON (uint32 LE)
    12     8     last applied step (int64 LE); INT64_MIN means "none yet"
    20     4     batch row (slot) the entity had (uint32 LE); 0xFFFFFFFF: unknown
    24     4*n   the row: n float32 LE values, in layout order

The layout (names and sizes of the state tensors of one row: h and c of every layer,
normalisation statistics, previous target) is stored once beside the blobs. Every blob read
back is checked: magic, version, layout id, length and finiteness. A blob that fails any
check raises `StateError` and is never loaded into a row.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StateError

MAGIC = b"STRE"
FORMAT_VERSION = 1
NO_STEP = -(2**63)
_HEADER = struct.Struct("<4sHHIqI")
HEADER_SIZE = _HEADER.size  # 24
NO_SLOT = 0xFFFFFFFF


@dataclass(frozen=True)
class RowLayout:
    """Names and per-row shapes of the state tensors, in row order."""

    fields: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> RowLayout:
        return cls(tuple((name, tuple(shape)) for name, shape in shapes.items()))

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.fields)

    def to_json(self) -> str:
        return json.dumps(
            {"version": FORMAT_VERSION, "fields": [[n, list(s)] for n, s in self.fields]},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RowLayout:
        try:
            data = json.loads(text)
            if data["version"] != FORMAT_VERSION:
                raise StateError(f"state layout version {data['version']} is not supported")
            fields = tuple(
                (str(name), tuple(int(d) for d in shape)) for name, shape in data["fields"]
            )
        except StateError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"state layout is not valid: {exc}") from None
        return cls(fields)

    @property
    def layout_id(self) -> int:
        return zlib.crc32(self.to_json().encode())

    def flatten(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        """Bank rows {name: [n, *shape]} -> one float32 matrix [n, size]."""
        parts = [
            np.asarray(rows[name], np.float32).reshape(len(rows[name]), int(np.prod(shape)))
            for name, shape in self.fields
        ]
        return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0), np.float32)

    def unflatten(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        col = 0
        for name, shape in self.fields:
            width = int(np.prod(shape))
            out[name] = matrix[:, col : col + width].reshape(len(matrix), *shape)
            col += width
        return out


def encode_rows(
    layout: RowLayout,
    rows: np.ndarray,
    last_steps: Sequence[int],
    slots: Sequence[int] | None = None,
) -> list[bytes]:
    """One blob per row of `rows` [n, layout.size]."""
    rows = np.ascontiguousarray(rows, dtype="<f4")
    if rows.ndim != 2 or rows.shape[1] != layout.size:
        raise StateError(f"state rows have shape {rows.shape}, expected (n, {layout.size})")
    lid = layout.layout_id
    if slots is None:
        slots = [NO_SLOT] * len(rows)
    return [
        _HEADER.pack(MAGIC, FORMAT_VERSION, 0, lid, int(step), int(slot) & NO_SLOT) + row.tobytes()
        for row, step, slot in zip(rows, last_steps, slots, strict=True)
    ]


def decode_rows(
    layout: RowLayout, blobs: Sequence[bytes], names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blobs -> (rows float32 [n, size], last_steps int64 [n], slots int64 [n]; -1 unknown)."""
    n = len(blobs)
    size = layout.size
    expected_len = HEADER_SIZE + 4 * size
    lid = layout.layout_id
    rows = np.empty((n, size), np.float32)
    steps = np.empty(n, np.int64)
    slots = np.empty(n, np.int64)
    for i, blob in enumerate(blobs):
        who = f'entity "{names[i]}"' if names is not None else f"blob {i}"
        if not isinstance(blob, bytes | bytearray) or len(blob) != expected_len:
            got = len(blob) if isinstance(blob, bytes | bytearray) else type(blob).__name__
            raise StateError(f"{who}: state blob has {got} bytes, expected {expected_len}")
        magic, version, _reserved, blob_lid, step, slot = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise StateError(f"{who}: state blob has magic {magic!r}, expected {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise StateError(f"{who}: state format version {version} is not supported")
        if blob_lid != lid:
            raise StateError(f"{who}: state was written with another model layout")
        rows[i] = np.frombuffer(blob, dtype="<f4", offset=HEADER_SIZE)
        steps[i] = step
        slots[i] = -1 if slot == NO_SLOT else slot
    if not np.isfinite(rows).all():
        bad = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        who = f'entity "{names[bad]}"' if names is not None else f"blob {bad}"
        raise StateError(f"{who}: state holds non-finite values")
    return rows, steps, slots


# ---------------------------------------------------------------------- named arrays

ARRAYS_MAGIC = b"STRA"
_ARRAYS_HEAD = struct.Struct("<4sHI")  # magic, version, header length
_DTYPES: dict[str, np.dtype[Any]] = {
    "f4": np.dtype("<f4"),
    "i8": np.dtype("<i8"),
    "u1": np.dtype("u1"),
}


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays -> bytes: a JSON header (names, dtypes, shapes) then raw LE data.

    Used for weights, optimizer state and learner buffers; like safetensors, it can hold
    nothing but plain numbers, so reading it back can never run code.
    """
    entries = []
    chunks = []
    offset = 0
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        code = {"f": "f4", "i": "i8", "u": "u1"}.get(a.dtype.kind)
        if code is None:
            raise StateError(f'array "{name}" has unsupported dtype {a.dtype}')
        data = np.ascontiguousarray(a, dtype=_DTYPES[code]).tobytes()
        entries.append({"name": name, "dtype": code, "shape": list(a.shape), "offset": offset})
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"arrays": entries}, separators=(",", ":")).encode()
    return _ARRAYS_HEAD.pack(ARRAYS_MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(chunks)


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of pack_arrays; validates the header and every extent."""
    try:
        magic, version, hlen = _ARRAYS_HEAD.unpack_from(blob)
    except struct.error:
        raise StateError("array blob is too short") from None
    if magic != ARRAYS_MAGIC:
        raise StateError(f"array blob has magic {magic!r}, expected {ARRAYS_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise StateError(f"array blob format version {version} is not supported")
    start = _ARRAYS_HEAD.size + hlen
    try:
        header = json.loads(blob[_ARRAYS_HEAD.size : start])
        out = {}
        for e in header["arrays"]:
            dtype = _DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            count = int(np.prod(shape))
            begin = start + int(e["offset"])
            end = begin + count * dtype.itemsize
            if begin < start or end > len(blob):
                raise StateError(f'array "{e["name"]}" runs past the end of the blob')
            out[str(e["name"])] = np.frombuffer(
                blob, dtype=dtype, count=count, offset=begin
            ).reshape(shape)
    except StateError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"array blob header is not valid: {exc}") from None
    return out
