"""One report shape: `rank`, `intruders`, `compare` and `trajectory` share their metadata
(deltakit.analyses.meta) in JSON and in their tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import deltakit
from deltakit import SpectralOptions
from deltakit.analyses.compare import compare
from deltakit.report import render_compare, render_intruders, render_report, render_trajectory
from deltakit.analyses.trajectory import trajectory

REPO = Path(__file__).resolve().parents[1]
CPU = SpectralOptions(device="cpu")
MISMATCH = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base file and two fine-tune folders: rank-2 updates, one matrix of a different shape in
    the first fine-tune (skipped everywhere), one tensor only in the base, one only in the fine-tunes."""
    root = tmp_path_factory.mktemp("meta")
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (24, 16), "model.layers.0.mlp.down_proj.weight": (16, 32),
              MISMATCH: (32, 16)}
    base = {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}
    base["model.only_in_base.weight"] = torch.randn(4, 4, generator=g)
    save_file(base, str(root / "base.safetensors"))
    fts = []
    for step in (1, 2):
        ft = {name: w + torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
              for name, w in base.items() if name in shapes}
        ft[MISMATCH] = torch.randn(32, 18, generator=g) if step == 1 else ft[MISMATCH]
        ft["model.only_in_ft.weight"] = torch.randn(4, 4, generator=g)
        folder = root / f"checkpoint-{step}"
        folder.mkdir()
        save_file(ft, str(folder / "model.safetensors"))
        fts.append(folder)
    return root / "base.safetensors", fts


@pytest.fixture(scope="module")
def reports(checkpoints):
    """(report, its table) of each of the four commands on the same inputs."""
    base, (ft_a, ft_b) = checkpoints
    rank = deltakit.rank(base, ft_a, energy=(0.5, 0.9), options=CPU)
    intruders = deltakit.intruders(base, ft_a, k=4, options=CPU)
    both = compare(base, [ft_a, ft_b], top=(2,), options=CPU)
    run = trajectory(base, [ft_a, ft_b], top=(2,), intruder_k=4, options=CPU)
    return {"rank": (rank, render_report(rank)), "intruders": (intruders, render_intruders(intruders)),
            "compare": (both, render_compare(both)), "trajectory": (run, render_trajectory(run))}


SHARED = ["device", "method", "precision", "elapsed_s", "skipped"]


def test_every_report_writes_the_same_metadata_keys_with_the_values_of_its_base(reports, checkpoints):
    base, fts = checkpoints
    for name, (report, _) in reports.items():
        data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
        meta = report.meta_dict()
        one_pair = name in ("rank", "intruders")
        assert list(meta) == ["base", "ft" if one_pair else "fts"] + SHARED + (["only_base", "only_ft"] if one_pair else []), name
        assert {key: data[key] for key in meta} == json.loads(json.dumps(meta)), name
        assert data["base"] == str(base)
        assert data["ft"] == str(fts[0]) if one_pair else data["fts"] == [str(f) for f in fts]
        assert data["device"] == "cpu" and data["precision"] == "fp32"
        assert any(s["name"] == MISMATCH for s in data["skipped"]), name
        if one_pair:
            assert data["only_base"] == ["model.only_in_base.weight"] and data["only_ft"] == ["model.only_in_ft.weight"]


def test_json_key_order_is_the_documented_one(reports):
    """The byte layout of each command's JSON: docs/json.md (rank, compare, trajectory), docs/intruders.md."""
    order = {name: list(report.to_dict()) for name, (report, _) in reports.items()}
    assert order["rank"] == ["base", "ft", "energy", "device", "method", "precision", "elapsed_s", "matrices", "vectors",
                             "skipped", "only_base", "only_ft", "summary"]
    assert order["intruders"] == ["base", "ft", "k", "epsilon", "device", "method", "precision", "elapsed_s", "matrices",
                                  "skipped", "only_base", "only_ft", "summary", "scaling"]
    assert order["compare"] == ["base", "fts"] + SHARED + ["top", "pairs", "matrices", "summary"]
    assert order["trajectory"] == ["base", "fts"] + SHARED + ["steps", "energy", "top", "intruder_k", "epsilon",
                                                             "matrices", "summary"]


def test_every_table_has_the_shared_header_and_footer(reports, checkpoints):
    base, fts = checkpoints
    for name, (report, text) in reports.items():
        lines = text.splitlines()
        assert lines[0] == f"base: {base}", name
        if name in ("rank", "intruders"):
            assert lines[1] == f"ft:   {fts[0]}"
            assert "only in base (1): model.only_in_base.weight" in lines
            assert "only in fine-tune (1): model.only_in_ft.weight" in lines
        elif name == "compare":
            assert lines[1:3] == [f"ft 0: {fts[0]}", f"ft 1: {fts[1]}"]
        else:
            assert lines[1] == f"2 checkpoints, final: {fts[1]}"
        skipped = [line for line in lines if line.startswith(f"skipped {len(report.skipped)}: ")]
        assert len(skipped) == 1 and MISMATCH in skipped[0], name
        assert lines[-1].startswith(f"{report.method}") and lines[-1].endswith(" s"), name
        assert f" in fp32 on cpu, {report.elapsed_s:.2f} s" in lines[-1], name
        assert lines.index(skipped[0]) > len(lines) - 5, name  # with the footer, after the tables
