"""Faults lose nothing and leave nothing: malformed headers, inputs changing under us, signals,
killed processes, full disks and file-size limits, durability.

Malformed safetensors headers are judged against the safetensors library itself (``safe_open`` on
the same bytes): deltakit accepts exactly what it accepts and refuses the rest with one
DeltakitError. Signals and kills run the real CLI in a subprocess, stopped at a known point of a
write by DELTAKIT_TEST_HOLD_WRITE (the writer creates a marker file and waits), never by sleeping.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltakit.errors import DeltakitError
from deltakit.io import ShardedWriter, atomic_directory, atomic_file, open_checkpoint
from deltakit.io.atomic import OWNER_FILE, TemporaryOutput, owner_record, reclaim_stale
from deltakit.io.safetensors_header import read_safetensors_header

from conftest import PROGRESS_LINE, assert_one_line_error, invoke

# ---------------------------------------------------------------- malformed headers


def safetensors_bytes(header: dict | bytes, data_len: int) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * data_len


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
        return True
    except Exception:  # SafetensorError, and whatever else the library raises on bad input
        return False


def deltakit_accepts(path: Path) -> bool:
    """True if deltakit reads the header; False if it refuses with a DeltakitError (anything else fails the test)."""
    try:
        read_safetensors_header(path)
        return True
    except DeltakitError as exc:
        assert "\n" not in str(exc).strip() and str(path) in str(exc), str(exc)
        return False


def entry(dtype="F32", shape=(2,), offsets=(0, 8), **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


HAND_MADE = {
    # name: (header, data bytes, accepted by safetensors)
    "valid": ({"a": entry(), "b": entry(offsets=(8, 16))}, 16, True),
    "float offsets": ({"a": entry(offsets=(0.0, 8.0))}, 8, False),
    "negative offset reads the header": ({"a": entry(offsets=(-8, 0))}, 8, False),
    "negative dims whose product matches": ({"a": entry(shape=(-1, -2))}, 8, False),
    "boolean dim": ({"a": entry(shape=(True, 2))}, 8, False),
    "overlapping offsets": ({"a": entry(), "b": entry(offsets=(4, 12))}, 12, False),
    "gap between tensors": ({"a": entry(), "b": entry(offsets=(12, 20))}, 20, False),
    "data after the last tensor": ({"a": entry()}, 16, False),
    "data shorter than the header says": ({"a": entry()}, 4, False),
    "unknown dtype": ({"a": entry(dtype="F33")}, 8, False),
    "lower-case dtype": ({"a": entry(dtype="f32")}, 8, False),
    "span does not match the shape": ({"a": entry(shape=(3,))}, 8, False),
    "three offsets": ({"a": entry(offsets=(0, 8, 8))}, 8, False),
    "string offsets": ({"a": entry(offsets=("0", "8"))}, 8, False),
    "entry is a list": ({"a": [1]}, 8, False),
    "entry without data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, 8, False),
    "metadata of numbers": ({"__metadata__": {"k": 1}, "a": entry()}, 8, False),
    "metadata of strings": ({"__metadata__": {"k": "v"}, "a": entry()}, 8, True),
    "metadata null": ({"__metadata__": None, "a": entry()}, 8, True),
    "unknown field is ignored": ({"a": entry(note={"deep": [[1]]})}, 8, True),
    "zero-size tensors at one offset": ({"a": entry(shape=(0,), offsets=(0, 0)), "b": entry(shape=(2, 0), offsets=(0, 0))},
                                        0, True),
    "scalar": ({"a": entry(shape=(), offsets=(0, 4))}, 4, True),
    "dtype as a unit variant object": ({"a": entry(dtype={"F32": None})}, 8, True),
    "4-bit dtype ending mid-byte": ({"a": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, 2, False),
    "shape overflowing 64 bits before a zero": ({"a": entry(shape=(2**63, 2, 0), offsets=(0, 0))}, 0, False),
    "zero before a huge dim": ({"a": entry(shape=(0, 2**63, 2), offsets=(0, 0))}, 0, True),
    "dim beyond 64 bits": ({"a": entry(shape=(2**64, 0), offsets=(0, 0))}, 0, False),
    "top level is a list": (b"[]", 0, False),
    "empty object": (b"{}", 0, True),
    "not UTF-8": (b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    "byte-order mark": (b'\xef\xbb\xbf{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    "NaN in an unknown field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', 8, False),
    "float out of range": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}', 8, False),
    "minus zero dim": (b'{"a":{"dtype":"F32","shape":[2,-0],"data_offsets":[0,0]}}', 0, False),
    "exponent dim": (b'{"a":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}', 8, False),
    "duplicate field": (b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    "duplicate __metadata__": (b'{"__metadata__":{},"__metadata__":{},"a":{"dtype":"F32","shape":[2],'
                               b'"data_offsets":[0,8]}}', 8, False),
    "lone surrogate": (b'{"a\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    "surrogate pair": (b'{"a\\ud83d\\ude00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, True),
    "trailing NUL": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\0', 8, False),
    "padding spaces": (b'  {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  ', 8, True),
    "nesting 127 deep": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 125 + b"]" * 125
                         + b"}}", 8, True),
    "nesting 128 deep": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 126 + b"]" * 126
                         + b"}}", 8, False),
    "100,000 nested brackets": (b"[" * 100_000 + b"]" * 100_000, 0, False),
    "100,000 nested brackets in a field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                           + b"[" * 100_000 + b"]" * 100_000 + b"}}", 8, False),
}


@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_hand_made_headers_judged_as_the_safetensors_library_judges_them(tmp_path, case):
    header, data_len, accepted = HAND_MADE[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, data_len))
    assert library_accepts(path) is accepted  # the reference itself, so the table cannot drift from it
    assert deltakit_accepts(path) is accepted


def test_malformed_headers_are_one_error_line_naming_file_and_tensor(runner, tmp_path):
    """The cases the issue reported as tracebacks or silent acceptance, through the CLI."""
    good = {"w": torch.randn(4, 4)}
    base = tmp_path / "base"
    base.mkdir()
    save_file(good, base / "model.safetensors")
    for case, tensor_named in (("float offsets", True), ("negative dims whose product matches", True),
                               ("overlapping offsets", True), ("negative offset reads the header", True),
                               ("unknown dtype", True), ("100,000 nested brackets", False)):
        header, data_len, _ = HAND_MADE[case]
        ft = tmp_path / case.replace(" ", "-").replace(",", "")
        ft.mkdir()
        (ft / "model.safetensors").write_bytes(safetensors_bytes(header, data_len))
        result = invoke(runner, "rank", base, ft, "--device", "cpu")
        assert_one_line_error(result, str(ft / "model.safetensors"))
        assert result.exit_code == 1
        if tensor_named:
            assert "tensor a" in result.stderr or "tensor b" in result.stderr, result.stderr


def _random_json(rng: random.Random, depth: int = 0):
    choice = rng.randrange(9 if depth < 3 else 6)
    return [lambda: rng.choice([0, 1, 2, 8, -1, -8, 2**63, 2**64, 7]), lambda: rng.choice([0.0, 8.0, -0.0, 1.5]),
            lambda: rng.choice(["", "F32", "x", "0"]), lambda: None, lambda: rng.choice([True, False]),
            lambda: [], lambda: [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))],
            lambda: {rng.choice(["dtype", "shape", "data_offsets", "k"]): _random_json(rng, depth + 1)
                     for _ in range(rng.randrange(3))},
            lambda: [rng.randrange(-2, 20) for _ in range(rng.randrange(4))]][choice]()


DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F4", "F6_E2M3", "C64", "U16", "F64", "XX", "f16"]


def _mutated_file(rng: random.Random) -> bytes:
    """A valid three-tensor header, then one to three random mutations, of the JSON or of its bytes."""
    header = {"__metadata__": {"format": "pt"}, "a": entry("F32", (2, 3), (0, 24)), "b": entry("F16", (4,), (24, 32)),
              "c": entry("BF16", (1, 2), (32, 36))}
    data_len = 36
    raw = None
    for _ in range(rng.randrange(1, 4)):
        names = [n for n in header if n != "__metadata__"] or ["a"]
        name = rng.choice(names)
        kind = rng.randrange(12)
        if kind < 6 and not isinstance(header.get(name), dict):
            kind = 6 + rng.randrange(6)
        if kind == 0:
            header[name][rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
        elif kind == 1:
            header[name]["dtype"] = rng.choice(DTYPES)
        elif kind == 2:
            header[name]["shape"] = [rng.randrange(-2, 9) for _ in range(rng.randrange(4))]
        elif kind == 3 and isinstance(header[name].get("data_offsets"), list):
            offsets = header[name]["data_offsets"]
            if offsets:
                offsets[rng.randrange(len(offsets))] += rng.choice([-9, -1, 1, 4, 100])
        elif kind == 4:
            header[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif kind == 5:
            depth = rng.choice([1, 50, 125, 126, 200, 5000])
            header[name]["extra"] = json.loads("[" * depth + "]" * depth) if depth < 500 else None
        elif kind == 6:
            data_len += rng.choice([-5, -1, 1, 8])
        elif kind == 7:
            header["__metadata__"] = _random_json(rng)
        elif kind == 8:
            header[rng.choice(["d", "a", ""])] = _random_json(rng)
        elif kind == 9:
            del header[name]
        elif kind == 10:
            raw = json.dumps(header).encode()
            position = rng.randrange(len(raw))
            raw = raw[:position] + bytes([rng.choice(b'[]{}",:0-9 \\e.\x00\xff')]) + raw[position + 1:]
        elif kind == 11:
            raw = json.dumps(header).encode()
            raw = raw[:rng.randrange(len(raw))] if rng.random() < 0.5 else b"[" * 3000 + raw
    blob = safetensors_bytes(raw if raw is not None else header, max(0, data_len))
    if rng.random() < 0.05:  # a wrong header length
        blob = rng.choice([0, 7, 2**40, len(blob)]).to_bytes(8, "little") + blob[8:]
    return blob


def test_fuzzed_headers_never_escape_as_anything_but_deltakit_error_and_agree_with_safetensors(tmp_path):
    rng = random.Random(20261129)
    path = tmp_path / "model.safetensors"
    verdicts = {True: 0, False: 0}
    disagreements = []
    for case in range(600):
        blob = _mutated_file(rng)
        path.write_bytes(blob)
        ours = deltakit_accepts(path)
        if ours:
            ckpt = open_checkpoint(path) if any(k for k in read_safetensors_header(path)) else None
            if ckpt is not None:  # tensors of dtypes deltakit reads come back with their header's shape
                for name in ckpt.keys():
                    assert tuple(ckpt.get(name).shape) == ckpt.shape(name)
        verdicts[ours] += 1
        if ours != library_accepts(path):
            disagreements.append((case, ours, blob[:200]))
    assert not disagreements, disagreements[:5]
    assert verdicts[True] > 20 and verdicts[False] > 300, verdicts  # the fuzz reaches both sides


def test_open_checkpoint_on_fuzzed_files_raises_only_deltakit_error(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "model.safetensors"
    for _ in range(150):
        path.write_bytes(_mutated_file(rng))
        try:
            with open_checkpoint(path) as ckpt:
                for name in ckpt.keys():
                    ckpt.get(name)
        except DeltakitError:
            pass


# ---------------------------------------------------------------- inputs changing under us


def test_a_shard_truncated_while_being_read_is_named(tmp_path):
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(ckpt.get("a"), tensors["a"])  # the file is open now
    data = (tmp_path / "model.safetensors").read_bytes()
    os.truncate(tmp_path / "model.safetensors", len(data) - 1000)
    with pytest.raises(DeltakitError, match="model.safetensors") as info:
        ckpt.get("b")
    assert "truncated" in str(info.value) or "changed" in str(info.value)


def test_a_shard_replaced_or_rewritten_after_opening_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(8, 8), "b": torch.zeros(8, 8)}, path)
    ckpt = open_checkpoint(path)
    replacement = tmp_path / "new.safetensors"
    save_file({"b": torch.ones(8, 8), "a": torch.ones(8, 8)}, replacement)  # same size, other layout
    os.replace(replacement, path)
    with pytest.raises(DeltakitError, match="changed while deltakit was reading it"):
        ckpt.get("a")

    os.utime(path, ns=(10**18, 10**18))  # last modified long ago, as a checkpoint usually was (mtime is coarse)
    ckpt = open_checkpoint(path)
    assert torch.equal(ckpt.get("a"), torch.ones(8, 8))
    with open(path, "r+b") as fh:  # rewritten in place, same size
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    with pytest.raises(DeltakitError, match="changed while deltakit was reading it"):
        ckpt.get("b")


# ---------------------------------------------------------------- temporary outputs and their owners


def test_temporary_output_records_its_owner_and_leaves_nothing(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "w.txt").write_text("x")
        folder = tmp.parent
        owner = json.loads((folder / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == owner_record()["host"]
        assert tmp.name == "out" and folder.name.startswith(".out.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "w.txt").read_text() == "x"
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "out"]


def _stale_folder(parent: Path, target: str, owner: dict, label: str = "x") -> Path:
    folder = parent / f".{target}.tmp-{label}"
    (folder / target).mkdir(parents=True)
    (folder / target / "partial.safetensors").write_bytes(b"\0" * 100)
    (folder / OWNER_FILE).write_text(json.dumps(owner))
    return folder


def test_reclaim_removes_only_temporaries_whose_owner_is_gone_on_this_host(tmp_path, capfd):
    alive = TemporaryOutput(tmp_path / "out", directory=True)  # this process: alive (made first: it reclaims too)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {**owner_record(), "pid": int(finished.stdout)}  # a process that has exited (and been reaped)
    dead_folder = _stale_folder(tmp_path, "out", dead, "dead")
    reused = _stale_folder(tmp_path, "out", {**owner_record(), "start": owner_record()["start"] + 1}, "reused")  # our pid
    elsewhere = _stale_folder(tmp_path, "out", {**dead, "host": "another-host"}, "elsewhere")
    unowned = tmp_path / ".out.tmp-old"
    unowned.mkdir()  # an older deltakit's, or one being made: no record
    other_target = _stale_folder(tmp_path, "other", dead)
    capfd.readouterr()
    removed = reclaim_stale(tmp_path / "out")
    assert sorted(removed) == sorted([dead_folder, reused])
    assert not dead_folder.exists() and not reused.exists()
    assert alive.folder.exists() and elsewhere.exists() and unowned.exists() and other_target.exists()
    err = capfd.readouterr().err
    assert f"removed {dead_folder}" in err and f"process {dead['pid']}" in err
    alive.discard()


def test_reclaim_never_touches_a_temporary_whose_lock_is_held(tmp_path):
    """The owner record names a process that is gone, but someone holds the lock (another pid namespace)."""
    import fcntl

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = _stale_folder(tmp_path, "out", {**owner_record(), "pid": int(finished.stdout)})
    fd = os.open(folder / OWNER_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert reclaim_stale(tmp_path / "out") == [] and folder.exists()
    finally:
        os.close(fd)
    assert reclaim_stale(tmp_path / "out") == [folder]


def test_force_replaces_an_old_output_in_one_step_and_leaves_nothing(tmp_path):
    for old_is_dir in (True, False):
        target = tmp_path / f"out{old_is_dir}"
        if old_is_dir:
            target.mkdir()
            (target / "old").write_text("old")
        else:
            target.write_text("old file")
        with atomic_directory(target, force=True) as tmp:
            (tmp / "new").write_text("new")
        assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outFalse", "outTrue"]


# ---------------------------------------------------------------- durability


def test_published_outputs_are_fsynced_files_folders_and_parent(tmp_path, monkeypatch):
    import deltakit.io.atomic as atomic
    import deltakit.io.writer as writer

    synced = []
    real = atomic.fsync_path

    def recording(path):
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(atomic, "fsync_path", recording)
    monkeypatch.setattr(writer, "fsync_path", recording)
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        sharded = ShardedWriter(tmp, [("a", (4, 4), torch.float32), ("b", (4,), torch.float32)], max_shard_bytes=64)
        sharded.write("a", torch.zeros(4, 4))
        assert synced == [tmp / "model-00001-of-00002.safetensors"]  # a shard is synced once complete
        sharded.write("b", torch.zeros(4))
        sharded.finish()
        (tmp / "config.json").write_text("{}")
    names = [p.name for p in synced]
    assert names.count("model-00002-of-00002.safetensors") == 2  # by the writer, then at publish
    assert {"config.json", "model.safetensors.index.json", "model"} <= set(names)  # files and the folder itself
    assert synced[-1] == tmp_path  # the parent, after the rename
    synced.clear()
    monkeypatch.setenv("DELTAKIT_FSYNC", "0")
    with atomic_directory(tmp_path / "again") as tmp:
        ShardedWriter(tmp, [("a", (4,), torch.float32)]).write("a", torch.zeros(4))
    assert synced == []


# ---------------------------------------------------------------- full disks, quotas, file-size limits


def write_model(folder: Path, layers: int = 6) -> tuple[Path, Path]:
    """A small sharded model and a LoRA adapter for its q_proj weights: (model, adapter)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(64, 64, generator=generator)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(64)
    model = folder / "model"
    model.mkdir(parents=True)
    writer = ShardedWriter(model, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], max_shard_bytes=40_000)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.{factor}.weight":
               torch.randn(*shape, generator=generator) * 0.01
               for i in range(layers) for factor, shape in (("lora_A", (2, 64)), ("lora_B", (64, 2)))},
              str(adapter / "adapter_model.safetensors"))
    return model, adapter


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "inputs")


