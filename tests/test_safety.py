"""Nothing a user gives deltakit is lost or misread: inputs are never written, reads stay inside the
folder the user named, only regular files are opened, duplicate header keys are refused, stop
signals are handled from the first instruction, write errors name the output, transformers Conv1D
layers merge right in any model, and tall matrices stream in bounded memory.

Every case runs through the CLI (one ``Error:`` line, non-zero exit, inputs byte for byte as before)
and through the Python API (a DeltakitError).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltakit
from deltakit.errors import DeltakitError
from deltakit.io import ShardedWriter, open_checkpoint
from deltakit.io.safetensors_header import read_safetensors_header

from conftest import assert_one_line_error, finishes_within, invoke

REPO = Path(__file__).resolve().parents[1]


def fingerprint(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) -> sha256 of its bytes; links are listed by target."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    out = {}
    for file in files:
        key = str(file.relative_to(path.parent))
        if file.is_symlink():
            out[key] = "-> " + os.readlink(file)
        elif file.is_file():
            out[key] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def write_pair(folder: Path, sharded: bool = True) -> tuple[Path, Path, Path]:
    """A small sharded base, a fine-tune of it (two matrices changed at rank 2) and a LoRA adapter of the base."""
    generator = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(32, 32, generator=generator) for i in range(3)}
    base |= {f"model.layers.{i}.input_layernorm.weight": torch.ones(32) for i in range(3)}
    ft = dict(base)
    for i in range(2):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        ft[name] = base[name] + torch.randn(32, 2, generator=generator) @ torch.randn(2, 32, generator=generator)
    paths = []
    for label, tensors in (("base", base), ("ft", ft)):
        target = folder / label
        target.mkdir(parents=True)
        if sharded:
            writer = ShardedWriter(target, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                                   max_shard_bytes=6_000)
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            writer.finish()
        else:
            save_file(tensors, str(target / "model.safetensors"))
        (target / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
        paths.append(target)
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.{factor}.weight":
               torch.randn(*shape, generator=generator) * 0.01
               for i in range(3) for factor, shape in (("lora_A", (2, 32)), ("lora_B", (32, 2)))},
              str(adapter / "adapter_model.safetensors"))
    return paths[0], paths[1], adapter


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path, Path]:
    return write_pair(tmp_path / "in")


# ---------------------------------------------------------------- 1. inputs are never written


def _same_path_spellings(path: Path) -> list[str]:
    return [str(path), f"{path}/", f"{path}/../{path.name}"]


@pytest.mark.parametrize("spelling", [0, 1, 2])
@pytest.mark.parametrize("case", ["merge -o base", "merge -o adapter", "extract -o ft", "extract -o base",
                                  "unmerge -o merged"])
def test_force_never_writes_over_an_input(runner, pair, case, spelling):
    base, ft, adapter = pair
    command, _, target = case.partition(" -o ")
    inputs = {"merge": [base, adapter], "extract": [base, ft], "unmerge": [base, adapter]}[command]
    out = {"base": base, "adapter": adapter, "ft": ft, "merged": base}[target]
    before = {str(p): fingerprint(p) for p in (base, ft, adapter)}
    extra = ["--rank", "2"] if command == "extract" else []
    result = invoke(runner, command, *inputs, "-o", _same_path_spellings(out)[spelling], "--force", "--device", "cpu",
                    *extra)
    assert_one_line_error(result, "never writes over its inputs")
    assert {str(p): fingerprint(p) for p in (base, ft, adapter)} == before


def test_an_input_given_through_a_symbolic_link_is_still_an_input(runner, pair, tmp_path):
    base, _, adapter = pair
    link = tmp_path / "link-to-base"
    link.symlink_to(base)
    before = fingerprint(base)
    result = invoke(runner, "merge", link, adapter, "-o", base, "--force", "--device", "cpu")
    assert_one_line_error(result, f"output {base} is the input base {link}")
    assert fingerprint(base) == before


def test_a_report_is_never_written_over_a_checkpoint_file(runner, tmp_path):
    base, ft, _ = write_pair(tmp_path / "in", sharded=False)
    b, f = base / "model.safetensors", ft / "model.safetensors"
    before = fingerprint(b)
    for option in ("--json", "--csv", "--save-spectra"):
        result = invoke(runner, "rank", b, f, option, b, "--force", "--device", "cpu")
        assert_one_line_error(result, "never writes over its inputs")
    result = invoke(runner, "rank", base, ft, "--json", base / "model.safetensors", "--force", "--device", "cpu")
    assert_one_line_error(result, "lies inside the input base")
    assert fingerprint(b) == before


def test_outputs_inside_or_around_an_input_are_refused(runner, pair, tmp_path):
    base, ft, adapter = pair
    result = invoke(runner, "merge", base, adapter, "-o", base / "merged", "--device", "cpu")
    assert_one_line_error(result, "lies inside the input base")
    result = invoke(runner, "rank", base, ft, "--json", tmp_path / "in", "--force", "--device", "cpu")
    assert_one_line_error(result, "holds the input base")
    assert not (base / "merged").exists() and base.is_dir()


def test_index_shards_are_inputs_too(runner, pair):
    base, ft, _ = pair
    shard = sorted(base.glob("model-*.safetensors"))[0]
    before = fingerprint(base)
    result = invoke(runner, "rank", base / "model.safetensors.index.json", ft, "--json", shard, "--force",
                    "--device", "cpu")
    assert_one_line_error(result, f"is the input base {base / 'model.safetensors.index.json'}")
    assert fingerprint(base) == before


def test_the_python_api_refuses_inputs_as_outputs(pair):
    base, ft, adapter = pair
    before = {str(p): fingerprint(p) for p in (base, ft, adapter)}
    with pytest.raises(DeltakitError, match="never writes over its inputs, even with force=True"):
        deltakit.merge(base, adapter, base, force=True, device="cpu")
    with pytest.raises(DeltakitError, match="never writes over its inputs"):
        deltakit.unmerge(base, adapter, adapter, force=True, device="cpu")
    with pytest.raises(DeltakitError, match="never writes over its inputs"):
        deltakit.extract_lora(base, ft, ft, rank=2, force=True)
    with pytest.raises(DeltakitError, match="never writes over its inputs"):
        deltakit.scale_intruders(base, ft, f"{base}/.", scale=0.5, force=True)
    assert {str(p): fingerprint(p) for p in (base, ft, adapter)} == before


def test_force_still_replaces_an_output_that_is_not_an_input(runner, pair, tmp_path):
    base, _, adapter = pair
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = invoke(runner, "merge", base, adapter, "-o", out, "--force", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").is_file()


# ---------------------------------------------------------------- 2, 3. reads stay inside the folder


def _point_first_shard_at(base: Path, target: str) -> None:
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


@pytest.fixture
def opened(monkeypatch):
    """Every path os.open is asked for while the test runs."""
    seen: list[str] = []
    real = os.open

    def recording(path, *args, **kwargs):
        seen.append(os.path.realpath(path) if not isinstance(path, int) else str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording)
    return seen


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_an_index_naming_a_shard_outside_its_folder_is_refused_unread(runner, pair, tmp_path, how, opened):
    base, ft, adapter = pair
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(base.glob("model-*.safetensors"))[0]
    (outside / first.name).write_bytes(first.read_bytes())
    _point_first_shard_at(base, f"../../outside/{first.name}" if how == "relative" else str(outside / first.name))
    for args in (("rank", base, ft), ("merge", base, adapter, "-o", tmp_path / "merged")):
        result = invoke(runner, *args, "--device", "cpu")
        assert_one_line_error(result, "a path outside")
    with pytest.raises(DeltakitError, match="reads only files inside the folder it was given"):
        open_checkpoint(base)
    assert not any(path.startswith(str(outside)) for path in opened), [p for p in opened if "outside" in p]
    assert not (tmp_path / "merged").exists()


def test_a_shard_that_links_out_of_its_folder_is_refused(runner, pair, tmp_path):
    base, ft, _ = pair
    outside = tmp_path / "elsewhere.safetensors"
    first = sorted(base.glob("model-*.safetensors"))[0]
    outside.write_bytes(first.read_bytes())
    first.unlink()
    first.symlink_to(outside)
    result = invoke(runner, "rank", base, ft, "--device", "cpu")
    assert_one_line_error(result, "outside")
    with pytest.raises(DeltakitError, match="reads only files inside the folder it was given"):
        open_checkpoint(base)


def test_a_link_inside_the_folder_is_read(runner, pair):
    """A shard that links to another file of the same folder stays inside: read as usual."""
    base, ft, _ = pair
    first = sorted(base.glob("model-*.safetensors"))[0]
    (base / "store").mkdir()
    moved = base / "store" / first.name
    first.rename(moved)
    first.symlink_to(Path("store") / first.name)
    result = invoke(runner, "rank", base, ft, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output


def test_a_hub_cache_snapshot_reads_its_blobs(runner, pair, tmp_path):
    """A Hugging Face cache snapshot's files link into the repository's blobs/: that is inside."""
    base, ft, _ = pair
    repo = tmp_path / "hub" / "models--org--base"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in base.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    result = invoke(runner, "rank", snapshot, ft, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output


def test_a_model_file_that_links_out_is_not_copied(runner, pair, tmp_path):
    base, _, adapter = pair
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (base / "notes.txt").symlink_to(secret)
    (base / "README.md").write_text("a model card")
    result = invoke(runner, "merge", base, adapter, "-o", tmp_path / "merged", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    warnings_ = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings_) == 1 and "notes.txt not copied" in warnings_[0] and "outside" in warnings_[0]
    merged = tmp_path / "merged"
    assert not (merged / "notes.txt").exists() and (merged / "README.md").read_text() == "a model card"
    assert not any(b"do not copy me" in p.read_bytes() for p in merged.iterdir())
    with pytest.warns(deltakit.errors.DeltakitWarning, match="notes.txt not copied"):
        deltakit.merge(base, adapter, tmp_path / "merged-api", device="cpu")
    assert not (tmp_path / "merged-api" / "notes.txt").exists()


def test_a_config_that_links_out_is_refused(runner, pair, tmp_path):
    base, ft, _ = pair
    outside = tmp_path / "config.json"
    outside.write_text(json.dumps({"model_type": "llama"}))
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(outside)
    result = invoke(runner, "rank", base, ft, "--device", "cpu")
    assert_one_line_error(result, "config.json is a symbolic link")


# ---------------------------------------------------------------- 4. only regular files, never a hang


def _run_cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deltakit_cli.console", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("where", ["model.safetensors", "shard", "config.json", "adapter_config.json"])
def test_a_fifo_is_refused_not_waited_on(pair, tmp_path, where):
    base, ft, adapter = pair
    if where == "model.safetensors":
        folder = tmp_path / "fifo-model"
        folder.mkdir()
        os.mkfifo(folder / "model.safetensors")
        args = ("rank", folder, ft)
    elif where == "shard":
        shard = sorted(base.glob("model-*.safetensors"))[0]
        shard.unlink()
        os.mkfifo(shard)
        args = ("merge", base, adapter, "-o", tmp_path / "merged")
    elif where == "config.json":
        (base / "config.json").unlink()
        os.mkfifo(base / "config.json")
        args = ("merge", base, adapter, "-o", tmp_path / "merged")
    else:
        (adapter / "adapter_config.json").unlink()
        os.mkfifo(adapter / "adapter_config.json")
        args = ("rank", base, adapter)
    done = _run_cli(*args, "--device", "cpu")  # a hang fails by the timeout
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "merged").exists()


def test_open_checkpoint_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    error = finishes_within(60, lambda: open_checkpoint(tmp_path / "model.safetensors"))
    assert isinstance(error, DeltakitError) and "is a FIFO, not a regular file" in str(error), repr(error)


# ---------------------------------------------------------------- 6. duplicate header keys


def _header_file(path: Path, raw: bytes, data: int) -> Path:
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * data)
    return path


@pytest.mark.parametrize("first", ['{"dtype":"XX","shape":[2],"data_offsets":[0,8]}',
                                   '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'])
def test_a_duplicate_tensor_key_is_refused(runner, tmp_path, first):
    raw = ('{"a":' + first + ',"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}').encode()
    path = _header_file(tmp_path / "model.safetensors", raw, 8)
    with pytest.raises(DeltakitError, match="tensor a appears twice"):
        read_safetensors_header(path)
    result = invoke(runner, "rank", path, path.with_name("other.safetensors"))
    assert_one_line_error(result)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "ft.safetensors"))
    result = invoke(runner, "rank", path, tmp_path / "ft.safetensors", "--device", "cpu")
    assert_one_line_error(result, "appears twice")


# ---------------------------------------------------------------- 7. signals from the first instruction, write errors


SIGNAL_DURING_IMPORT = """
import importlib.abc, os, signal, sys, time

