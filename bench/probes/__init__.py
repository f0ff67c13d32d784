"""One-off measurements behind figures in docs/; each writes its results as JSON under ``--out``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def write_result(out: str | Path, name: str, result: Any) -> Path:
    """``result`` as ``out/name`` (JSON, the folder made if need be); returns the file's path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def existing_path(text: str) -> str:
    """An argparse type: a path that exists (else argparse's one-line error)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def shape_arg(text: str) -> tuple[int, int]:
    """An argparse type: ``MxN`` → (M, N), both positive."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 4096x4096")
    return int(parts[0]), int(parts[1])


def shapes_arg(text: str) -> list[tuple[int, int]]:
    """An argparse type: ``MxN,MxN,...`` → [(M, N), ...]."""
    return [shape_arg(item) for item in text.split(",")]


def pair_parser(doc: str, device: str = "auto") -> argparse.ArgumentParser:
    """The arguments every probe of a checkpoint pair takes: BASE FT --device --out (described by ``doc``'s first line)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("base", type=existing_path)
    parser.add_argument("ft", type=existing_path)
    parser.add_argument("--device", default=device)
    parser.add_argument("--out", required=True)
    return parser
