"""`rank` on several threads (deltakit.device.workers): the same report as on one, errors kept, memory bounded."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deltakit.analyses.rank as analysis
from deltakit.delta import DeltaItem
from deltakit.errors import DeltakitError
from deltakit.spectral.options import SpectralOptions
from deltakit.device.workers import MatrixWorkers, device_tensors
from spectra_helpers import TEST_PLAN, comparable, spectrum_matrix

DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]  # GPU runs: bash bench/gpu.sh cuda-tests


def bf16_pair(folder, layers: int = 3):
    """A bf16 checkpoint pair: per layer a noisy decaying update (adaptive path), a low-rank one, a
    small matrix (full path) and a norm vector, so every kind of entry goes through the threads."""
    gen = torch.Generator().manual_seed(7)
    base, ft = {}, {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        weight = torch.randn(768, 512, generator=gen) * 0.02
        update = (spectrum_matrix(768, 512, 0.5 * np.arange(1, 65) ** -1.2, layer)
                  + 2e-4 * torch.randn(768, 512, generator=gen))
        base[f"{prefix}.mlp.up_proj.weight"] = weight.bfloat16()
        ft[f"{prefix}.mlp.up_proj.weight"] = (weight + update).bfloat16()
        weight = torch.randn(512, 512, generator=gen) * 0.02
        base[f"{prefix}.self_attn.q_proj.weight"] = weight.bfloat16()
        ft[f"{prefix}.self_attn.q_proj.weight"] = (weight + spectrum_matrix(512, 512, np.full(4, 0.05), 10 + layer)).bfloat16()
        weight = torch.randn(64, 48, generator=gen) * 0.02
        base[f"{prefix}.self_attn.k_proj.weight"] = weight.bfloat16()
        ft[f"{prefix}.self_attn.k_proj.weight"] = (weight + 1e-3 * torch.randn(64, 48, generator=gen)).bfloat16()
        base[f"{prefix}.input_layernorm.weight"] = torch.ones(512).bfloat16()
        ft[f"{prefix}.input_layernorm.weight"] = (torch.ones(512) + 0.01 * layer).bfloat16()
    for side, tensors in (("base", base), ("ft", ft)):
        (folder / side).mkdir()
        save_file(tensors, folder / side / "model.safetensors")
    return folder / "base", folder / "ft"


@pytest.mark.parametrize("device", DEVICES)
def test_rank_on_three_threads_reports_exactly_what_one_thread_does(tmp_path, device):
    base, ft = bf16_pair(tmp_path)
    reports = {threads: analysis.rank(base, ft, (0.5, 0.9), SpectralOptions(device=device, spectrum="adaptive",
                                                                          workers=threads, adaptive_plan=TEST_PLAN),
                                      keep_spectra=True)
               for threads in (1, 3)}
    one, three = reports[1], reports[3]
    methods = [m.spectrum_method for m in one.matrices]
    assert any(m.startswith("adaptive") for m in methods) and "gram" in methods  # both paths ran
    assert [m.name for m in three.matrices] == [m.name for m in one.matrices]  # plan order kept
    assert comparable(three) == comparable(one)
    assert one.spectra.keys() == three.spectra.keys()
    for name, values in one.spectra.items():
        np.testing.assert_array_equal(three.spectra[name], values)


def test_an_error_on_a_worker_thread_reaches_the_caller(tmp_path):
    base, ft = bf16_pair(tmp_path, layers=2)
    from safetensors.torch import load_file
    tensors = load_file(ft / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(tensors, ft / "model.safetensors")
    with pytest.raises(DeltakitError, match="inf or nan"):
        analysis.rank(base, ft, (0.9,), SpectralOptions(device="cpu", workers=2))


def test_workers_must_be_positive():
    with pytest.raises(DeltakitError, match="at least 1"):
        SpectralOptions(workers=0).matrix_threads(torch.device("cpu"))
    assert SpectralOptions().matrix_threads(torch.device("cpu")) == 1
    assert SpectralOptions().matrix_threads(torch.device("cuda")) == 3
    assert SpectralOptions().matrix_threads(torch.device("cuda"), adaptive=False) == 1  # the full path: one
    assert SpectralOptions(workers=2).matrix_threads(torch.device("cuda"), adaptive=False) == 2


def test_no_more_items_than_threads_are_queued_or_running_at_once():
    """``submit`` waits for a free thread, so at most ``threads`` items (their tensors) are held."""
    threads = 2
    release = threading.Event()
    futures, held = [], []

    def work(item: DeltaItem, scale: float) -> float:
        release.wait(timeout=30)
        return float(item.delta.sum()) * scale

    def submit_all(workers: MatrixWorkers) -> None:
        for item in items:
            futures.append(workers.submit(work, item, 0.5))
            held.append(sum(not f.done() for f in futures))

    items = [DeltaItem(pair=None, base=torch.zeros(2), delta=torch.full((2,), float(i))) for i in range(6)]
    with MatrixWorkers(torch.device("cpu"), threads) as workers:
        submitter = threading.Thread(target=submit_all, args=(workers,))
        submitter.start()
        release.set()
        submitter.join(timeout=60)
        assert [f.result() for f in futures] == [float(2 * i) * 0.5 for i in range(6)]
    assert len(held) == 6 and max(held) <= threads


def test_items_held_at_once_stay_within_the_budget_and_a_larger_one_runs_alone():
    release = threading.Event()
    held, sizes = [], [1000, 1000, 1000, 5000, 1000, 1000]

    def work(item: DeltaItem) -> int:
        release.wait(timeout=30)
        return item.delta.numel()

    def submit_all(workers: MatrixWorkers) -> None:
        for size in sizes:  # float32: size bytes each
            futures.append(workers.submit(work, DeltaItem(pair=None, base=torch.zeros(0), delta=torch.zeros(size // 4))))
            held.append(workers.held())

    futures = []
    with MatrixWorkers(torch.device("cpu"), threads=3, budget=2500) as workers:
        submitter = threading.Thread(target=submit_all, args=(workers,))
        submitter.start()
        release.set()
        submitter.join(timeout=60)
        assert [f.result() for f in futures] == [size // 4 for size in sizes]
    assert len(held) == len(sizes)
    assert all(h <= 2500 or h == 5000 for h in held)  # within the budget, or the large one alone


def test_the_next_item_is_taken_from_its_source_only_once_it_fits():
    """paced(): a large item is read only when nothing else is held, a small one when it fits the budget."""
    sizes = [1000, 1000, 5000, 1000, 1000, 1000]
    release = threading.Event()
    seen = []  # (held by the threads, size) when each item was taken from the source

    def source():
        for size in sizes:
            seen.append((workers.held(), size))
            yield DeltaItem(pair=None, base=torch.zeros(0), delta=torch.zeros(size // 4))

    def work(item: DeltaItem) -> int:
        release.wait(timeout=30)
        return item.delta.numel() * 4

    done = []
    with MatrixWorkers(torch.device("cpu"), threads=3, budget=2500) as workers:
        timer = threading.Timer(0.05, release.set)  # the threads finish some time after the first submits
        timer.start()
        futures = [workers.submit(work, item) for item in workers.paced(source(), sizes)]
        done = [f.result() for f in futures]
        timer.join()
    assert done == sizes and len(seen) == len(sizes)
    assert all(held + size <= 2500 or held == 0 for held, size in seen)


def test_one_thread_runs_in_the_caller_and_keeps_its_exception():
    caller = threading.get_ident()
    item = DeltaItem(pair=None, base=torch.zeros(1), delta=torch.ones(1))
    with MatrixWorkers(torch.device("cpu"), 1) as workers:
        assert workers.submit(lambda _item: threading.get_ident(), item).result() == caller
        failed = workers.submit(lambda _item: 1 / 0, item)
    with pytest.raises(ZeroDivisionError):
        failed.result()


def test_device_tensors_finds_them_at_any_depth():
    cpu = torch.zeros(1)
    assert device_tensors((cpu, [cpu, (cpu,)], None, 3)) == []  # only CUDA tensors need taking over
    if torch.cuda.is_available():
        gpu = torch.zeros(1, device="cuda")
        assert len(device_tensors((gpu, [cpu, (gpu, None)]))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's lazy CUDA linalg loading: GPU machines only")
def test_threads_started_by_matrix_workers_factorise_at_once_in_a_fresh_process():
    """The first factorisations of a process, on several threads at once, succeed (pytorch#90613)."""
    script = (
        "import torch\n"
        "from deltakit.delta import DeltaItem\n"
        "from deltakit.device.workers import MatrixWorkers\n"
        "def work(item):\n"
        "    g = item.delta.double() @ item.delta.double().T + torch.eye(8, device='cuda', dtype=torch.float64)\n"
        "    return float(torch.linalg.cholesky_ex(g)[0].sum() + torch.linalg.eigh(g)[0].sum())\n"
        "items = [DeltaItem(pair=None, base=torch.zeros(1, device='cuda'), delta=torch.randn(8, 8, device='cuda'))"
        " for _ in range(8)]\n"
        "with MatrixWorkers(torch.device('cuda'), 4) as workers:\n"
        "    print(sum(1 for f in [workers.submit(work, item) for item in items] if f.result() > 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "8"


def test_threads_working_for_a_gpu_make_it_current(monkeypatch):
    """The read-ahead threads and the matrix threads run with cuda:N current, as the caller does in
    `rank` and a single-process CLI run: on cuda:1 of a 2-GPU host the threads failed with "an
    illegal memory access" while cuda:0 was current. Recorded with torch.cuda.set_device stubbed,
    so that this runs without a GPU; tests/test_workers.py runs rank itself on every GPU there is."""
    from deltakit.device.reads import prefetched
    from deltakit.distributed import init_parallel
    from deltakit.device import workers as workers_module

    made: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made.append((threading.current_thread().name, d)))
    gpu = torch.device("cuda:1")
    assert list(prefetched([lambda i=i: i for i in range(4)], depth=2, workers=2, device=gpu)) == [0, 1, 2, 3]
    assert made and all(name.startswith("deltakit-prefetch") and d == gpu for name, d in made)

    made.clear()
    monkeypatch.setattr(workers_module, "load_linalg", lambda device: None)
    with MatrixWorkers(gpu, threads=2) as pool:
        list(pool._pool.map(lambda _: None, range(4)))
    assert made and all(name.startswith("deltakit-matrix") and d == gpu for name, d in made)

    made.clear()
    list(prefetched([lambda: 0], depth=2, workers=1, device=torch.device("cuda")))  # no index: nothing changed
    list(prefetched([lambda: 0], depth=2, workers=1))
    assert made == []

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert not init_parallel("cuda:1").active
    assert made == [(threading.current_thread().name, gpu)]  # one process: its --device is current