class Stop(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "deltakit_cli.main":
            os.kill(os.getpid(), signal.{sig})
            time.sleep(30)  # the handler ends the process before this returns
        return None

sys.meta_path.insert(0, Stop())
sys.argv = ["deltakit", "rank", "a", "b"]
from deltakit_cli.console import main
main()
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stop_signal_before_the_command_starts_is_one_line(sig):
    done = subprocess.run([sys.executable, "-c", SIGNAL_DURING_IMPORT.replace("{sig}", sig)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + getattr(signal, sig), (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == [f"Error: interrupted ({sig})"], done.stderr


def test_the_console_script_is_the_one_that_handles_signals_early():
    from importlib.metadata import entry_points

    [script] = [e for e in entry_points(group="console_scripts") if e.name == "deltakit"]
    assert script.value == "deltakit_cli.console:main"


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_a_failure_to_make_the_temporary_output_names_the_output(runner, pair, tmp_path, monkeypatch, code):
    import tempfile

    base, _, adapter = pair
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(out.parent / ".merged.tmp-abcd1234"))

    monkeypatch.setattr(tempfile, "mkdtemp", failing)
    result = invoke(runner, "merge", base, adapter, "-o", out, "--device", "cpu")
    assert_one_line_error(result, f"cannot write {out}: {os.strerror(code)}")
    assert ".tmp-" not in result.stderr
    with pytest.raises(DeltakitError, match=f"cannot write {out}"):
        deltakit.merge(base, adapter, out, device="cpu")


def test_a_full_disk_while_recording_the_owner_names_the_output(runner, pair, tmp_path, monkeypatch):
    base, _, adapter = pair
    out = tmp_path / "merged"
    real_write = os.write

    def full(fd, data):
        if b'"boot_id"' in bytes(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    result = invoke(runner, "merge", base, adapter, "-o", out, "--device", "cpu")
    assert_one_line_error(result, f"cannot write {out}: No space left on device")
    assert list(tmp_path.glob(".merged.tmp-*")) == []


# ---------------------------------------------------------------- 8. transformers Conv1D in any model


class _Conv1dModel(torch.nn.Module):
    """A non-GPT-2 model with transformers Conv1D layers, one square and one not, and an nn.Linear."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": Conv1D(16, 16), "up": Conv1D(24, 16),
                                                                "out": torch.nn.Linear(24, 16)})])


def _save_conv1d_model(folder: Path, config: dict | None) -> _Conv1dModel:
    model = _Conv1dModel()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return model


def _peft_adapter(model, folder: Path, kind: str, fan_in_fan_out: bool, targets: tuple[str, ...] = ("proj", "up")):
    import copy

    from peft import IA3Config, LoraConfig, get_peft_model

    targets = list(targets)
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                            fan_in_fan_out=fan_in_fan_out)
    else:
        config = IA3Config(target_modules=targets, feedforward_modules=["up"], init_ia3_weights=False,
                           fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.uniform_(0.5, 1.5)
    peft_model.save_pretrained(folder)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_square_conv1d_outside_gpt2_merges_as_peft_does(runner, tmp_path, kind):
    model = _save_conv1d_model(tmp_path / "base", {"model_type": "tiny-custom"})
    expected = _peft_adapter(model, tmp_path / "adapter", kind, fan_in_fan_out=True)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    result = invoke(runner, "merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged",
                    "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = model.state_dict()
    for name, value in expected.items():
        scale = float(torch.linalg.vector_norm(value - base[name])) or 1.0
        error = float(torch.linalg.vector_norm(merged[name] - value)) / scale
        assert error < 1e-5, (name, error)
    report = deltakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged-api", device="cpu")
    assert report.lora_modules >= 2


def test_a_square_conv1d_in_a_model_that_mixes_layer_kinds_is_refused(runner, tmp_path):
    """PEFT saves fan_in_fan_out as it set it for the last layer it wrapped (here the nn.Linear): the square
    Conv1D's orientation is not in the files, so merge refuses rather than guess."""
    model = _save_conv1d_model(tmp_path / "base", {"model_type": "tiny-custom"})
    _peft_adapter(model, tmp_path / "adapter", "lora", fan_in_fan_out=True, targets=("proj", "up", "out"))
    result = invoke(runner, "merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged",
                    "--device", "cpu")
    assert_one_line_error(result, "cannot tell whether blocks.0.proj.weight is stored [in, out]")


def test_a_square_conv1d_with_nothing_to_tell_its_orientation_is_refused(runner, tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"h.0.attn.c_attn.weight": torch.randn(16, 16, generator=generator)}, str(base / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_attn"], "fan_in_fan_out": False}))
    save_file({"base_model.model.h.0.attn.c_attn.lora_A.weight": torch.randn(2, 16, generator=generator),
               "base_model.model.h.0.attn.c_attn.lora_B.weight": torch.randn(16, 2, generator=generator)},
              str(adapter / "adapter_model.safetensors"))
    result = invoke(runner, "merge", base, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    assert_one_line_error(result, "cannot tell whether h.0.attn.c_attn.weight is stored [in, out]")
    with pytest.raises(DeltakitError, match="add the model's config.json"):
        deltakit.merge(base, adapter, tmp_path / "merged", device="cpu")


def test_gpt2_conv1d_still_merges_as_peft_does(runner, tmp_path):
    from conftest import merged_lora_copy, save, tiny_gpt2

    model = tiny_gpt2()
    merged, peft_model = merged_lora_copy(model, ["c_attn", "c_proj"], rank=4, fan_in_fan_out=True)
    save(model, tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    result = invoke(runner, "merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged",
                    "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name, value in merged.state_dict().items():
        if name in ours:
            assert torch.allclose(ours[name], value, atol=1e-5), name


# ---------------------------------------------------------------- 9. tall matrices in bounded memory


def test_the_cpu_stream_reads_the_fine_tune_by_row_blocks_and_forms_the_exact_delta(tmp_path, monkeypatch):
    import deltakit.delta as delta_module
    from deltakit.delta import open_delta_source

    generator = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.w.weight": torch.randn(4096, 16, generator=generator).to(torch.bfloat16),
            "model.embed_tokens.weight": torch.randn(300, 16, generator=generator).to(torch.bfloat16)}
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=generator)).to(torch.bfloat16) for k, v in base.items()}
    ft["model.embed_tokens.weight"] = torch.cat([ft["model.embed_tokens.weight"], torch.ones(4, 16, dtype=torch.bfloat16)])
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    monkeypatch.setattr(delta_module, "SUBTRACT_BLOCK_ELEMENTS", 1000)
    source = open_delta_source(tmp_path / "base.safetensors", tmp_path / "ft.safetensors")
    reads: list[tuple[str, int]] = []
    real_get_rows, real_get = type(source.ft).get_rows, type(source.ft).get

    def get_rows(self, name, start, stop, pin=False):
        reads.append((name, stop - start))
        return real_get_rows(self, name, start, stop, pin)

    def get(self, name, *args, **kwargs):
        assert self is not source.ft, f"{name} of the fine-tune was read whole"
        return real_get(self, name, *args, **kwargs)

    monkeypatch.setattr(type(source.ft), "get_rows", get_rows)
    monkeypatch.setattr(type(source.ft), "get", get)
    for item in source.stream(device="cpu"):
        name = item.pair.name
        rows = base[name].shape[0]
        expected = ft[name][:rows].double() - base[name].double()
        assert torch.equal(item.delta.double(), expected), name
        assert item.delta.dtype == torch.float32 and item.base.dtype == torch.bfloat16
    assert reads and max(count * 16 for _, count in reads) <= 1000
    assert sum(count for name, count in reads if "mlp" in name) == 4096


def test_the_cpu_read_ahead_budget_is_capped():
    from deltakit.device.reads import CPU_PREFETCH_BYTES, PREFETCH_BYTES, read_ahead_budget

    assert read_ahead_budget(torch.device("cpu"), PREFETCH_BYTES) == CPU_PREFETCH_BYTES
    assert read_ahead_budget(torch.device("cpu"), None) == CPU_PREFETCH_BYTES
    assert read_ahead_budget(torch.device("cpu"), 1000) == 1000
    assert read_ahead_budget(torch.device("cuda"), PREFETCH_BYTES) == PREFETCH_BYTES


def test_subtracting_a_bf16_base_by_blocks_is_exact(monkeypatch):
    import deltakit.delta as delta_module

    monkeypatch.setattr(delta_module, "SUBTRACT_BLOCK_ELEMENTS", 100)
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(97, 13, generator=generator).to(torch.bfloat16)
    ft = torch.randn(97, 13, generator=generator).to(torch.bfloat16)
    delta = delta_module.subtract_stored(ft.float(), base)
    assert torch.equal(delta, ft.float() - base.float())


def test_narrow_amplification_matches_the_exact_svd():
    from deltakit.spectral.subspace import amplification_factor, narrow_amplification

    generator = torch.Generator().manual_seed(2)
    m, n, k = 3000, 24, 8
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64)
    delta = torch.randn(m, n, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    fro = float(torch.linalg.vector_norm(delta))
    expected = amplification_factor(weight, fro, u[:, :k], vh[:k])
    found = narrow_amplification(weight.float(), delta.float(), fro, k)
    assert found["k"] == k and found["value"] == pytest.approx(expected, rel=1e-4)
    wide = narrow_amplification(weight.T.float(), delta.T.float(), fro, k)  # the same matrix, wide
    assert wide["value"] == pytest.approx(expected, rel=1e-4)
