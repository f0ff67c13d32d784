"""Memory at any size (issue 14, item 8): read-ahead bounded by bytes, W_base kept as stored, norms and
products by row blocks, and the memory model of tests/memory_model.py against the code it models.

No timing and no thread-scheduling assertions: the read-ahead schedule is checked with an executor that
runs each producer when it is submitted, so what was started is exactly what the policy allowed.
"""

from __future__ import annotations

import functools
import math
import weakref
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import deltakit.delta as delta_module
import deltakit.device.reads as reads_module
from deltakit.analyses.rank import rank_matrix
from deltakit.delta import DeltaItem, open_delta_source, pair_bytes
from deltakit.device.reads import prefetched
from deltakit.lora.factors import reconstruction_error, svd_factors
from deltakit.spectral import noise, subspace
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.norms import dim0_blocks, frobenius_norm
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import compute_spectrum
from deltakit.spectral.subspace import amplification, amplification_factor, top_directions

import memory_model as estimate


# ---------------------------------------------------------------- read-ahead by bytes


class _SubmitRunsNow:
    """An executor whose submit runs the producer at once: started == submitted, no threads."""

    def __init__(self, max_workers: int = 1, thread_name_prefix: str = "", initializer=None, initargs=()) -> None:
        if initializer is not None:  # as a pool's thread would, once, before its first task
            initializer(*initargs)

    def submit(self, fn):
        future: Future = Future()
        try:
            future.set_result(fn())
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, as a pool does
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def _schedule(monkeypatch, sizes, depth, budget, fail_at=None):
    """(values seen, how many producers had been started when the consumer got each value)."""
    monkeypatch.setattr(reads_module, "ThreadPoolExecutor", _SubmitRunsNow)
    started: list[int] = []

    def producer(i):
        def produce():
            started.append(i)
            if i == fail_at:
                raise KeyError(i)
            return i * 10
        return produce

    seen, counts = [], []
    for value in prefetched([producer(i) for i in range(len(sizes))], depth, 1, sizes, budget):
        seen.append(value)
        counts.append(len(started))
    assert started == sorted(started)  # started in order
    return seen, counts


def test_budget_smaller_than_one_value_still_makes_progress_one_at_a_time(monkeypatch):
    seen, counts = _schedule(monkeypatch, [100] * 5, depth=3, budget=10)
    assert seen == [0, 10, 20, 30, 40]
    assert counts == [1, 2, 3, 4, 5]  # nothing read ahead: the next is started only when asked for


def test_budget_counts_the_value_being_consumed_and_those_ahead(monkeypatch):
    # budget 300 = the current value and two more of 100 bytes; depth 5 would allow more
    seen, counts = _schedule(monkeypatch, [100] * 6, depth=5, budget=300)
    assert seen == [0, 10, 20, 30, 40, 50]
    assert counts == [3, 4, 5, 6, 6, 6]
    # without a budget, the count alone bounds it, as before
    _, counts = _schedule(monkeypatch, [100] * 6, depth=2, budget=None)
    assert counts == [3, 4, 5, 6, 6, 6]


def test_a_large_value_is_read_alone_and_small_ones_around_it_ahead(monkeypatch):
    sizes = [10, 10, 500, 10, 10, 10]
    _, counts = _schedule(monkeypatch, sizes, depth=4, budget=100)
    # at 0: 1 ahead (the 500 does not fit); at 2 (the 500 itself): nothing ahead; then small ones again
    assert counts == [2, 2, 3, 6, 6, 6]


@pytest.mark.parametrize("budget", [1, 150, None])
def test_order_kept_and_error_raised_at_its_position_under_a_budget(monkeypatch, budget):
    monkeypatch.setattr(reads_module, "ThreadPoolExecutor", _SubmitRunsNow)
    seen = []
    with pytest.raises(KeyError):
        for value in _failing(7, fail_at=4, budget=budget):
            seen.append(value)
    assert seen == [0, 1, 4, 9]