def cli(*args, hold: Path | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DELTAKIT_TEST_HOLD_WRITE", None)
    if hold is not None:
        env["DELTAKIT_TEST_HOLD_WRITE"] = str(hold)
    return subprocess.Popen([sys.executable, "-m", "deltakit_cli.main", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_marker(process: subprocess.Popen, hold: Path, count: int = 1, timeout: float = 240) -> list[Path]:
    """The writer's hold markers (one per process), once ``count`` exist; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        markers = sorted(hold.parent.glob(hold.name + ".*"))
        if len(markers) >= count:
            return markers
        if process.poll() is not None:
            pytest.fail(f"exited {process.returncode} before holding: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)  # polling for a condition, not waiting for time to pass
    process.kill()
    pytest.fail("the writer never reached its hold point")


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*tmp-*"))


def test_merge_refuses_early_when_the_disk_has_too_little_space(model, tmp_path, monkeypatch, runner):
    import shutil

    base, adapter = model
    (tmp_path / "out").mkdir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50_000))
    result = invoke(runner, "merge", base, adapter, "-o", tmp_path / "out" / "merged", "--device", "cpu")
    assert_one_line_error(result, "not enough free space")
    assert "50.00 kB" in result.stderr and str(tmp_path / "out" / "merged") in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_a_full_disk_mid_write_is_one_error_naming_the_file_and_leaves_nothing(model, tmp_path, monkeypatch, runner):
    import errno

    base, adapter = model
    (tmp_path / "out").mkdir()
    real_pwrite, calls = os.pwrite, []

    def filling(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    result = invoke(runner, "merge", base, adapter, "-o", tmp_path / "out" / "merged", "--device", "cpu")
    assert_one_line_error(result, "No space left on device")
    line = result.stderr.strip()
    assert f"cannot write {tmp_path / 'out' / 'merged'}/model-0000" in line and "tensor model.layers." in line, line
    assert list((tmp_path / "out").iterdir()) == []


def test_space_errors_that_name_no_file_name_the_output(tmp_path):
    """A plain write() reports ENOSPC without a path, safetensors' save_file as "(os error 27)": both name the output."""
    import errno

    from safetensors import SafetensorError

    with pytest.raises(DeltakitError, match=f"cannot write {tmp_path / 'r.json'}: No space left on device"):
        with atomic_file(tmp_path / "r.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(DeltakitError, match=f"cannot write {tmp_path / 's.safetensors'}: File too large"):
        with atomic_file(tmp_path / "s.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    with pytest.raises(FileNotFoundError):  # an input that is missing is not a write error
        with atomic_directory(tmp_path / "d"):
            open(tmp_path / "no-such-input")
    assert list(tmp_path.iterdir()) == []


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_file_size_limit_below_the_output_is_one_error_and_leaves_nothing(model, tmp_path):
    base, adapter = model
    out = tmp_path / "out"
    out.mkdir()
    shard = max(p.stat().st_size for p in base.glob("*.safetensors"))
    process = cli("merge", base, adapter, "-o", out / "merged", "--device", "cpu",
                  preexec_fn=_limit_file_size(shard // 2))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write {out / 'merged'}/model-"), err
    assert "File too large" in lines[0]
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- signals and kills


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_mid_merge_leaves_nothing(model, tmp_path, sig):
    base, adapter = model
    out = tmp_path / "out"
    out.mkdir()
    hold = tmp_path / "hold"
    process = cli("merge", base, adapter, "-o", out / "merged", "--device", "cpu", hold=hold)
    wait_for_marker(process, hold)
    [folder] = temporaries(out)
    assert list((folder / "merged").glob("model-*.safetensors"))  # mid-write: shards exist, partly written
    process.send_signal(sig)
    stdout, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    # The log's closing progress line says how far the merge got, then the one error line.
    assert [line for line in lines if not PROGRESS_LINE.match(line)] == [f"Error: interrupted ({signal.Signals(sig).name})"], err
    assert all(line.startswith("merge ") for line in lines[:-1]), err
    assert list(out.iterdir()) == []


def test_sigkill_then_rerun_leaves_only_the_finished_output(model, tmp_path):
    base, adapter = model
    out = tmp_path / "out"
    out.mkdir()
    hold = tmp_path / "hold"
    process = cli("merge", base, adapter, "-o", out / "merged", "--device", "cpu", hold=hold)
    wait_for_marker(process, hold)
    process.kill()
    process.communicate(timeout=60)
    [stale] = temporaries(out)  # SIGKILL cannot be caught: the temporary stays, with its owner record
    assert json.loads((stale / OWNER_FILE).read_text())["pid"] == process.pid

    rerun = cli("merge", base, adapter, "-o", out / "merged", "--device", "cpu")
    stdout, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"removed {stale}" in err and f"process {process.pid}" in err
    assert [p.name for p in out.iterdir()] == ["merged"]
    merged = open_checkpoint(out / "merged")
    assert sorted(merged.keys()) == sorted(open_checkpoint(base).keys())


def test_a_running_writer_s_temporary_is_never_reclaimed(model, tmp_path):
    """A second run to the same output while the first is still writing leaves the first's temporary alone."""
    base, adapter = model
    out = tmp_path / "out"
    out.mkdir()
    hold = tmp_path / "hold"
    first = cli("merge", base, adapter, "-o", out / "merged", "--device", "cpu", hold=hold)
    try:
        [marker] = wait_for_marker(first, hold)
        [running] = temporaries(out)
        from deltakit.lora import merge

        merge(base, adapter, out / "merged", device="cpu")
        assert running.is_dir() and (out / "merged").is_dir()
        marker.unlink()  # let the first one go on: it finds the output there and does not overwrite it
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1 and "appeared while deltakit was writing it" in err, err
    assert [p.name for p in out.iterdir()] == ["merged"]
