"""The safetensors header, read and validated as the safetensors library validates it.

A header is 8 bytes of length, then a JSON object of tensor entries (dtype, shape, data offsets)
and an optional ``__metadata__`` of strings; the data follows, each tensor's bytes at its
offsets, together covering the rest of the file exactly. Everything the library refuses is
refused here with one :class:`~deltakit.errors.DeltakitError` naming the file (and the tensor),
before any tensor data is read; a duplicate tensor key is refused too (which entry would be the
tensor?).

Example::

    entries = read_safetensors_header(Path("model.safetensors"))
    shape, dtype, offset = entries["model.embed_tokens.weight"]
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from deltakit.errors import DeltakitError
from deltakit.io.json_files import MAX_NESTING, nesting_depth, short_json
from deltakit.io.paths import open_regular


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# Bits per element of every dtype the safetensors format knows (0.8: its `Dtype` enum). The header
# is validated against all of them, as the safetensors library does; which ones deltakit can read
# is decided after (see deltakit.io.tensor_info.SAFETENSORS_DTYPES).
_SAFETENSORS_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
_USIZE_MAX = 2**64 - 1
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")

Stamp = tuple[int, int, int, int]
Entries = dict[str, tuple[tuple[int, ...], str, int]]


def file_stamp(st: os.stat_result) -> Stamp:
    """(device, inode, size, mtime) of a file: a reader that finds them changed stops (see Checkpoint)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_safetensors_header(file: Path) -> Entries:
    """Name -> (shape, dtype string, absolute data offset) from a safetensors header, validated
    (:func:`stamped_header` without the stamp)."""
    return stamped_header(file)[0]


def stamped_header(file: Path) -> tuple[Entries, Stamp]:
    """The header's entries, name -> (shape, dtype string, absolute data offset), validated, and the
    file's :func:`file_stamp` when it was read.

    Refuses, with one :class:`DeltakitError` naming the file (and the tensor), everything the
    safetensors library refuses: a header that is not UTF-8 JSON of the expected shape (an object
    of tensor entries and an optional ``__metadata__`` of strings), nested deeper than serde_json
    parses, unknown dtypes, shapes and ``data_offsets`` that are not non-negative integers,
    offsets that overlap or leave gaps, a byte span that does not match shape × dtype size, and
    data that does not end exactly at the end of the file. A truncated file is refused here,
    before any tensor is read.
    """
    try:
        with os.fdopen(open_regular(file), "rb") as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            head = fh.read(8)
            if len(head) < 8:
                raise DeltakitError(f"{file} is truncated or not a safetensors file ({size} bytes)")
            header_len = int.from_bytes(head, "little")
            if header_len > MAX_HEADER_BYTES:
                raise DeltakitError(f"{file} is not a safetensors file: its header would be {header_len:,} bytes, "
                                    f"more than the format's limit of {MAX_HEADER_BYTES:,}")
            if header_len <= 0 or 8 + header_len > size:
                raise DeltakitError(f"{file} is not a safetensors file, or its header is truncated")
            raw = fh.read(header_len)
    except OSError as exc:
        raise DeltakitError(f"cannot read {file}: {_first_line(exc)}") from None
    if len(raw) < header_len:
        raise DeltakitError(f"{file} is truncated: it ended while its header was being read")
    header = _parse_header_json(file, raw)
    out = _validate_header(file, header, size - 8 - header_len)
    entries = {name: (shape, dtype, 8 + header_len + begin) for name, (shape, dtype, begin) in out.items()}
    return entries, file_stamp(st)


