"""A fine-tune that unties a tied base's head is analysed against the base's embedding; a head the config calls
tied is skipped only where it equals the embedding (ground truth: the ΔW built here, its float64 rank)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import deltakit
from deltakit.report import render_report
from deltakit.spectral.options import SpectralOptions

from conftest import low_rank

EMBED, HEAD, Q = "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"
VOCAB, DIM = 300, 64


def write(folder, tensors, tied: bool) -> None:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    config = {"model_type": "llama", "hidden_size": DIM, "vocab_size": VOCAB, "tie_word_embeddings": tied}
    (folder / "config.json").write_text(json.dumps(config))


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {EMBED: torch.randn(VOCAB, DIM, generator=generator) * 0.02,
            Q: torch.randn(DIM, DIM, generator=generator) * 0.02}


def test_untied_head_is_analysed_against_the_bases_embedding(tmp_path):
    base = tensors()
    write(tmp_path / "base", base, tied=True)  # a tied base stores the embedding only
    change = low_rank(VOCAB, DIM, 5, scale=0.01, seed=3).float()
    write(tmp_path / "ft", {**base, HEAD: base[EMBED] + change}, tied=False)
    report = deltakit.rank(tmp_path / "base", tmp_path / "ft", options=SpectralOptions(device="cpu"))
    head = {m.name: m for m in report.matrices}[HEAD]
    assert HEAD not in report.only_ft and report.summary()["changed_matrices"] == 1
    stored = (base[EMBED] + change).double() - base[EMBED].double()
    assert head.rank == 5 and head.delta_fro == pytest.approx(float(stored.norm()), rel=1e-6)
    assert head.note and EMBED in head.note
    assert f"note: {HEAD}" in render_report(report)


def test_a_tied_head_that_differs_is_analysed_with_a_note(tmp_path):
    base = tensors()
    write(tmp_path / "base", {**base, HEAD: base[EMBED].clone()}, tied=True)
    change = low_rank(VOCAB, DIM, 3, scale=0.01, seed=4).float()
    write(tmp_path / "ft", {**base, HEAD: base[EMBED] + change}, tied=True)  # config says tied; the file does not
    report = deltakit.rank(tmp_path / "base", tmp_path / "ft", options=SpectralOptions(device="cpu"))
    found = {m.name: m for m in report.matrices}
    assert HEAD in found and found[HEAD].rank == 3 and "differ" in found[HEAD].note
    assert not any(s["name"] == HEAD for s in report.skipped)


def test_a_tied_head_equal_to_its_embedding_is_skipped_once(tmp_path):
    base = tensors()
    write(tmp_path / "base", {**base, HEAD: base[EMBED].clone()}, tied=True)
    ft = {**base, EMBED: base[EMBED] + low_rank(VOCAB, DIM, 2, scale=0.01, seed=5).float()}
    write(tmp_path / "ft", {**ft, HEAD: ft[EMBED].clone()}, tied=True)
    report = deltakit.rank(tmp_path / "base", tmp_path / "ft", options=SpectralOptions(device="cpu"))
    assert HEAD not in {m.name for m in report.matrices}
    assert any(s["name"] == HEAD and s["reason"].startswith("tied to") for s in report.skipped)
    assert {m.name: m.rank for m in report.matrices}[EMBED] == 2

