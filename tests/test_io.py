"""Checkpoint reading (single file, shards + index, folder, pickle opt-in) and refusal of bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from deltakit.errors import DeltakitError
from deltakit.io import ShardedWriter, atomic_directory, open_checkpoint


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(8, 6, generator=g).bfloat16(), "b.weight": torch.randn(5, generator=g),
            "c.weight": torch.randn(3, 4, generator=g).half()}


def test_single_file_lazy_read_keeps_dtype(tmp_path):
    save_file(tensors(), tmp_path / "model.safetensors")
    for path in (tmp_path / "model.safetensors", tmp_path):
        ckpt = open_checkpoint(path)
        assert sorted(ckpt.keys()) == ["a.weight", "b.weight", "c.weight"]
        assert ckpt.dtype("a.weight") == torch.bfloat16 and ckpt.shape("a.weight") == (8, 6)
        assert torch.equal(ckpt.get("c.weight"), tensors()["c.weight"])


def test_rows_read_and_written_in_blocks_equal_whole_tensors(tmp_path):
    """get_rows reads only a slice's bytes; ShardedWriter takes a tensor in row blocks, in any order."""
    ts = tensors()
    save_file(ts, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(ckpt.get_rows("a.weight", 2, 5), ts["a.weight"][2:5])
    assert ckpt.get_rows("a.weight", 3, 3).shape == (0, 6)
    with pytest.raises(ValueError):
        ckpt.get_rows("a.weight", 5, 9)
    (tmp_path / "out").mkdir()
    writer = ShardedWriter(tmp_path / "out", [(n, tuple(t.shape), t.dtype) for n, t in ts.items()])
    for start in (6, 0, 3):  # out of order
        writer.write("a.weight", ts["a.weight"][start:start + 3], start_row=start)
    with pytest.raises(DeltakitError, match="never written"):
        writer.finish(expected=["a.weight", "b.weight"])  # b.weight not yet written
    writer.write("b.weight", ts["b.weight"])
    writer.write("c.weight", ts["c.weight"])
    with pytest.raises(ValueError, match="outside planned"):
        writer.write("a.weight", ts["a.weight"][:3], start_row=7)
    writer.finish()
    written = open_checkpoint(tmp_path / "out")
    assert all(torch.equal(written.get(n), t) for n, t in ts.items())


def test_sharded_writer_round_trip_with_index(tmp_path):
    ts = tensors()
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        writer = ShardedWriter(tmp, [(n, tuple(t.shape), t.dtype) for n, t in ts.items()], max_shard_bytes=32)
        for name in reversed(list(ts)):  # any order
            writer.write(name, ts[name])
        writer.finish()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    ckpt = open_checkpoint(out)
    assert ckpt.format == "safetensors" and len(ckpt.files) == 3
    for name, t in ts.items():
        assert torch.equal(ckpt.get(name), t)
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_existing_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("precious")
    with pytest.raises(DeltakitError, match="--force"):
        with atomic_directory(tmp_path / "out"):
            pass
    with atomic_directory(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_missing_shard_named_by_index(tmp_path):
    save_file(tensors(), tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(DeltakitError, match="missing"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("cut", [4, 50, -10])
def test_truncated_file_refused(tmp_path, cut):
    save_file(tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(DeltakitError, match="truncated|not a safetensors|corrupt"):
        open_checkpoint(tmp_path / "model.safetensors")


def test_corrupt_header_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 16)
    with pytest.raises(DeltakitError, match="corrupt"):
        open_checkpoint(path)


def test_pickle_refused_by_default_and_loaded_with_flag(tmp_path):
    torch.save(tensors(), tmp_path / "pytorch_model.bin")
    with pytest.raises(DeltakitError, match="--allow-pickle"):
        open_checkpoint(tmp_path)
    ckpt = open_checkpoint(tmp_path, allow_pickle=True)
    assert ckpt.format == "pickle" and torch.equal(ckpt.get("a.weight"), tensors()["a.weight"])


def test_pickle_with_code_refused_even_with_flag(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DeltakitError, match="weights_only"):
        open_checkpoint(tmp_path / "evil.pt", allow_pickle=True)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DeltakitError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(DeltakitError, match="no weights found"):
        open_checkpoint(tmp_path)
    with pytest.raises(DeltakitError, match="not in the local Hugging Face cache|no such file"):
        open_checkpoint("some-org/not-a-cached-model")


def test_unknown_file_type_refused(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"123")
    with pytest.raises(DeltakitError, match="not a checkpoint file"):
        open_checkpoint(tmp_path / "weights.npz")


def test_atomic_outputs_get_umask_modes_not_owner_only(tmp_path):
    import os
    import stat

    from deltakit.io import atomic_file

    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
        with atomic_directory(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_background_writer_writes_everything_and_reraises(tmp_path):
    from deltakit.io.writer import BackgroundWriter

    ts = tensors()
    background = BackgroundWriter(ShardedWriter(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in ts.items()]))
    for name, t in ts.items():
        background.write(name, t)
    background.finish()
    ckpt = open_checkpoint(tmp_path)
    assert all(torch.equal(ckpt.get(n), t) for n, t in ts.items())

    (tmp_path / "b").mkdir()
    failing = BackgroundWriter(ShardedWriter(tmp_path / "b", [("x", (2,), torch.float32)]))
    failing.write("x", torch.zeros(3))  # wrong shape: the thread's error comes back to the caller
    with pytest.raises(ValueError, match="planned"):
        failing.finish()


def test_threaded_writes_in_shard_interleaved_order_give_the_same_files(tmp_path):
    """Four writer threads, tensors round-robin over the shards: the bytes equal a plain sequential write."""
    from deltakit.io.writer import BackgroundWriter

    ts = {f"layer{i}.w": torch.randn(64, 32 + i) for i in range(12)}
    plan = [(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    (tmp_path / "one").mkdir()
    ShardedWriter(tmp_path / "one", plan, max_shard_bytes=30_000)  # makes the files; the next one attaches
    sequential = ShardedWriter(tmp_path / "one", plan, max_shard_bytes=30_000, create_files=False)
    for name, t in ts.items():
        sequential.write(name, t)
    sequential.finish()
    (tmp_path / "many").mkdir()
    writer = ShardedWriter(tmp_path / "many", plan, max_shard_bytes=30_000)
    order = writer.interleaved(ts)
    assert sorted(order) == sorted(ts) and len(writer.shards) >= 3
    shard_of = {t.name: i for i, shard in enumerate(writer.shards) for t in shard}
    assert [shard_of[n] for n in order[:3]] == [0, 1, 2]  # consecutive writes go to different files
    background = BackgroundWriter(writer, depth=4, workers=4)
    for name in order:
        background.write(name, ts[name])
    background.finish()
    for a in sorted((tmp_path / "one").iterdir()):
        assert a.read_bytes() == (tmp_path / "many" / a.name).read_bytes(), a.name


def test_prefetched_keeps_order_and_raises_at_the_failing_position():
    """The first ``workers`` producers wait for each other at a barrier: they can only all pass it if
    they run at once on ``workers`` threads, so a serial prefetch fails (BrokenBarrierError) instead
    of passing by luck; no timing assumption beyond the barrier's generous timeout."""
    import threading

    from deltakit.device.reads import prefetched

    def producers(count, together, fail_at=None):
        barrier = threading.Barrier(together, timeout=60)

        def producer(i):
            def produce():
                if i < together:
                    barrier.wait()
                if i == fail_at:
                    raise KeyError(i)
                return i * i
            return produce
        return [producer(i) for i in range(count)]

    assert list(prefetched(producers(7, together=3), depth=3, workers=3)) == [i * i for i in range(7)]
    seen = []
    with pytest.raises(KeyError):
        for value in prefetched(producers(10, together=2, fail_at=7), depth=3, workers=2):
            seen.append(value)
    assert seen == [i * i for i in range(7)]
    assert list(prefetched(producers(3, together=1), depth=0)) == [0, 1, 4]


def test_hub_id_resolves_from_local_cache_only(tmp_path, monkeypatch):
    """A hub id already in the Hugging Face cache opens offline (HF_HUB_OFFLINE=1); an absent one is one error."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-model"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(tensors(), snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = open_checkpoint("some-org/tiny-model")
    assert ckpt.root == snapshot and torch.equal(ckpt.get("b.weight"), tensors()["b.weight"])
    with pytest.raises(DeltakitError, match="not in the local Hugging Face cache"):
        open_checkpoint("some-org/absent-model")


def test_rows_to_write_counts_whole_tensors_and_row_spans():
    """What one process checks at finish where processes share tensors' rows: whole tensors count all
    their rows (a 0-d one, 1), spans their own, repeated names add up."""
    from deltakit.io.writer import rows_to_write

    shapes = {"experts": (4, 32, 16), "norm": (32,), "scalar": ()}
    writes = [("experts", (1, 2)), ("experts", (3, 4)), ("norm", None), ("scalar", None)]
    assert rows_to_write(writes, shapes) == {"experts": 2, "norm": 32, "scalar": 1}
    assert rows_to_write([("experts", None)], shapes) == {"experts": 4}
