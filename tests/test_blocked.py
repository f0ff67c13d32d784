"""rank's row-blocked path (deltakit.spectral.blocked): the same metrics as the whole-matrix Gram path, never a whole ΔW."""

import math

import pytest
import torch
from safetensors.torch import save_file

import deltakit.analyses.rank as analysis
from deltakit import delta
from deltakit.spectral import blocked
from deltakit.spectral.options import SpectralOptions

from conftest import low_rank

EMBED = "model.embed_tokens.weight"
WIDE = "model.layers.0.mlp.down_proj.weight"
SMALL = "model.layers.0.self_attn.q_proj.weight"


def _pair(tmp_path, base_dtype=torch.bfloat16, ft_dtype=torch.bfloat16, added=0):
    """A tall 3000×256 embedding changed by a rank-8 update plus small noise (rows < 500 unchanged),
    a wide 256×3000 matrix and a small one; the fine-tune may add ``added`` vocabulary rows."""
    g = torch.Generator().manual_seed(0)
    m, n = 3000, 256
    base = {EMBED: torch.randn(m, n, generator=g) * 0.02, WIDE: torch.randn(n, m, generator=g) * 0.02,
            SMALL: torch.randn(64, 64, generator=g) * 0.02}
    change = low_rank(m, n, 8, scale=0.5, seed=1).float() + torch.randn(m, n, generator=g) * 1e-3
    change[:500] = 0
    ft = {EMBED: base[EMBED] + change, WIDE: base[WIDE] + change.T, SMALL: base[SMALL] + 0.01}
    if added:
        ft[EMBED] = torch.cat([ft[EMBED], torch.randn(added, n, generator=g)])
    for name, tensors, dtype in (("base", base, base_dtype), ("ft", ft, ft_dtype)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, tmp_path / name / "model.safetensors")
    return tmp_path / "base", tmp_path / "ft"


LOW = dict(blocked_bytes=1 << 20, block_bytes=700 * 256 * 4)  # blocked above 1 MB of ΔW (the 3 MB tall and
# wide pairs, not the small one), blocks of 700 rows


FIELDS = ("rank", "rank_at", "signal_rank_at", "unchanged_fraction", "noise_model", "signal_rank", "random_rank_at",
          "shape", "added_rows", "layout")
CLOSE = ("stable_rank", "effective_rank", "noise_share", "delta_fro", "rel_delta", "spectral_norm", "noise_floor",
         "signal_energy", "signal_effective_rank")


@pytest.mark.parametrize("dtypes, added", [((torch.bfloat16, torch.bfloat16), 0),
                                           ((torch.bfloat16, torch.bfloat16), 10),
                                           ((torch.float16, torch.bfloat16), 0)])
def test_blocked_path_gives_the_whole_paths_metrics(tmp_path, dtypes, added):
    base, ft = _pair(tmp_path, *dtypes, added=added)
    energy = (0.5, 0.9, 0.99)
    reference = analysis.rank(base, ft, energy, SpectralOptions(device="cpu"), keep_spectra=True)
    whole = {m.name: m for m in reference.matrices}
    report = analysis.rank(base, ft, energy, SpectralOptions(device="cpu", **LOW), keep_spectra=True)
    parts = {m.name: m for m in report.matrices}
    assert [m.name for m in report.matrices] == list(whole)  # the blocked pair keeps its place
    one, other = parts[EMBED], whole[EMBED]
    assert one.spectrum_method == "gram-blocked" and other.spectrum_method == "gram"
    assert parts[WIDE].spectrum_method == "gram" and parts[SMALL].spectrum_method == "gram"  # wide: whole path
    assert one.amplification is None and other.amplification is not None
    for key in FIELDS:
        assert getattr(one, key) == getattr(other, key), key
    for key in CLOSE:
        assert getattr(one, key) == pytest.approx(getattr(other, key), rel=1e-6), key
    # what the construction says: a rank-8 update dominates; rows < 500 are unchanged where both grids are one
    assert one.rank_at[0.9] <= 8 and one.added_rows == added and one.noise_share > 0
    assert one.unchanged_fraction >= (500 / 3000 if dtypes[0] == dtypes[1] else 0.0)
    assert one.noise_model == ("independent" if dtypes[0] != dtypes[1] else "shared-grid")
    assert report.spectra[EMBED] == pytest.approx(reference.spectra[EMBED], rel=1e-5, abs=1e-6 * one.spectral_norm)


