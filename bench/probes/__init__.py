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


def pair_parser(doc: str, device: str = "auto") -> argparse.ArgumentParser:
    """The arguments every probe of a checkpoint pair takes: BASE FT --device --out (described by ``doc``'s first line)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("ft")
    parser.add_argument("--device", default=device)
    parser.add_argument("--out", required=True)
    return parser