class _Pairs(dict):
    """A JSON object; ``duplicates`` holds the keys that appeared more than once (the last value is kept)."""

    duplicates: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = frozenset(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return obj


class _NotJson(ValueError):
    """A JSON value serde_json refuses although Python's json module reads it."""


def _refuse_constant(text: str) -> Any:
    raise _NotJson(f"{text} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJson(f"number out of range: {text[:20]}")
    return value


def _integer(text: str) -> int | float:
    # serde_json reads "-0" as the float -0.0, and integers beyond 64 bits as floats.
    if text == "-0":
        return -0.0
    if len(text.lstrip("-")) > 20:
        return _finite_float(text)
    return int(text)


def _parse_header_json(file: Path, raw: bytes) -> Any:
    """The header's JSON value, read as serde_json reads it (strict UTF-8, finite numbers, bounded nesting)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DeltakitError(f"{file} is corrupt: its safetensors header is not UTF-8") from None
    if nesting_depth(raw) > MAX_NESTING:
        raise DeltakitError(f"{file} is corrupt: its safetensors header is nested more than {MAX_NESTING} deep")
    try:
        header = json.loads(text, object_pairs_hook=_object, parse_constant=_refuse_constant,
                            parse_float=_finite_float, parse_int=_integer)
    except (ValueError, RecursionError):  # JSONDecodeError and _NotJson are ValueErrors
        raise DeltakitError(f"{file} is corrupt: its safetensors header is not valid JSON") from None
    if "\\u" in text and re.search(r"\\u[dD][89a-fA-F]", text):
        try:  # a lone surrogate escape, which Python keeps and serde_json refuses
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DeltakitError(f"{file} is corrupt: its safetensors header has an unpaired \\u surrogate escape") from None
    return header


def _usize(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _USIZE_MAX


def _dtype_name(value: Any) -> str | None:
    """A dtype given as "F32", or as the unit-variant object {"F32": null} serde also accepts."""
    if isinstance(value, str):
        return value if value in _SAFETENSORS_BITS else None
    if isinstance(value, dict) and len(value) == 1 and not value.duplicates:
        (name, unit), = value.items()
        return name if name in _SAFETENSORS_BITS and unit is None else None
    return None


def _validate_header(file: Path, header: Any, data_len: int) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """Name -> (shape, dtype, data offset relative to the data), checked as safetensors' Metadata::validate does."""
    if not isinstance(header, dict):
        raise DeltakitError(f"{file} is corrupt: its safetensors header is not a JSON object")
    if "__metadata__" in header.duplicates:
        raise DeltakitError(f"{file} is corrupt: its safetensors header has __metadata__ twice")
    if header.duplicates:  # which entry is the tensor? (the library keeps the last one if every entry is valid)
        raise DeltakitError(f"{file} is corrupt: tensor {sorted(header.duplicates)[0]} appears twice in its "
                            "safetensors header")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise DeltakitError(f"{file} is corrupt: its __metadata__ is not an object of strings")
    entries: list[tuple[int, int, str, tuple[int, ...], str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{file} is corrupt: tensor {name}"
        if not isinstance(entry, dict):
            raise DeltakitError(f"{where}: its header entry is {short_json(entry)}, not an object")
        missing = [f for f in _TENSOR_FIELDS if f not in entry]
        if missing or entry.duplicates & set(_TENSOR_FIELDS):
            problem = f"has no {missing[0]}" if missing else f"gives {sorted(entry.duplicates & set(_TENSOR_FIELDS))[0]} twice"
            raise DeltakitError(f"{where}: its header entry {problem}")
        dtype = _dtype_name(entry["dtype"])
        if dtype is None:
            raise DeltakitError(f"{where} has unknown dtype {short_json(entry['dtype'])}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_usize(d) for d in shape):
            raise DeltakitError(f"{where}: shape {short_json(shape)} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_usize(o) for o in offsets):
            raise DeltakitError(f"{where}: data_offsets {short_json(offsets)} are not two non-negative integers")
        entries.append((offsets[0], offsets[1], name, tuple(shape), dtype))
    entries.sort(key=lambda e: (e[0], e[1]))  # as safetensors: any order in the file, contiguous once sorted
    out: dict[str, tuple[tuple[int, ...], str, int]] = {}
    covered = 0
    for begin, end, name, shape, dtype in entries:
        where = f"{file} is corrupt: tensor {name}"
        if begin != covered or end < begin:
            raise DeltakitError(
                f"{where}: invalid data_offsets [{begin}, {end}] (the previous tensor's data ends at byte {covered}; "
                "tensors must cover the data contiguously, without gaps or overlaps)")
        covered = end
        elements = 1
        for d in shape:  # in order, overflowing as a 64-bit product would
            elements *= d
            if elements > _USIZE_MAX:
                raise DeltakitError(f"{where}: shape {list(shape)} has more elements than 64 bits count")
        bits = elements * _SAFETENSORS_BITS[dtype]
        if bits > _USIZE_MAX:
            raise DeltakitError(f"{where}: shape {list(shape)} {dtype} has more bits than 64 bits count")
        if bits % 8:
            raise DeltakitError(f"{where}: shape {list(shape)} {dtype} does not end on a byte boundary")
        if bits // 8 != end - begin:
            raise DeltakitError(f"{where} has {end - begin} bytes for shape {list(shape)} {dtype} ({bits // 8} expected)")
        out[name] = (shape, dtype, begin)
    if covered > data_len:
        raise DeltakitError(f"{file} is truncated: its tensors need {covered:,} bytes of data, the file holds {data_len:,}")
    if covered < data_len:
        raise DeltakitError(f"{file} is corrupt: {data_len - covered:,} bytes after the last tensor's data "
                            "(the header does not describe the whole file)")
    return out