def test_blocked_path_never_holds_a_whole_delta(tmp_path, monkeypatch):
    from deltakit.device import reads as reads_module

    base, ft = _pair(tmp_path)
    reads, blocks = [], []
    fetch = reads_module.fetch

    def recording_fetch(ckpt, name, device, rows=None):
        tensor = fetch(ckpt, name, device, rows)
        reads.append((name, tuple(tensor.shape)))
        return tensor

    row_blocks = analysis.delta_row_blocks

    def recording_blocks(*args, **kwargs):
        for start, base_block, delta_block in row_blocks(*args, **kwargs):
            blocks.append(tuple(delta_block.shape))
            yield start, base_block, delta_block

    monkeypatch.setattr(delta, "fetch", recording_fetch)  # spies on the reads, which delta makes
    monkeypatch.setattr(analysis, "delta_row_blocks", recording_blocks)
    report = analysis.rank(base, ft, (0.9,), SpectralOptions(device="cpu", **LOW))
    embed = {m.name: m for m in report.matrices}[EMBED]
    assert embed.spectrum_method == "gram-blocked"
    # five blocks of ≤ 700 rows, each side, read twice (the shared grid's update scale needs a first pass), and
    # once more for the float64 Gram matrix: the 1e-3 noise puts the storage floor under the fp32 Gram floor
    assert embed.refined
    embed_reads = [shape for name, shape in reads if name == EMBED]
    assert len(embed_reads) == 2 * 3 * math.ceil(3000 / 700)
    assert max(rows for rows, _ in embed_reads) == 700
    assert blocks and max(b[0] for b in blocks) == 700 and sum(b[0] for b in blocks) == 3 * 3000
    assert max(math.prod(b) for b in blocks) < 3000 * 256


def test_blocked_pair_choice(tmp_path):
    base, ft = _pair(tmp_path)
    source = delta.open_delta_source(base, ft)
    by_name = {p.name: p for p in source.pairs}
    assert not analysis.read_by_blocks(source, by_name[EMBED], SpectralOptions())  # 3 MB: under the default 3.5 GiB
    low = SpectralOptions(**LOW)
    assert analysis.read_by_blocks(source, by_name[EMBED], low)
    assert not analysis.read_by_blocks(source, by_name[WIDE], low)  # wide: the whole path
    assert not analysis.read_by_blocks(source, by_name[SMALL], low)
    assert blocked.block_rows((3000, 256), torch.float32, low.block_bytes) == 700


def test_blocked_path_allocates_less_than_one_whole_delta_and_what_the_model_says(tmp_path, monkeypatch):
    """Counted on the CPU (bytes aten allocates on this thread: not the blocks read ahead on the reading
    thread): G, one ΔW block and the noise workspace, under one whole fp32 ΔW and under tests/memory_model.py's model."""

    import memory_model as estimate
    from deltakit.spectral import noise
    from test_memory import _counted

    base, ft = _pair(tmp_path)
    monkeypatch.setattr(noise, "CPU_BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(noise, "BLOCK_ELEMENTS", 4096)
    source = delta.open_delta_source(base, ft)
    pair = next(p for p in source.pairs if p.name == EMBED)
    cpu = torch.device("cpu")

    def blocks(rows):
        return delta.delta_row_blocks(source.base, source.ft, pair, rows, cpu, torch.float32)

    counted = _counted(lambda: blocked.blocked_spectrum(blocks, pair.shape, pair.base_dtype, pair.ft_dtype, cpu,
                                                        block_bytes=LOW["block_bytes"]))
    steps = estimate.blocked_workspace((3000, 256), 2, 4)
    assert counted < 3000 * 256 * 4
    assert counted <= max(steps["gram"] + steps["blocks"] + steps["noise"], steps["spectrum"])


def test_memory_model_puts_405b_embeddings_under_8_gb():
    import memory_model as estimate

    model = estimate.memory_model("405b", "rank")
    embed = next(r for r in model["tensors"] if r["name"] == EMBED)
    assert embed["path"] == "gram-blocked" and model["peak"] < estimate.TARGET_BYTES
    mlp = next(r for r in model["tensors"] if r["name"].endswith("mlp.up_proj.weight"))
    assert "path" not in mlp  # 405B's MLP (3.25 GiB of ΔW) stays on the whole path