def _failing(count, fail_at, budget):
    def producer(i):
        def produce():
            if i == fail_at:
                raise KeyError(i)
            return i * i
        return produce
    return prefetched([producer(i) for i in range(count)], 3, 2, [100] * count, budget)


def test_threads_keep_order_and_errors_under_a_budget():
    """The real thread pool: order and the failing position are kept whatever the budget."""
    for budget in (1, 250, None):
        seen = []
        with pytest.raises(KeyError):
            for value in _failing(9, fail_at=6, budget=budget):
                seen.append(value)
        assert seen == [i * i for i in range(6)]


def test_sizes_must_match_producers():
    with pytest.raises(ValueError, match="3 producers but 2 sizes"):
        list(prefetched([lambda: 1] * 3, 2, 1, [1, 2], 10))


def test_the_estimate_simulates_the_stream_policy(monkeypatch):
    """The memory model's read-ahead simulation starts exactly what prefetched starts."""
    sizes = [7, 300, 20, 20, 900, 5, 5, 5, 300, 40]
    for depth, budget in ((2, 400), (3, 1000), (1, 50), (4, math.inf)):
        _, counts = _schedule(monkeypatch, sizes, depth, budget)
        ahead = [sum(sizes[i + 1:count]) for i, count in enumerate(counts)]
        assert estimate._simulate_read_ahead(sizes, depth, budget, reads_module.may_read_ahead) == ahead


def test_zip_released_keeps_no_reference_to_what_it_yielded():
    from deltakit.device.reads import released_pairs

    class Big:
        pass

    refs: list[weakref.ref] = []

    def produce():
        for _ in range(4):
            assert all(ref() is None for ref in refs)  # the previous one is gone when the next is made
            big = Big()
            refs.append(weakref.ref(big))
            yield big
            del big

    seen = []
    for index, item in released_pairs(range(10), produce()):
        seen.append(index)
        del item
    assert seen == [0, 1, 2, 3]
    assert list(released_pairs("ab", [1, 2, 3])) == [("a", 1), ("b", 2)]


# ---------------------------------------------------------------- W_base as stored, same numbers


@pytest.fixture
def bf16_pair(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {"model.layers.0.mlp.down_proj.weight": torch.randn(96, 160, generator=gen) * 0.02,
            "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen) * 0.02,
            "model.layers.0.input_layernorm.weight": torch.ones(64)}
    ft = {}
    for name, weight in base.items():
        change = torch.randn(weight.shape[0], 4, generator=gen) @ torch.randn(4, weight.shape[-1], generator=gen) \
            if weight.ndim == 2 else torch.randn(weight.shape, generator=gen)
        ft[name] = weight + 1e-3 * change
    for side, tensors in (("base", base), ("ft", ft)):
        (tmp_path / side).mkdir()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
                  str(tmp_path / side / "model.safetensors"))
    return tmp_path / "base", tmp_path / "ft"


def test_stream_keeps_the_base_as_stored_and_forms_the_exact_delta(bf16_pair):
    source = open_delta_source(*bf16_pair)
    for budget in (1, None):
        for item in source.stream(prefetch_bytes=budget):
            base = source.base.get(item.pair.base_name)
            ft = source.ft.get(item.pair.ft_tensor)
            assert item.base.dtype == torch.bfloat16 and torch.equal(item.base, base)
            assert item.delta.dtype == torch.float32
            assert torch.equal(item.delta, ft.float() - base.float())
            assert torch.equal(item.ft, ft.float())
            assert pair_bytes(item.pair) == base.numel() * 2 + ft.numel() * 2


def test_rank_metrics_are_the_same_to_the_bit_with_the_base_as_stored(bf16_pair):
    """What rank reports from a bf16 W_base equals what it reported from the fp32 copy it used to hold."""
    source = open_delta_source(*bf16_pair)
    options = SpectralOptions(device="cpu")
    for item in source.stream():
        if not item.pair.is_matrix:
            continue
        stored, _ = rank_matrix(item, (0.5, 0.9), options)
        widened, _ = rank_matrix(DeltaItem(item.pair, item.base.float(), item.delta), (0.5, 0.9), options)
        assert stored.to_dict() == widened.to_dict()


