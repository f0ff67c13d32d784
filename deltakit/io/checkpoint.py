"""Open a checkpoint and read its tensors lazily, one at a time, in their stored dtype.

A checkpoint is a Hugging Face model folder (``model.safetensors`` or shards plus
``model.safetensors.index.json``), a diffusers component folder (``unet/``, ``transformer/``:
``diffusion_pytorch_model.safetensors`` or its shards; of a pipeline folder, with
``model_index.json``, the component is named), a single ``.safetensors`` file, a PEFT adapter
folder (its raw ``lora_A`` / ``lora_B`` tensors), or, only when asked for, a PyTorch
pickle (``.bin`` / ``.pt``) loaded with ``torch.load(weights_only=True)``.

Example::

    ckpt = open_checkpoint("path/to/model")
    for name in ckpt.keys():
        w = ckpt.get(name)          # one tensor in memory at a time
"""

from __future__ import annotations

import os
import pickle
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import DeltakitError
from deltakit.io.filenames import (
    ALLOW_PICKLE_FLAG, DIFFUSERS_WEIGHTS_PREFIX, PICKLE_INDEX, PICKLE_SUFFIXES, PIPELINE_INDEX, SAFETENSORS_INDEX,
)
from deltakit.io.hub import resolve_path
from deltakit.io.json_files import read_json, validate_model_config, validate_shard_index
from deltakit.io.paths import contained_file, open_regular, refuse_escaping_link
from deltakit.io.quantized import QuantizedTensor, dequantize, logical_tensors, quantization_step
from deltakit.io.safetensors_header import Stamp, file_stamp, stamped_header
from deltakit.io.tensor_info import SAFETENSORS_DTYPES, TensorInfo

_OPEN_LOCK = threading.Lock()


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
    stamps: dict[Path, Stamp] = field(default_factory=dict, repr=False)  # each file as its header was read

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

    def metas(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor: what pairing needs, from the headers."""
        return {name: (info.shape, info.dtype) for name, info in self.infos.items()}

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
                        _check_unchanged(info, fd, self.stamps)
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
        _check_unchanged(info, fd, self.stamps)
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


def _check_unchanged(info: TensorInfo, fd: int, stamps: dict[Path, Stamp]) -> None:
    """Refuse to go on with a file that is no longer the one whose header was read (rewritten, replaced)."""
    stamp = stamps.get(Path(info.file))
    if stamp is None:
        return
    now = file_stamp(os.fstat(fd))
    if now != stamp:
        what = (f"now {now[2]:,} bytes, {stamp[2]:,} when opened" if now[2] != stamp[2]
                else "replaced" if now[:2] != stamp[:2] else "modified")
        raise DeltakitError(f"{info.file} changed while deltakit was reading it ({what}; at tensor {info.name}); "
                            "rerun once it is complete")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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
    infos, stamps = (_pickle_infos(files), {}) if fmt == "pickle" else _safetensors_infos(files)
    if not infos:
        raise DeltakitError(f"{path} holds no tensors")
    config = read_model_config(root / "config.json")
    infos, quantized = logical_tensors(infos, config, path)
    return Checkpoint(path=path, root=root, format=fmt, infos=infos, config=config, quantized=quantized,
                      hub_id=hub_id, stamps=stamps)


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
    for index in (SAFETENSORS_INDEX, f"{DIFFUSERS_WEIGHTS_PREFIX}.safetensors.index.json"):
        if (folder / index).is_file():
            return _files_from_index(folder / index, allow_pickle), "safetensors"
    for name in ("model.safetensors", "adapter_model.safetensors", f"{DIFFUSERS_WEIGHTS_PREFIX}.safetensors"):
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
    if (folder / PIPELINE_INDEX).is_file():
        raise DeltakitError(_pipeline_refusal(folder))
    raise DeltakitError(f"no weights found in {folder} (looked for {SAFETENSORS_INDEX}, *.safetensors, *.bin)")


def _pipeline_refusal(folder: Path) -> str:
    """A diffusers pipeline folder holds its weights per component: say which components to name."""
    try:
        index = read_json(folder / PIPELINE_INDEX)
    except DeltakitError:
        index = {}
    names = sorted(name for name in (index if isinstance(index, dict) else {})
                   if not name.startswith("_") and (folder / name).is_dir() and any((folder / name).glob("*.safetensors")))
    shown = ", ".join(str(folder / name) for name in names[:4]) or "its component folders"
    return (f"{folder} is a diffusers pipeline ({PIPELINE_INDEX}); its weights are per component: name the one "
            f"to read, e.g. {shown}")


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


TORCH_DIM_MAX = 2**63 - 1  # torch sizes are int64


def _safetensors_infos(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[Path, Stamp]]:
    """Every tensor of ``files`` from their headers, and each file's stamp when its header was read."""
    infos: dict[str, TensorInfo] = {}
    stamps: dict[Path, Stamp] = {}
    for file in files:
        entries, stamps[Path(file)] = stamped_header(file)
        for name, (shape, dtype_str, offset) in entries.items():
            dtype = SAFETENSORS_DTYPES.get(dtype_str)
            if dtype is None:
                raise DeltakitError(f"{file}: tensor {name} has unsupported dtype {dtype_str}")
            if name in infos:
                raise DeltakitError(f"tensor {name} appears in both {infos[name].file.name} and {file.name}")
            if any(d > TORCH_DIM_MAX for d in shape):  # valid safetensors when another dimension is 0
                raise DeltakitError(f"{file}: tensor {name} has shape {list(shape)}, with a dimension beyond "
                                    f"{TORCH_DIM_MAX:,} (2^63 - 1), the largest torch can hold")
            infos[name] = TensorInfo(name, shape, dtype, file, offset)
    return infos, stamps


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
