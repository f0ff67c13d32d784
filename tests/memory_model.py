"""A model of the peak device memory of `rank` and `extract`, from shapes and dtypes alone (issue 14: 405B
under 8 GB), checked against the bytes the code allocates (tests/test_memory.py, tests/test_blocked.py).

Per matrix: the pair as read, ΔW, the largest workspace of the steps that follow, and what the stream reads
ahead meanwhile (simulated with the stream's own policy, :func:`deltakit.delta.may_read_ahead`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from deltakit.spectral.options import SpectralOptions

GPU_READS_AHEAD = SpectralOptions().reads_ahead(torch.device("cuda"))  # the read-ahead the memory models assume


@dataclass(frozen=True)
class LlamaShapes:
    """A Llama-style decoder with grouped-query attention: k/v projections have ``kv`` rows."""

    hidden: int
    intermediate: int
    kv: int
    vocab: int
    layers: int


MEMORY_PRESETS = {
    "tiny": LlamaShapes(hidden=128, intermediate=344, kv=32, vocab=1024, layers=2),
    "7b": LlamaShapes(hidden=4096, intermediate=11008, kv=4096, vocab=32000, layers=32),  # Llama 2 7B
    "70b": LlamaShapes(hidden=8192, intermediate=28672, kv=1024, vocab=128256, layers=80),  # Llama 3 70B
    "405b": LlamaShapes(hidden=16384, intermediate=53248, kv=1024, vocab=128256, layers=126),  # Llama 3.1 405B
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
NOISE_BLOCKS = 15  # block-sized temporaries alive at once in spectral.noise.storage_noise: the one-sided
                  # (and "between") model's; the two-sided one holds 10 (tests/test_memory.py)
DETECTION_BLOCKS = 18  # the same for the rounding test's pass (spectral.noise.rounding_sides: int64 bins), over
                       # the entries it samples of each block
AMPLIFICATION_OVERSAMPLE = 16  # randomized_svd's default oversampling, used by spectral.subspace.top_directions
TARGET_BYTES = 8 * 10**9  # issue 14: rank / extract under 8 GB of GPU memory


def memory_layout(shapes: LlamaShapes, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order deltakit streams them (names sorted within a layer, as stored)."""
    h, i, kv = shapes.hidden, shapes.intermediate, shapes.kv
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shapes.vocab, h))] if shapes.vocab else []
    for layer in range(shapes.layers if layers is None else layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.mlp.down_proj.weight", (h, i)),
                (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.post_attention_layernorm.weight", (h,)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h))]
    return out + [("model.norm.weight", (h,))] + ([("lm_head.weight", (shapes.vocab, h))] if shapes.vocab else [])


def matrix_workspace(command: str, shape: tuple[int, ...], stored: int, compute: int, rank: int) -> dict[str, int]:
    """Bytes each step of ``command`` holds for one tensor beyond the pair and ΔW (see :func:`memory_model`)."""
    from deltakit.lora.factors import oversample
    from deltakit.spectral import norms

    entries = math.prod(shape)
    if len(shape) != 2:
        return {"norm": min(norms.BLOCK_ELEMENTS, entries) * 8}
    m, n = shape
    k = min(m, n)
    block = min(norms.BLOCK_ELEMENTS, entries)
    steps = {"norm": block * 8}
    gram = 2 * k * k * compute + 4 * k * compute  # G = MᵀM (or MMᵀ), the eigensolver's copy of it, the values
    if command in ("rank", "intruders"):
        steps["noise"] = noise_workspace(m, n, entries, compute)
        steps["spectrum"] = gram
        width = min(64 + AMPLIFICATION_OVERSAMPLE, k)  # amplification: top-64 directions, one power iteration
        steps["amplification"] = _randomized(m, n, width, compute) + block * compute + 64 * n * compute
    else:  # extract
        if command == "extract-energy":
            steps["spectrum"] = gram
        steps["factors"] = _randomized(m, n, min(rank + oversample(rank), k), compute)
        steps["error"] = block * (2 * compute + 8)  # a block of B@A, of the residual, and its float64 copy
    return steps


def noise_workspace(m: int, n: int, block: int, compute: int) -> int:
    """Bytes the storage-noise model holds for an m×n ΔW worked on ``block`` entries at a time: the larger of
    its variance pass and the rounding test's sampled pass (its bins counted in), with the row / column sums."""
    from deltakit.spectral import noise

    per_block = min(noise.BLOCK_ELEMENTS, block)
    sampled = math.ceil(per_block / math.ceil(m * n / noise.DETECTION_ENTRIES))  # every stride-th row
    held = max(NOISE_BLOCKS * per_block, DETECTION_BLOCKS * sampled) * compute
    return held + (m + n) * (compute + 8) + 64


def is_blocked(shape: tuple[int, ...], compute: int) -> bool:
    """Whether ``rank`` reads this matrix by row blocks (deltakit.spectral.blocked.blocked_pair, from the shape alone)."""
    from deltakit.spectral.options import BLOCKED_BYTES

    return len(shape) == 2 and shape[0] >= shape[1] and math.prod(shape) * compute > BLOCKED_BYTES


def blocked_workspace(shape: tuple[int, int], stored: int, compute: int) -> dict[str, int]:
    """Bytes ``rank``'s row-blocked path (deltakit.spectral.blocked) holds for one tall m×n matrix.

    While the blocks are read: G (n×n), two row blocks of the pair as stored (one worked on, one
    read ahead) and the ΔW block, and the noise sums' workspace over a block; then the eigensolve
    (G, the eigensolver's copy of it, the values), once the blocks are gone.
    """
    from deltakit.spectral.blocked import block_rows
    from deltakit.spectral import norms

    m, n = shape
    dtype = {4: torch.float32, 8: torch.float64}[compute]
    block = min(block_rows((m, n), dtype), m) * n
    return {"gram": n * n * compute,
            "blocks": 2 * block * 2 * stored + block * compute + min(norms.BLOCK_ELEMENTS, block) * 8,  # + a norm block in float64
            "noise": noise_workspace(m, n, block, compute),
            "spectrum": 2 * n * n * compute + 4 * n * compute}


def _randomized(m: int, n: int, width: int, compute: int) -> int:
    """spectral.svd.randomized_svd of an m×n matrix with ``width`` sketch columns: the sketch, the range
    and power-iteration bases with their float64 copies (QR / CholeskyQR2), B = QᵀM and its float64 products."""
    return (m + n) * width * (3 * compute + 2 * 8) + 2 * width * n * 8


def memory_model(preset: str | LlamaShapes, command: str = "rank", stored: str = "bf16", precision: str = "fp32",
                 prefetch: int | None = None, prefetch_bytes: float | None = None, rank: int = 64,
                 layers: int | None = 2, threads: int | None = None) -> dict[str, object]:
    """Predicted peak bytes on the compute device for ``command`` on ``preset``, tensor by tensor.

    Per tensor: while ΔW is formed the device holds W_base and W_ft as stored and ΔW in the
    compute dtype (``form``); then W_base as stored and ΔW (``item``) plus the largest step
    workspace; throughout, the pairs the stream has read ahead by the policy of
    :func:`deltakit.delta.prefetched` (``ahead``). ``rank`` reads a tall matrix whose ΔW is over
    deltakit.spectral.options.BLOCKED_BYTES by row blocks (``path: "gram-blocked"``, :func:`blocked_workspace`). ``layers`` (default 2) limits the layers
    listed: every layer is the same, so the peak does not depend on it. ``prefetch``: pairs read
    ahead (default: as on a GPU, :data:`GPU_READS_AHEAD`). ``threads``: matrices
    `rank` computes at once (default: as on a GPU, deltakit.spectral.options.GPU_MATRIX_THREADS);
    the others hold items (with their workspaces) up to deltakit.device.workers.IN_FLIGHT_BYTES together
    (``others``), none beside an item larger than that.
    """
    from deltakit.device.reads import PREFETCH_BYTES, may_read_ahead
    from deltakit.spectral.options import GPU_MATRIX_THREADS
    from deltakit.device.workers import IN_FLIGHT_BYTES

    threads = (GPU_MATRIX_THREADS if command == "rank" else 1) if threads is None else threads

    budget = PREFETCH_BYTES if prefetch_bytes is None else prefetch_bytes
    prefetch = GPU_READS_AHEAD if prefetch is None else prefetch
    s, c = DTYPE_BYTES[stored], DTYPE_BYTES[precision]
    shapes = MEMORY_PRESETS[preset] if isinstance(preset, str) else preset
    layout = memory_layout(shapes, layers)  # vocab 0: no embedding or lm_head
    blocked = [command == "rank" and is_blocked(shape, c) for _, shape in layout]
    # blocked pairs are not streamed (rank reads them by row blocks once the stream is done): nothing ahead then
    reads = [math.prod(shape) * 2 * s for (_, shape), whole in zip(layout, blocked) if not whole]
    streamed_ahead = iter(_simulate_read_ahead(reads, prefetch, budget, may_read_ahead))
    ahead_of = [0 if whole else next(streamed_ahead) for whole in blocked]
    rows = []
    for (name, shape), ahead, whole in zip(layout, ahead_of, blocked):
        entries = math.prod(shape)
        if whole:
            steps = blocked_workspace(shape, s, c)
            peak = max(steps["gram"] + steps["blocks"] + steps["noise"], steps["spectrum"])
            rows.append({"name": name, "shape": list(shape), "form": 0, "item": 0, "steps": steps,
                         "ahead": 0, "peak": peak, "path": "gram-blocked"})
            continue
        steps = matrix_workspace(command, shape, s, c, rank)
        form = entries * (2 * s + c)
        item = entries * (s + c)
        others = max(0, min((threads - 1) * item, IN_FLIGHT_BYTES - item))  # items on the other threads
        others += others * max(steps.values()) // item if item else 0  # and their workspaces
        peak = max(form, item + max(steps.values())) + ahead + others
        rows.append({"name": name, "shape": list(shape), "form": form, "item": item, "steps": steps,
                     "ahead": ahead, "others": others, "peak": peak})
    worst = max(rows, key=lambda r: r["peak"])
    matrices = [r for r in rows if len(r["shape"]) == 2 and "embed" not in r["name"] and "lm_head" not in r["name"]]
    worst_layer = max(matrices, key=lambda r: r["peak"]) if matrices else worst
    return {"preset": preset if isinstance(preset, str) else asdict(preset), "command": command, "stored": stored,
            "precision": precision, "prefetch": prefetch,
            "prefetch_bytes": budget, "peak": worst["peak"], "peak_tensor": worst["name"],
            "peak_layers": worst_layer["peak"], "peak_layers_tensor": worst_layer["name"],
            "target": TARGET_BYTES, "tensors": rows}


def _simulate_read_ahead(reads: list[int], depth: int, budget: float, may_read_ahead) -> list[int]:
    """Bytes read ahead while each tensor is the consumer's, by the stream's own rule."""
    if depth <= 0:
        return [0] * len(reads)
    out, following, ahead = [], 0, []
    for index, size in enumerate(reads):
        if not ahead:  # the consumer asks: started whatever its size
            ahead.append(following)
            following += 1
        current = ahead.pop(0)
        assert current == index
        held = size + sum(reads[j] for j in ahead)
        while following < len(reads) and may_read_ahead(held, reads[following], len(ahead), depth, budget):
            ahead.append(following)
            held += reads[following]
            following += 1
        out.append(sum(reads[j] for j in ahead))
    return out
