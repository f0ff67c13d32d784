"""notebooks/01_quickstart.ipynb runs end to end on the CPU and shows the demo pair's known answers."""

import re
from pathlib import Path

import nbformat

from deltakit.demo import DEMO_LORA_RANK

from conftest import run_notebook

REPO = Path(__file__).resolve().parents[1]


def text_of(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart_notebook(tmp_path):
    """Run as a reader runs it (no DELTAKIT_NB_OUT): its files go to a temporary folder that its last cell
    removes, so nothing named deltakit-quickstart-* is left in TMPDIR."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    notebook = run_notebook(REPO / "notebooks" / "01_quickstart.ipynb", tmp_path,
                            {"DELTAKIT_NB_OUT": "", "TMPDIR": str(temporary)})
    text = text_of(notebook)
    assert "['README.md', 'adapter_config.json', 'adapter_model.safetensors']" in text
    assert re.search(r"removed .*deltakit-quickstart-\w+: True", text), text[-500:]
    assert not list(temporary.glob("deltakit-quickstart-*"))
    q_lines = [line for line in text.splitlines() if "self_attn.q_proj.weight" in line and "rank=" in line]
    assert q_lines and all(f"rank={DEMO_LORA_RANK:3d}" in line for line in q_lines[:1]), q_lines
    assert "k_proj.weight     rank=  0" in text
    assert "unmerge vs the original base: max |Δ|" in text
    assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