def test_storage_noise_reads_a_stored_base_block_by_block(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(300, 70, generator=gen) * 0.02).bfloat16()
    ft = (base.float() + torch.randn(300, 70, generator=gen) * 1e-3).bfloat16()
    delta = ft.float() - base.float()
    whole = storage_noise(base.float(), delta, torch.bfloat16, torch.bfloat16)
    monkeypatch.setattr(noise, "CPU_BLOCK_ELEMENTS", 1000)  # rows of at most 1000 entries on the CPU
    blocked = storage_noise(base, delta, torch.bfloat16, torch.bfloat16)
    assert blocked.unchanged_fraction == whole.unchanged_fraction
    assert blocked.row_energy_max == pytest.approx(whole.row_energy_max, rel=1e-12)
    assert blocked.energy == pytest.approx(whole.energy, rel=1e-12)


# ---------------------------------------------------------------- blocked norms and products


def _fsum_norm(tensor: torch.Tensor) -> float:
    values = tensor.double().flatten().tolist()
    return math.sqrt(math.fsum(v * v for v in values))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(257, 33), (4000,), (5, 30, 12)])
def test_frobenius_norm_by_blocks_against_an_fp64_reference(dtype, shape):
    tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    reference = _fsum_norm(tensor)
    assert len(dim0_blocks(tensor, 500)) > 1
    assert frobenius_norm(tensor, block_elements=500) == pytest.approx(reference, rel=1e-14)
    # one block: exactly the one-call float64 norm
    assert frobenius_norm(tensor) == float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


def test_frobenius_norm_edge_cases():
    assert frobenius_norm(torch.zeros(0, 4), block_elements=1) == 0.0
    assert frobenius_norm(torch.tensor(3.0)) == 3.0
    assert math.isinf(frobenius_norm(torch.tensor([[1.0], [float("inf")]]), block_elements=1))


