"""One-off measurements behind figures in docs/; each writes its results as JSON under ``--out``."""

from __future__ import annotations

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
