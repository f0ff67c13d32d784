"""The tokens a model is run on for calibration: ``--calibration PATH``.

PATH is either a ``.safetensors`` file holding ``input_ids``, an integer tensor [batch, seq] of
token ids, or a UTF-8 text file, tokenised with the model's own tokenizer (its folder's tokenizer
files) and cut into sequences of ``sequence_length`` tokens, each opened by the tokenizer's BOS
token when it has one. Nothing is padded: sequences of one length are run together, a shorter
last one on its own, so every position of every sequence is a calibration token.

Example::

    tokens = read_calibration("calib.safetensors", "ft-folder", vocab_size=32000)
    tokens.tokens, [batch.shape for batch in tokens.batches]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.errors import DeltakitError
from deltakit.io.paths import read_regular_bytes

SEQUENCE_LENGTH = 512  # tokens per sequence cut from a text file
BATCH_TOKENS = 4096  # tokens per forward pass (sequences of one length are stacked up to this)
MAX_FILE_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model")


@dataclass(frozen=True)
class CalibrationTokens:
    """Token ids to run a model on: ``batches`` of [sequences, length] int64 tensors on the CPU."""

    path: str
    batches: tuple[torch.Tensor, ...]

    @property
    def tokens(self) -> int:
        """How many positions the batches hold (each is one calibration token)."""
        return sum(int(batch.numel()) for batch in self.batches)

    @property
    def sequences(self) -> int:
        return sum(int(batch.shape[0]) for batch in self.batches)


def read_calibration(path: str | os.PathLike, model_folder: str | os.PathLike | None, vocab_size: int | None,
                     sequence_length: int = SEQUENCE_LENGTH, batch_tokens: int = BATCH_TOKENS) -> CalibrationTokens:
    """The calibration tokens of ``path`` (module docstring), checked against the model's vocabulary.

    ``model_folder`` holds the tokenizer a text file needs; ``vocab_size`` (the model config's)
    bounds the ids. Raises :class:`DeltakitError` for an empty or unreadable file, a text file
    without a tokenizer, a tensor file without an integer 2-D ``input_ids``, or ids outside the vocabulary.
    """
    where = Path(path)
    try:
        data = read_regular_bytes(where, MAX_FILE_BYTES)
    except OSError as exc:
        raise DeltakitError(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise DeltakitError(f"calibration file {path} is empty; give a text file or a .safetensors file "
                            "with input_ids [batch, seq]")
    if where.suffix == ".safetensors":
        sequences = [_stored_ids(data, path)]
    else:
        sequences = _tokenised(data, path, model_folder, sequence_length)
    ids = [s for s in sequences if s.numel()]
    if not ids:
        raise DeltakitError(f"calibration file {path} gives no tokens")
    check_vocabulary(ids, vocab_size, path)
    return CalibrationTokens(str(path), tuple(batched(ids, batch_tokens)))


def _stored_ids(data: bytes, path: str | os.PathLike) -> torch.Tensor:
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error types for a corrupt header
        raise DeltakitError(f"calibration file {path} is not a readable safetensors file ({first_line(exc)})") from None
    ids = tensors.get("input_ids")
    if ids is None:
        found = ", ".join(sorted(tensors)) or "no tensors"
        raise DeltakitError(f"calibration file {path} has no input_ids tensor (found {found}); "
                            "store the token ids as input_ids [batch, seq]")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DeltakitError(f"calibration file {path}: input_ids is {str(ids.dtype).removeprefix('torch.')}; "
                            "token ids must be integers")
    if ids.ndim != 2 or ids.numel() == 0:
        raise DeltakitError(f"calibration file {path}: input_ids has shape {tuple(ids.shape)}; "
                            "expected [batch, seq] with at least one token")
    return ids.to(torch.int64)


def _tokenised(data: bytes, path: str | os.PathLike, model_folder: str | os.PathLike | None,
               sequence_length: int) -> list[torch.Tensor]:
    """Rows of at most ``sequence_length`` ids of the text, each opened by BOS when the tokenizer has one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeltakitError(f"calibration file {path} is neither a .safetensors file nor UTF-8 text "
                            f"(byte {exc.start} does not decode)") from None
    tokenizer = load_tokenizer(model_folder, path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    step = sequence_length - 1 if bos is not None else sequence_length
    rows = []
    for start in range(0, len(ids), step):
        row = ids[start:start + step]
        rows.append(torch.tensor(([bos] if bos is not None else []) + row, dtype=torch.int64)[None])
    return rows


def load_tokenizer(model_folder: str | os.PathLike | None, path: str | os.PathLike):
    """The tokenizer saved with the model; refused (one line) when the folder has none."""
    folder = Path(model_folder) if model_folder is not None else None
    if folder is None or not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DeltakitError(f"calibration file {path} is text, but {model_folder} has no tokenizer "
                            f"({', '.join(TOKENIZER_FILES[:3])}, ...) to tokenise it with; give token ids "
                            "instead: a .safetensors file with input_ids [batch, seq]")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except ImportError:
        raise DeltakitError("tokenising a text calibration file needs transformers (pip install transformers)") from None
    except Exception as exc:  # noqa: BLE001 -- transformers raises many types for a broken tokenizer
        raise DeltakitError(f"cannot load the tokenizer of {model_folder} for {path}: {first_line(exc)}") from None


def check_vocabulary(sequences: list[torch.Tensor], vocab_size: int | None, path: str | os.PathLike) -> None:
    """Every id in [0, vocab_size); the first one outside is named."""
    if vocab_size is None:
        return
    for rows in sequences:
        bad = (rows < 0) | (rows >= vocab_size)
        if bool(bad.any()):
            position = tuple(int(i) for i in bad.nonzero()[0])
            raise DeltakitError(f"calibration file {path}: token id {int(rows[position])} at {list(position)} is "
                                f"outside the model's vocabulary (0..{vocab_size - 1})")


def batched(sequences: list[torch.Tensor], batch_tokens: int) -> list[torch.Tensor]:
    """Rows of equal length stacked into batches of about ``batch_tokens`` tokens (at least one row each)."""
    rows = [row for block in sequences for row in block]
    batches: list[torch.Tensor] = []
    start = 0
    while start < len(rows):
        length = rows[start].numel()
        size = max(1, batch_tokens // max(1, length))
        stop = start
        while stop < len(rows) and stop - start < size and rows[stop].numel() == length:
            stop += 1
        batches.append(torch.stack(rows[start:stop]))
        start = stop
    return batches


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