def test_dim0_blocks_cover_every_row_once():
    tensor = torch.empty(10, 7)
    blocks = dim0_blocks(tensor, 20)
    assert [(b.start, b.stop) for b in blocks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert dim0_blocks(tensor, 1) == [slice(i, i + 1) for i in range(10)]  # at least one row a block


def test_amplification_by_row_blocks_matches_the_whole_product(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(400, 90, generator=gen) * 0.02).bfloat16()
    delta = torch.randn(400, 6, generator=gen) @ torch.randn(6, 90, generator=gen) * 1e-3
    fro = _fsum_norm(delta)
    u, _, vh = top_directions(delta, 6)
    whole = amplification_factor(weight, fro, u, vh)
    monkeypatch.setattr(subspace, "dim0_blocks", functools.partial(dim0_blocks, block_elements=1000))
    blocked = amplification_factor(weight, fro, u, vh)
    # float64 reference: ‖ΔW‖ / ‖Uᵀ W V‖ with everything in float64
    reference = fro / float(torch.linalg.vector_norm(u.double().T @ weight.double() @ vh.double().T))
    assert blocked == pytest.approx(whole, rel=1e-5) and blocked == pytest.approx(reference, rel=1e-5)


def test_reconstruction_error_by_row_blocks_against_fp64(monkeypatch):
    from deltakit.lora import factors as factors_module

    gen = torch.Generator().manual_seed(4)
    matrix = torch.randn(300, 8, generator=gen) @ torch.randn(8, 120, generator=gen) + 0.01 * torch.randn(300, 120,
                                                                                                        generator=gen)
    lora = svd_factors(matrix, 8)
    whole = reconstruction_error(matrix, lora, torch.bfloat16)
    monkeypatch.setattr(factors_module, "dim0_blocks", functools.partial(dim0_blocks, block_elements=1000))
    blocked = reconstruction_error(matrix, lora, torch.bfloat16)
    b, a = lora.b.to(torch.bfloat16).double(), lora.a.to(torch.bfloat16).double()
    reference = _fsum_norm(matrix.double() - b @ a)
    assert blocked == pytest.approx(reference, rel=1e-5) and blocked == pytest.approx(whole, rel=1e-5)


# ---------------------------------------------------------------- the memory model against the code


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages aten ops allocate on this thread while active (views and
    in-place results of inputs are not new). A solver's internal workspace is not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self.refs[key]
                self.live -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key in inputs and key not in self.refs):
                continue
            entry = self.refs.get(key)
            if entry is None:
                entry = self.refs[key] = [0, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def _counted(fn) -> int:
    with _LiveBytes() as counter:
        fn()
    return counter.peak


@pytest.mark.parametrize("shape", [(2048, 96), (96, 1024), (512, 512)])
def test_workspace_model_bounds_what_the_code_allocates(shape, monkeypatch):
    """Each step's modelled workspace is an upper bound of the bytes counted on the CPU, and not more
    than 2.5× of it (the model adds the float64 copies a GPU reduction makes and the CPU's does not)."""
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    base = (torch.randn(m, n, generator=gen) * 0.02).bfloat16()
    delta = (base.float() + torch.randn(m, n, generator=gen) * 2e-3).bfloat16().float() - base.float()
    rank_model = estimate.matrix_workspace("rank", shape, 2, 4, 64)
    extract_model = estimate.matrix_workspace("extract", shape, 2, 4, 16)
    lora = svd_factors(delta, 16)
    counted = {
        "spectrum": _counted(lambda: compute_spectrum(delta, SpectralOptions(device="cpu"))),
        "amplification": _counted(lambda: amplification(base, delta, 1.0, 64)),
        "factors": _counted(lambda: svd_factors(delta, 16)),
        "error": _counted(lambda: reconstruction_error(delta, lora, torch.bfloat16)),
    }
    for step, bytes_counted in counted.items():
        modelled = {**rank_model, **extract_model}[step]
        assert bytes_counted <= modelled <= 2.5 * bytes_counted, (step, bytes_counted, modelled)
    assert _counted(lambda: frobenius_norm(base)) <= rank_model["norm"]
    # the noise workspace: NOISE_BLOCKS blocks and the row / column vectors, with small blocks to count them
    monkeypatch.setattr(noise, "CPU_BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(noise, "BLOCK_ELEMENTS", 4096)
    modelled_noise = estimate.matrix_workspace("rank", shape, 2, 4, 64)["noise"]
    counted_noise = {sides: _counted(lambda: storage_noise(base, delta, torch.bfloat16, torch.bfloat16, rounding=sides))
                     for sides in ("auto", "one-sided", "two-sided", "between")}
    assert max(counted_noise.values()) <= modelled_noise <= 1.25 * max(counted_noise.values()), counted_noise


def test_memory_model_grows_with_size_and_keeps_405b_layers_under_8_gb():
    peaks = {p: estimate.memory_model(p, "rank")["peak_layers"] for p in ("tiny", "7b", "70b", "405b")}
    assert peaks["tiny"] < peaks["7b"] < peaks["70b"] < peaks["405b"] < estimate.TARGET_BYTES
    for command in ("extract", "extract-energy"):
        assert estimate.memory_model("405b", command)["peak_layers"] < estimate.TARGET_BYTES
    model = estimate.memory_model("405b", "rank")
    mlp = next(r for r in model["tensors"] if r["name"].endswith("mlp.up_proj.weight"))
    assert mlp["item"] == 53248 * 16384 * (2 + 4)  # W_base bf16 + ΔW fp32
    # the default budget reads a 405B MLP pair alone; a larger one would read ahead and pass 8 GB
    assert estimate.memory_model("405b", "rank", prefetch_bytes=10 * 10**9)["peak_layers"] > estimate.TARGET_BYTES


def test_rank_and_extract_drop_each_item_before_the_next_read(bf16_pair, monkeypatch, tmp_path):
    """With a budget below one pair, each pair is read only once the consumer has dropped the previous
    ΔW: the device then holds one pair at a time (the reason rank and extract drop their item)."""
    import deltakit.lora.extraction as extract_module
    import deltakit.lora.extraction_passes as passes_module
    from deltakit.analyses.rank import rank
    from deltakit.lora.extraction import extract_lora

    original_stream, original_fetch = delta_module.stream_deltas, delta_module.fetch_pair
    yielded: list[weakref.ref] = []
    alive_at_read: list[int] = []

    def tracking_stream(pairs, base, ft, device="cpu", dtype=torch.float32, prefetch=2, prefetch_bytes=None):
        for item in original_stream(pairs, base, ft, device, dtype, prefetch, 1):  # budget: 1 byte
            yielded.append(weakref.ref(item.delta))
            yield item
            del item

    def tracking_fetch(ckpt, name, pair, device):
        if ckpt is sides["base"]:
            alive_at_read.append(sum(ref() is not None for ref in yielded))
        return original_fetch(ckpt, name, pair, device)

    monkeypatch.setattr(delta_module, "stream_deltas", tracking_stream)
    monkeypatch.setattr(passes_module, "stream_deltas", tracking_stream)
    monkeypatch.setattr(delta_module, "fetch_pair", tracking_fetch)
    sides: dict[str, object] = {}
    real_open = delta_module.open_checkpoint

    def remembering_open(path, **kwargs):
        ckpt = real_open(path, **kwargs)
        if str(path) == str(bf16_pair[0]):
            sides["base"] = ckpt
        return ckpt

    monkeypatch.setattr(delta_module, "open_checkpoint", remembering_open)
    monkeypatch.setattr(extract_module, "open_checkpoint", remembering_open)
    report = rank(*bf16_pair, options=SpectralOptions(device="cpu"))
    assert len(report.matrices) == 2 and len(alive_at_read) == 3 and alive_at_read == [0, 0, 0]
    yielded.clear(), alive_at_read.clear()
    extracted = extract_lora(*bf16_pair, tmp_path / "adapter", rank=2, options=SpectralOptions(device="cpu"))
    assert len(extracted.matrices) == 2 and len(alive_at_read) == 3 and alive_at_read == [0, 0, 0]


def _tracked(items, yielded: list, alive_at_next: list):
    """``items`` with, each time the consumer asks for the next one, how many of those yielded so
    far it still holds (a weak reference to each item's first tensor)."""
    for item in items:
        alive_at_next.append(sum(ref() is not None for ref in yielded))
        tensors = getattr(item, "deltas", None) or [item.delta]
        yielded.append(weakref.ref(tensors[0]))
        yield item
        del item, tensors
    alive_at_next.append(sum(ref() is not None for ref in yielded))


def test_intruders_compare_and_trajectory_drop_each_item_before_asking_for_the_next(bf16_pair, monkeypatch, tmp_path):
    """Like rank and extract: the stream counts a pair as released once the next is asked for, so the
    loop must hold nothing of it then (a plain ``zip`` and its loop variable kept the last one)."""
    import deltakit.analyses.compare as compare_module
    import deltakit.analyses.intruders as intruders_module
    import deltakit.analyses.trajectory as trajectory_module

    yielded: list[weakref.ref] = []
    alive: list[int] = []
    real_stream, real_many = delta_module.DeltaSource.stream, delta_module.stream_many
    monkeypatch.setattr(delta_module.DeltaSource, "stream",
                        lambda self, *a, **k: _tracked(real_stream(self, *a, **k), yielded, alive))
    for module in (compare_module, trajectory_module):
        monkeypatch.setattr(module, "stream_many", lambda *a, **k: _tracked(real_many(*a, **k), yielded, alive))
    base, ft = bf16_pair
    options = SpectralOptions(device="cpu")
    runs = [lambda: intruders_module.intruders(base, ft, options=options),
            lambda: compare_module.compare(base, [ft, ft], options=options),
            lambda: trajectory_module.trajectory(base, [ft, ft], options=options)]
    for run in runs:
        yielded.clear(), alive.clear()
        run()
        assert len(alive) >= 2 and alive == [0] * len(alive)  # at each matrix, and at the end of the stream
