"""Open a checkpoint and read its tensors lazily, one at a time, in their stored dtype.

A checkpoint is a Hugging Face model folder (``model.safetensors`` or shards plus
``model.safetensors.index.json``), a single ``.safetensors`` file, a PEFT adapter
folder (its raw ``lora_A`` / ``lora_B`` tensors), or, only when asked for, a PyTorch
pickle (``.bin`` / ``.pt``) loaded with ``torch.load(weights_only=True)``.

Example::

    ckpt = open_checkpoint("path/to/model")
    for name in ckpt.keys():
        w = ckpt.get(name)          # one tensor in memory at a time
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import DeltakitError
from deltakit.io.json_files import (MAX_NESTING, nesting_depth, read_json, short_json,
                                    validate_model_config, validate_shard_index)
from deltakit.io.paths import contained_file, open_regular, refuse_escaping_link
from deltakit.io.quantized import QuantizedTensor, dequantize, logical_tensors, quantization_step

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ADAPTER_CONFIG = "adapter_config.json"
ALLOW_PICKLE_FLAG = "allow_pickle=True (--allow-pickle)"  # Python and CLI spelling; the CLI keeps the flag

# safetensors dtype strings -> torch dtypes (what the header says, before any read).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}

_OPEN_LOCK = threading.Lock()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1  # byte offset of the data in a safetensors file; -1 for pickles

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Checkpoint:
    """A lazily read set of named tensors; see :func:`open_checkpoint`.

    ``root`` is the folder holding config / tokenizer files (the file's folder for a
    single file); ``config`` is its parsed ``config.json`` when there is one; ``hub_id``
    is the Hub id it was opened by (its snapshot folder is ``path``).
    """

    path: Path
    root: Path
    format: str  # "safetensors" or "pickle"
    infos: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)  # logical name -> how it is stored
    hub_id: str | None = None  # "org/name[@revision]" when opened from the Hub
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _pickles: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _stamps: dict[Path, tuple[int, int, int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # What each file was when its header was read; a read that finds it changed stops.
        for file in {info.file for info in self.infos.values()}:
            if Path(file) in _FILE_STAMPS:
                self._stamps.setdefault(Path(file), _FILE_STAMPS[Path(file)])

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})

    def get(self, name: str, device: str | torch.device = "cpu", pin: bool = False) -> torch.Tensor:
        """Read one tensor, in its stored dtype, onto ``device``.

        ``pin`` reads into page-locked host memory, from which a GPU copies asynchronously.
        """
        info = self.infos[name]
        if name in self.quantized:
            return self.dequantized(name, device, None, pin)
        try:
            if self.format == "pickle":
                tensor = self._pickle_dict(info.file)[name]
            else:
                tensor = self._read(info, pin and torch.cuda.is_available())
        except (OSError, RuntimeError) as exc:
            raise DeltakitError(f"cannot read tensor {name} from {info.file}: {_first_line(exc)}") from None
        if tuple(tensor.shape) != info.shape:
            raise DeltakitError(f"tensor {name} in {info.file} has shape {tuple(tensor.shape)}, header says {info.shape}")
        return tensor.to(device) if str(device) != "cpu" else tensor

    def get_rows(self, name: str, start: int, stop: int, pin: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of one tensor, reading only their bytes.

        Lets a command hold a slice of a tensor larger than it wants in host memory.
        """
        info = self.infos[name]
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"rows {start}:{stop} of {name} {info.shape}")
        if name in self.quantized:
            return self.dequantized(name, "cpu", (start, stop), pin)
        return self.read_stored(info, start, stop, pin)

    def read_stored(self, info: TensorInfo, start: int | None = None, stop: int | None = None,
                    pin: bool = False) -> torch.Tensor:
        """Dim-0 rows ``start:stop`` (None: all) of a tensor as stored, hidden scale companions included.

        For a 3-D tensor (experts, a, b) the rows are experts: one expert's slice is contiguous.
        """
        name = info.name
        if self.format == "pickle":
            tensor = self._pickle_dict(info.file)[name]
            return tensor if start is None else tensor[start:stop]
        if start is None or stop is None:
            start, stop, whole = 0, info.shape[0] if info.shape else 0, True
        else:
            whole = False
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        try:
            if whole or not info.shape:
                return self._read(info, pin and torch.cuda.is_available())
            return self._read(info, pin and torch.cuda.is_available(), start * row_bytes, (stop - start) * row_bytes,
                              (stop - start, *info.shape[1:]))
        except (OSError, RuntimeError) as exc:
            raise DeltakitError(f"cannot read tensor {name} from {info.file}: {_first_line(exc)}") from None

    def dequantized(self, name: str, device: str | torch.device, rows: tuple[int, int] | None,
                     pin: bool) -> torch.Tensor:
        """A quantized tensor (or its dim-0 ``rows``) dequantized on ``device`` (see deltakit.io.quantized)."""
        read = lambda info, start, stop, pin_: self.read_stored(info, start, stop, pin_)  # noqa: E731
        return dequantize(self.quantized[name], read, device, rows, pin)

    def quantization_step(self, name: str, device: str | torch.device = "cpu",
                          rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Per-entry quantization step of a dequantized tensor (fp32, its shape), None if not quantized.

        For a noise model: the rounding of the quantized base is part of what a fine-tune that
        started from its dequantized weights changed (docs/metrics.md).
        """
        if name not in self.quantized:
            return None
        read = lambda info, start, stop, pin_: self.read_stored(info, start, stop, pin_)  # noqa: E731
        return quantization_step(self.quantized[name], read, device, rows)

    def _read(self, info: TensorInfo, pin: bool = False, skip: int = 0, nbytes: int | None = None,
              shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor's bytes (or ``nbytes`` of them from byte ``skip``) with pread into fresh memory.

        Plain reads rather than a memory map: mapped pages of a 100 GB checkpoint would stay
        resident in this process, while read buffers are freed tensor by tensor.
        """
        nbytes = info.nbytes if nbytes is None else nbytes
        shape = info.shape if shape is None else shape
        fd = self._handles.get(info.file)
        if fd is None:
            with _OPEN_LOCK:  # several reader threads: one descriptor per file
                fd = self._handles.get(info.file)
                if fd is None:
                    fd = open_regular(info.file)
                    try:
                        _check_unchanged(info, fd, self._stamps)
                    except BaseException:
                        os.close(fd)
                        raise
                    self._handles[info.file] = fd
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        view, done = memoryview(buffer.numpy()), 0
        while done < nbytes:
            count = os.preadv(fd, [view[done:]], info.offset + skip + done)
            if count <= 0:
                raise DeltakitError(
                    f"{info.file} ended at byte {info.offset + skip + done:,} while tensor {info.name} was being read: "
                    "it was truncated or replaced after deltakit opened it")
            done += count
        _check_unchanged(info, fd, self._stamps)
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        return buffer.view(info.dtype).reshape(shape)

    def _pickle_dict(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickles:
            self._pickles[file] = _load_pickle(file)
        return self._pickles[file]

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._pickles.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_unchanged(info: TensorInfo, fd: int, stamps: dict[Path, tuple[int, int, int, int]]) -> None:
    """Refuse to go on with a file that is no longer the one whose header was read (rewritten, replaced)."""
    stamp = stamps.get(Path(info.file))
    if stamp is None:
        return
    now = _stamp(os.fstat(fd))
    if now != stamp:
        what = (f"now {now[2]:,} bytes, {stamp[2]:,} when opened" if now[2] != stamp[2]
                else "replaced" if now[:2] != stamp[:2] else "modified")
        raise DeltakitError(f"{info.file} changed while deltakit was reading it ({what}; at tensor {info.name}); "
                            "rerun once it is complete")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def resolve_path(path: str | os.PathLike, allow_pickle: bool = False, weights: bool = True) -> Path:
    """Turn a local path, or a Hub id ``org/name[@revision]``, into a path on this machine.

    A local file or folder wins over a hub id of the same name. A hub id resolves to its
    snapshot in the Hugging Face cache, downloading the configs and (with ``weights``) the
    weight files a command reads; see :mod:`deltakit.io.hub` (offline: the cache only).
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    from deltakit.io.hub import parse_hub_id, resolve_hub_id

    hub_id = parse_hub_id(path)
    if hub_id is None:
        raise DeltakitError(f"{path}: no such file or folder")
    return resolve_hub_id(hub_id, allow_pickle=allow_pickle, weights=weights)


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
    """Open a model folder, shard index, single safetensors file or adapter folder.

    Only headers are read here; tensor data is read by :meth:`Checkpoint.get`.
    Raises :class:`DeltakitError` for anything a user can fix.
    """
    given = os.fspath(path)
    path = resolve_path(path, allow_pickle=allow_pickle)
    hub_id = None if Path(given).expanduser().exists() else given
    if path.is_dir():
        root = path
        files, fmt = _weight_files_in_folder(path, allow_pickle)
    else:
        root = path.parent
        if path.name.endswith(".index.json"):
            files, fmt = _files_from_index(path, allow_pickle), _format_of(path.name.removesuffix(".index.json"))
        else:
            fmt = _format_of(path.name)
            files = [path]
        if fmt == "pickle" and not allow_pickle:
            raise DeltakitError(_pickle_refusal(path))
    infos = _pickle_infos(files) if fmt == "pickle" else _safetensors_infos(files)
    if not infos:
        raise DeltakitError(f"{path} holds no tensors")
    config = read_model_config(root / "config.json")
    infos, quantized = logical_tensors(infos, config, path)
    return Checkpoint(path=path, root=root, format=fmt, infos=infos, config=config, quantized=quantized,
                      hub_id=hub_id)


def _format_of(filename: str) -> str:
    if filename.endswith(".safetensors"):
        return "safetensors"
    if filename.endswith(PICKLE_SUFFIXES):
        return "pickle"
    raise DeltakitError(f"{filename}: not a checkpoint file (expected .safetensors, or .bin/.pt with {ALLOW_PICKLE_FLAG})")


def _pickle_refusal(path: Path) -> str:
    return (
        f"{path} is a PyTorch pickle, which can run code when loaded; deltakit reads safetensors by default. "
        f"Pass {ALLOW_PICKLE_FLAG} to load it with torch.load(weights_only=True)"
    )


def _weight_files_in_folder(folder: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    """Pick the weight files of a folder, in the order Hugging Face looks for them; each must lie inside it."""
    files, fmt = _weight_files_named_in(folder, allow_pickle)
    for file in files:
        refuse_escaping_link(file, folder)
    return files, fmt


def _weight_files_named_in(folder: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    if (folder / SAFETENSORS_INDEX).is_file():
        return _files_from_index(folder / SAFETENSORS_INDEX, allow_pickle), "safetensors"
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / name).is_file():
            return [folder / name], "safetensors"
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose, "safetensors"
    pickles = [folder / PICKLE_INDEX] if (folder / PICKLE_INDEX).is_file() else []
    pickles += sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise DeltakitError(_pickle_refusal(pickles[0]))
        if pickles[0].name == PICKLE_INDEX:
            return _files_from_index(pickles[0], allow_pickle), "pickle"
        return pickles, "pickle"
    raise DeltakitError(f"no weights found in {folder} (looked for {SAFETENSORS_INDEX}, *.safetensors, *.bin)")


def _files_from_index(index_path: Path, allow_pickle: bool) -> list[Path]:
    """The shard files an index names, each inside the index's folder, present and of a format that may be read."""
    weight_map = validate_shard_index(read_json(index_path), index_path)["weight_map"]
    files = [contained_file(index_path.parent, name, index_path) for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise DeltakitError(f"{index_path} names shard {file.name}, which is missing")
        if _format_of(file.name) == "pickle" and not allow_pickle:
            raise DeltakitError(_pickle_refusal(file))
    return files


def read_model_config(path: Path) -> dict[str, Any] | None:
    """A model's validated ``config.json`` (see :func:`deltakit.io.json_files.validate_model_config`), None if absent.

    A FIFO or device of that name is refused rather than read (see :func:`read_json`).
    """
    if not os.path.lexists(path):
        return None
    refuse_escaping_link(path, path.parent)
    return validate_model_config(read_json(path), path)


def _safetensors_infos(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, (shape, dtype_str, offset) in read_safetensors_header(file).items():
            dtype = _SAFETENSORS_DTYPES.get(dtype_str)
            if dtype is None:
                raise DeltakitError(f"{file}: tensor {name} has unsupported dtype {dtype_str}")
            if name in infos:
                raise DeltakitError(f"tensor {name} appears in both {infos[name].file.name} and {file.name}")
            if any(d > _TORCH_DIM_MAX for d in shape):  # valid safetensors when another dimension is 0
                raise DeltakitError(f"{file}: tensor {name} has shape {list(shape)}, with a dimension beyond "
                                    f"{_TORCH_DIM_MAX:,} (2^63 - 1), the largest torch can hold")
            infos[name] = TensorInfo(name, shape, dtype, file, offset)
    return infos


# Bits per element of every dtype the safetensors format knows (0.8: its `Dtype` enum). The header
# is validated against all of them, as the safetensors library does; which ones deltakit can read
# is decided after (see _SAFETENSORS_DTYPES).
_SAFETENSORS_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
_USIZE_MAX = 2**64 - 1
_TORCH_DIM_MAX = 2**63 - 1  # torch sizes are int64
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")

# (device, inode, size, mtime) of each safetensors file when its header was read: a read that
# finds the file different stops, rather than returning bytes the header does not describe.
_FILE_STAMPS: dict[Path, tuple[int, int, int, int]] = {}


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """Name -> (shape, dtype string, absolute data offset) from a safetensors header, validated.

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
    _FILE_STAMPS[Path(file)] = _stamp(st)
    return {name: (shape, dtype, 8 + header_len + begin) for name, (shape, dtype, begin) in out.items()}


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


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    os.close(open_regular(file))  # a FIFO would block torch.load
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DeltakitError(f"cannot load {file} with weights_only=True: {_first_line(exc)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DeltakitError(f"{file} does not hold a flat dict of tensors")
    return obj


def _pickle_infos(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, tensor in _load_pickle(file).items():
            infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)
    return infos
