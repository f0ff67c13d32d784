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
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import DeltakitError

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
    single file); ``config`` is its parsed ``config.json`` when there is one.
    """

    path: Path
    root: Path
    format: str  # "safetensors" or "pickle"
    infos: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _pickles: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

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
        if self.format == "pickle":
            return self.get(name)[start:stop]
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        try:
            return self._read(info, pin and torch.cuda.is_available(), start * row_bytes, (stop - start) * row_bytes,
                              (stop - start, *info.shape[1:]))
        except (OSError, RuntimeError) as exc:
            raise DeltakitError(f"cannot read tensor {name} from {info.file}: {_first_line(exc)}") from None

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
                    fd = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        view, done = memoryview(buffer.numpy()), 0
        while done < nbytes:
            count = os.preadv(fd, [view[done:]], info.offset + skip + done)
            if count <= 0:
                raise OSError(f"unexpected end of file at byte {info.offset + skip + done}")
            done += count
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def resolve_path(path: str | os.PathLike) -> Path:
    """Turn a local path, or a hub id already in the local Hugging Face cache, into a path.

    Nothing is downloaded: a hub id resolves only when huggingface_hub is installed and
    the snapshot is in the cache.
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    text = str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(
        (".safetensors",) + PICKLE_SUFFIXES
    )
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download  # optional
        except ImportError:
            raise DeltakitError(f"{text}: no such file or folder") from None
        # Read the cache location now, not when huggingface_hub was imported.
        cache_dir = os.environ.get("HF_HUB_CACHE") or (
            os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
        try:
            return Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
        except Exception:
            raise DeltakitError(
                f"{text}: no such file or folder, and not in the local Hugging Face cache (deltakit never downloads)"
            ) from None
    raise DeltakitError(f"{text}: no such file or folder")


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
    """Open a model folder, shard index, single safetensors file or adapter folder.

    Only headers are read here; tensor data is read by :meth:`Checkpoint.get`.
    Raises :class:`DeltakitError` for anything a user can fix.
    """
    path = resolve_path(path)
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
    return Checkpoint(path=path, root=root, format=fmt, infos=infos, config=_read_json_if_any(root / "config.json"))


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
    """Pick the weight files of a folder, in the order Hugging Face looks for them."""
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
    index = _read_json_if_any(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise DeltakitError(f"{index_path} is not a shard index (no weight_map)")
    files = sorted({index_path.parent / f for f in index["weight_map"].values()})
    for file in files:
        if not file.is_file():
            raise DeltakitError(f"{index_path} names shard {file.name}, which is missing")
        if _format_of(file.name) == "pickle" and not allow_pickle:
            raise DeltakitError(_pickle_refusal(file))
    return files


def _read_json_if_any(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltakitError(f"{path} is not valid JSON: {_first_line(exc)}") from None


def _safetensors_infos(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, (shape, dtype_str, offset) in read_safetensors_header(file).items():
            dtype = _SAFETENSORS_DTYPES.get(dtype_str)
            if dtype is None:
                raise DeltakitError(f"{file}: tensor {name} has unsupported dtype {dtype_str}")
            if name in infos:
                raise DeltakitError(f"tensor {name} appears in both {infos[name].file.name} and {file.name}")
            infos[name] = TensorInfo(name, shape, dtype, file, offset)
    return infos


def read_safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """Name -> (shape, dtype string, absolute data offset) from a safetensors header, validating sizes.

    A truncated or corrupt file is refused here, before any tensor is read.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise DeltakitError(f"{file} is truncated or not a safetensors file ({size} bytes)")
            header_len = int.from_bytes(head, "little")
            if header_len <= 0 or header_len > min(size - 8, 100_000_000):
                raise DeltakitError(f"{file} is not a safetensors file, or its header is truncated")
            header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DeltakitError(f"{file} is corrupt: its safetensors header is not valid JSON") from None
    except OSError as exc:
        raise DeltakitError(f"cannot read {file}: {_first_line(exc)}") from None
    if not isinstance(header, dict):
        raise DeltakitError(f"{file} is corrupt: its safetensors header is not a JSON object")
    out: dict[str, tuple[tuple[int, ...], str, int]] = {}
    data_len = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise DeltakitError(f"{file} is corrupt: bad header entry for {name}") from None
        if end > data_len or begin > end:
            raise DeltakitError(
                f"{file} is truncated: tensor {name} ends at byte {end} of the data, which holds {data_len}"
            )
        numel = 1
        for d in shape:
            numel *= d
        element = _SAFETENSORS_DTYPES.get(dtype)
        if element is not None and numel * torch.empty((), dtype=element).element_size() != end - begin:
            raise DeltakitError(f"{file} is corrupt: tensor {name} has {end - begin} bytes for shape {shape} {dtype}")
        out[name] = (shape, dtype, 8 + header_len + begin)
    return out


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
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
