"""Warnings about a base / fine-tune pair that still runs: what it leaves out, and pairs that look wrong.

Each check reads headers and small config files only (nothing of the weights), or a finished
report's numbers, and raises a :class:`~deltakit.errors.DeltakitWarning` (one ``warning:`` line
on stderr in the CLI, even with ``--quiet``):

* :func:`warn_unpaired`: tensors the two checkpoints do not pair (another shape, one side only):
  the result covers less than the checkpoints hold;
* :func:`warn_suspicious_pair`: the same checkpoint twice; base and fine-tune swapped, as
  ``extract FT BASE`` (mergekit's order) would silently write an adapter that undoes the fine-tune.
  Signs of a swap: the base's config names the fine-tune as its origin (``_name_or_path``), the
  base's vocabulary is the larger (fine-tunes add tokens), or only the base has a chat template;
* :func:`warn_unusual_changes`: every tensor unchanged (identical checkpoints), or changes as
  large as between unrelated models — two independent draws of one distribution differ by
  ‖W₁ − W₂‖_F/‖W₁‖_F ≈ √2, where fine-tunes move their weights by a few percent.

Example::

    warn_suspicious_pair(base_ckpt, ft_ckpt, "demo/ft", "demo/base", plan)   # warns: swapped?
"""

from __future__ import annotations

import json
import os
import statistics
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from deltakit.errors import DeltakitWarning
from deltakit.io.checkpoint import Checkpoint
from deltakit.pairing import EMBEDDING_LEAF, PairPlan

UNRELATED_MEDIAN = 0.5  # median ‖ΔW‖/‖W‖ above this: not a fine-tune (unrelated models give ≈ 1.41)
SHOWN = 3


def _warn(message: str) -> None:
    warnings.warn(message, DeltakitWarning, stacklevel=3)


def floating(names: Iterable[str], *checkpoints: Checkpoint) -> list[str]:
    """The ``names`` that hold floating-point values in the checkpoint that has them: weights, not integer
    buffers such as BERT's ``embeddings.position_ids`` that one side saved and the other did not."""
    out = []
    for name in names:
        holder = next((c for c in checkpoints if name in c), None)
        if holder is None or holder.infos[name].dtype.is_floating_point:
            out.append(name)
    return out


def warn_unpaired(skipped: Sequence[Mapping[str, str]], only_base: Sequence[str], only_ft: Sequence[str]) -> None:
    """One warning when tensors are left out because the two checkpoints do not pair them (pass floating-point
    names only, :func:`floating`)."""
    left = [s for s in skipped if not s["reason"].startswith(("tied to", "not a floating-point"))]
    count = len(left) + len(only_base) + len(only_ft)
    if not count:
        return
    parts = []
    if left:
        parts.append(f"{_names([s['name'] for s in left])} ({left[0]['reason']})")
    if only_base:
        parts.append(f"{_names(only_base)} only in the base")
    if only_ft:
        parts.append(f"{_names(only_ft)} only in the fine-tune")
    _warn(f"{count} tensor{'s' if count != 1 else ''} not analysed: " + "; ".join(parts))


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def warn_suspicious_pair(base: Checkpoint, ft: Checkpoint, base_label: str | os.PathLike,
                         ft_label: str | os.PathLike, plan: PairPlan) -> None:
    """Warn when ``base`` and ``ft`` are one checkpoint, or look swapped (see the module docstring)."""
    if _same_files(base, ft):
        _warn(f"base and fine-tune are the same checkpoint ({base_label}): every ΔW is zero")
        return
    signs = list(swap_signs(base, ft, ft_label, plan))
    if signs:
        _warn(f"{base_label} may be the fine-tune and {ft_label} its base ({'; '.join(signs)}); the base comes first "
              f"(deltakit COMMAND BASE FT), else ΔW has the wrong sign and an extracted adapter undoes the fine-tune")


def _same_files(base: Checkpoint, ft: Checkpoint) -> bool:
    return _same_path(base.path, ft.path)


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def swap_signs(base: Checkpoint, ft: Checkpoint, ft_label: str | os.PathLike, plan: PairPlan) -> Iterable[str]:
    """Why ``base`` looks like the fine-tune of ``ft``, one phrase per sign."""
    origin = str((base.config or {}).get("_name_or_path") or "")
    ft_name = Path(str(ft_label).split("@", 1)[0].rstrip("/")).name
    base_name = Path(str(base.path)).name
    if origin and ft_name and Path(origin.rstrip("/")).name == ft_name and ft_name != base_name:
        yield f"the base's config.json says it was made from {origin}"
    for skipped in plan.skipped:
        shapes = _shapes(skipped.reason)
        if shapes and EMBEDDING_LEAF.search(skipped.name):
            (base_rows, base_cols), (ft_rows, ft_cols) = shapes
            if base_cols == ft_cols and base_rows > ft_rows:
                yield (f"the base's {skipped.name} has {base_rows} rows, the fine-tune's {ft_rows}: fine-tunes add "
                       "tokens, they do not remove them")
                break
    # Only where the fine-tune has the file: a checkpoint saved without its tokenizer says nothing.
    if (ft.root / "tokenizer_config.json").is_file() and _chat_template(base.root) and not _chat_template(ft.root):
        yield "only the base has a chat template"
    if (ft.root / "generation_config.json").is_file() and _sampling(base.root) and not _sampling(ft.root):
        yield "only the base's generation_config.json sets sampling (chat fine-tunes do)"


def _shapes(reason: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The two 2-D shapes of a ``shape mismatch: base (a, b) vs fine-tune (c, d)`` reason."""
    if not reason.startswith("shape mismatch"):
        return None
    try:
        base_text, ft_text = reason.split("base ", 1)[1].split(" vs fine-tune ")
        shapes = tuple(tuple(int(x) for x in text.strip("() ").split(",") if x.strip()) for text in (base_text, ft_text))
    except (IndexError, ValueError):
        return None
    return shapes if all(len(shape) == 2 for shape in shapes) else None  # type: ignore[return-value]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _chat_template(folder: Path) -> bool:
    return bool(_read(folder / "tokenizer_config.json").get("chat_template")) or (folder / "chat_template.jinja").is_file()


def _sampling(folder: Path) -> bool:
    config = _read(folder / "generation_config.json")
    return bool(config.get("do_sample")) or "temperature" in config or "top_p" in config


def warn_unusual_changes(rel_deltas: Sequence[float | None], changed: int, tensors: int,
                         base_label: str, ft_label: str) -> None:
    """After a run: every tensor unchanged, or a median relative change no fine-tune makes.

    ``rel_deltas``: ‖ΔW‖_F/‖W_base‖_F of the changed matrices (None for a zero base); ``changed``
    of ``tensors`` compared.
    """
    if tensors and not changed:
        if _same_path(base_label, ft_label):
            return  # said when the pair was opened
        _warn(f"no tensor differs: {ft_label} holds the same weights as {base_label} in every tensor compared")
        return
    known = [r for r in rel_deltas if r is not None]
    if known and statistics.median(known) > UNRELATED_MEDIAN:
        _warn(f"the median relative change ‖ΔW‖/‖W‖ is {statistics.median(known):.3g}: two unrelated models of "
              f"one architecture give about 1.41 (√2), fine-tunes a few percent; is {ft_label} a fine-tune of "
              f"{base_label}?")
