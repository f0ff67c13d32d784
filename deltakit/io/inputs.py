"""Inputs are never written: an output path that is, holds or lies inside any input is refused.

Compared as real paths and as (device, inode) pairs, so ``B/``, ``B/../B``, a symbolic link to B
and a bind mount of B are all B; with or without ``force``. An input's footprint is what a command
reads of it (:func:`input_footprint`): a folder whole, a file with the files it names, a Hub id
as its repository's folder in the local cache.

Example::

    refuse_input_overlap("merged", [input_footprint("base"), input_footprint("adapter")])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from deltakit.errors import DeltakitError
from deltakit.io.hub import hub_cache_folder, parse_hub_id
from deltakit.io.paths import read_regular_bytes


@dataclass(frozen=True)
class InputFootprint:
    """What a command reads of one input: ``label`` (as the user gave it) and the real paths it covers.

    A folder covers everything under it; a file covers itself (and an index the shards it names).
    """

    label: str
    paths: tuple[Path, ...]


def input_footprint(spec: str | os.PathLike, label: str | None = None) -> InputFootprint:
    """The real paths a command reads when given ``spec`` (a local path or a Hub id).

    A local folder is the folder; a file is the file, the files it names (an index's shards,
    inside its folder) and the non-weight files beside it that deltakit reads or copies. A Hub
    id is its repository's folder in the local cache (what it resolves to, or would).
    """
    text = os.fspath(spec)
    label = label or text
    local = Path(text).expanduser()
    if os.path.lexists(local):
        return InputFootprint(label, tuple(_local_paths(local)))
    hub_id = parse_hub_id(text)
    return InputFootprint(label, (hub_cache_folder(hub_id),) if hub_id is not None else ())


INDEX_BYTES = 64 * 1024**2  # a shard index names each tensor once: megabytes even for the largest models
_BESIDE_A_FILE = ("config.json", "adapter_config.json", "generation_config.json")


def _local_paths(path: Path) -> list[Path]:
    real = Path(os.path.realpath(path))
    if real.is_dir():
        return [real]
    paths = [real]
    if real.name.endswith(".index.json"):
        paths += _index_shards(real)
    paths += [real.parent / name for name in _BESIDE_A_FILE if (real.parent / name).exists()]
    return paths


def _index_shards(index: Path) -> list[Path]:
    """The shard files an index names, as far as it can be read (a broken index is refused later, when read)."""
    try:
        weight_map = json.loads(read_regular_bytes(index, INDEX_BYTES)).get("weight_map", {})
        names = {value for value in weight_map.values() if isinstance(value, str)}
    except (OSError, ValueError, AttributeError, RecursionError, DeltakitError):
        return []
    return [Path(os.path.realpath(index.parent / name)) for name in sorted(names) if name]


def refuse_input_overlap(output: str | os.PathLike, inputs: Iterable[InputFootprint]) -> None:
    """Refuse (one :class:`DeltakitError` line) an ``output`` that is, holds or lies inside an input.

    Compared as real paths (trailing slashes, ``..`` and links resolved, the output's own last
    component included if it is a link) and, where both exist, as (device, inode) pairs of the
    output, its folders and the inputs. Applies with or without ``force``.
    """
    out = Path(output).expanduser()
    candidates = {_real_output(out), Path(os.path.realpath(out))}
    out_ids = _ids_of_self_and_parents(out)
    for footprint in inputs:
        for path in footprint.paths:
            relation = _relation(candidates, out_ids, out, path)
            if relation:
                raise DeltakitError(
                    f"output {output} {relation} the input {footprint.label}; deltakit never writes over its inputs, "
                    "even with force=True (--force): choose another output path")


def _real_output(out: Path) -> Path:
    """The output's real location: its folder's real path plus its own name (a link there is replaced, not followed)."""
    parent = out.parent if str(out.parent) else Path(".")
    return Path(os.path.realpath(parent)) / out.name if out.name not in ("", ".", "..") else Path(os.path.realpath(out))


def _ids_of_self_and_parents(path: Path) -> set[tuple[int, int]]:
    ids = set()
    current = Path(os.path.abspath(path))
    while True:
        try:
            st = os.stat(current)
            ids.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        if current.parent == current:
            return ids
        current = current.parent


def _relation(candidates: set[Path], out_ids: set[tuple[int, int]], out: Path, input_path: Path) -> str | None:
    """How the output relates to one input path: "is", "holds", "lies inside", or None."""
    for real in candidates:
        if real == input_path:
            return "is"
        if _under(input_path, real):
            return "holds"
        if _under(real, input_path):
            return "lies inside"
    try:
        input_id = os.stat(input_path)
    except OSError:
        return None
    if (input_id.st_dev, input_id.st_ino) in out_ids:  # the same file or folder by another path (a bind mount)
        return "is" if _same_file(out, input_path) else "lies inside"
    if os.path.exists(out) and os.path.isdir(out):
        out_stat = os.stat(out)
        if (out_stat.st_dev, out_stat.st_ino) in _ids_of_self_and_parents(input_path):
            return "holds"
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _under(path: Path, folder: Path) -> bool:
    return str(path).startswith(str(folder).rstrip(os.sep) + os.sep)


def footprints(specs: Sequence[tuple[str, str | os.PathLike | None]]) -> list[InputFootprint]:
    """:func:`input_footprint` of each (label, path) given; None paths are passed over."""
    return [input_footprint(path, f"{label} {os.fspath(path)}" if label else None)
            for label, path in specs if path is not None]
