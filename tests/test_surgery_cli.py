"""The surgery commands from the command line: outputs, one-line errors, nothing half-written."""

import copy
import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, invoke, merged_lora_copy, save, tiny_gpt2, tiny_llama

RANK = 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder, base model, merged model): base/, ft/ and a PEFT adapter peft-adapter/ in folder."""
    folder = tmp_path_factory.mktemp("llama-cli")
    base = tiny_llama()
    merged, peft_model = merged_lora_copy(base, ["q_proj", "v_proj"], RANK)
    save(base, folder / "base")
    save(merged, folder / "ft")
    peft_model.save_pretrained(folder / "peft-adapter")
    return folder, base, merged


def no_leftovers(parent: Path, name: str) -> None:
    """Neither the output nor a temporary folder for it remains."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def test_extract_merge_unmerge_from_the_command_line(llama, runner, tmp_path):
    folder, _, _ = llama
    result = invoke(runner, "extract", folder / "base", folder / "ft", "-o", tmp_path / "adapter", "--rank", RANK,
                    "--json", tmp_path / "extract.json")
    assert result.exit_code == 0, result.output
    assert "adapter written to" in result.stdout and "v_proj" in result.stdout
    report = json.loads((tmp_path / "extract.json").read_text())
    assert report["selection"]["mode"] == "rank" and len(report["matrices"]) == 4
    for matrix in report["matrices"]:
        assert {"name", "rank", "kept_energy", "rel_error"} <= set(matrix)
        assert matrix["rank"] == RANK and matrix["kept_energy"] > 0.999999 and matrix["rel_error"] < 1e-5
    assert len(report["unchanged"]) == 10

    result = invoke(runner, "merge", folder / "base", tmp_path / "adapter", "-o", tmp_path / "merged", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "merged 4 modules of the LoRA adapter" in result.stdout
    result = invoke(runner, "unmerge", tmp_path / "merged", tmp_path / "adapter", "-o", tmp_path / "base-again",
                    "--check", folder / "base", "--json", "-")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)
    assert check["check_max_abs"] < 1e-5 and check["check_rel_fro"] < 1e-6


def test_energy_and_budget_from_the_command_line(llama, runner, tmp_path):
    folder, _, _ = llama
    result = invoke(runner, "extract", folder / "base", folder / "ft", "-o", tmp_path / "energy", "--energy", "0.9",
                    "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passes"] == 2
    result = invoke(runner, "extract", folder / "base", folder / "ft", "-o", tmp_path / "budget", "--budget", "1000",
                    "--max-rank", "2", "-q")
    assert result.exit_code == 0 and result.stdout == "", result.output
    config = json.loads((tmp_path / "budget" / "adapter_config.json").read_text())
    assert max([config["r"], *config["rank_pattern"].values()]) <= 2


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "rank must be at least 1, got 0"),
    (["--rank", "-2"], "rank must be at least 1, got -2"),
    (["--energy", "0"], "energy fraction 0 is outside (0, 1]"),
    (["--energy", "1.5"], "energy fraction 1.5 is outside (0, 1]"),
    (["--budget", "0"], "budget must be at least 1"),
    (["--budget", "50"], "budget 50 is too small for rank 1 anywhere"),
    (["--rank", "4", "--max-rank", "0"], "max-rank must be at least 1"),
    (["--rank", "4", "--energy", "0.9"], "exactly one of --rank, --energy, --budget or --ratio"),
    ([], "exactly one of --rank, --energy, --budget or --ratio"),
    (["--rank", "4", "--dtype", "int8"], "unknown output dtype 'int8'"),
    (["--rank", "4", "--include", "nothing*"], "no tensor pairs left"),
    (["--rank", "4", "--device", "cuda:7"], "cuda:7"),
])
def test_extract_bad_values_are_one_line_errors(llama, runner, tmp_path, args, message):
    folder, _, _ = llama
    result = invoke(runner, "extract", folder / "base", folder / "ft", "-o", tmp_path / "adapter", *args)
    assert_one_line_error(result, message)
    no_leftovers(tmp_path, "adapter")


def test_budget_error_names_the_cheapest_matrix(llama, runner, tmp_path):
    folder, _, _ = llama
    result = invoke(runner, "extract", folder / "base", folder / "ft", "-o", tmp_path / "adapter", "--budget", "95")
    assert_one_line_error(result, "k_proj.weight (32×64), needs 96 parameters per rank")


def write_adapter(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def lora_config(**extra) -> dict:
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], **extra}


def test_adapters_that_do_not_fit_are_refused_by_name(llama, runner, tmp_path):
    folder, _, _ = llama
    gpt2_base = save(tiny_gpt2(), tmp_path / "gpt2")
    result = invoke(runner, "merge", gpt2_base, folder / "peft-adapter", "-o", tmp_path / "out")
    assert_one_line_error(result, "does not fit")
    no_leftovers(tmp_path, "out")

    wrong_shape = write_adapter(tmp_path / "wrong-shape", lora_config(), {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(2, 48),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)})
    result = invoke(runner, "merge", folder / "base", wrong_shape, "-o", tmp_path / "out")
    assert_one_line_error(result, "model.layers.1.self_attn.q_proj")

    unknown = write_adapter(tmp_path / "unknown-module", lora_config(), {
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)})
    result = invoke(runner, "merge", folder / "base", unknown, "-o", tmp_path / "out")
    assert_one_line_error(result, "model.layers.9.self_attn.q_proj.weight")

    whole = write_adapter(tmp_path / "unknown-whole", lora_config(modules_to_save=["extra"]), {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
        "base_model.model.model.extra.weight": torch.zeros(3)})
    result = invoke(runner, "merge", folder / "base", whole, "-o", tmp_path / "out")
    assert_one_line_error(result, "model.extra.weight")
    no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("config, message", [
    (lora_config(use_dora=True), "DoRA module model.layers.0.self_attn.q_proj has no lora_magnitude_vector"),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}, "PREFIX_TUNING (prefix tuning) changes activations"),
    ({"peft_type": "NOT_A_TYPE", "target_modules": ["q_proj"]}, "adapter type NOT_A_TYPE is not supported"),
    (lora_config(use_qalora=True), "QA-LoRA (use_qalora) is not supported"),
    (lora_config(r=3), "rank 2 but the config says r=3"),
])
def test_adapter_kinds_deltakit_does_not_apply_are_refused(llama, runner, tmp_path, config, message):
    folder, _, _ = llama
    adapter = write_adapter(tmp_path / "adapter", config, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)})
    for command in ("merge", "unmerge"):
        result = invoke(runner, command, folder / "base", adapter, "-o", tmp_path / "out")
        assert_one_line_error(result, message)
    no_leftovers(tmp_path, "out")


def test_non_finite_merge_is_refused_and_nothing_written(llama, runner, tmp_path):
    folder, base, _ = llama
    save(copy.deepcopy(base).half(), tmp_path / "base-fp16")
    adapter = write_adapter(tmp_path / "huge", lora_config(), {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.full((2, 64), 300.0),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.full((64, 2), 300.0)})
    result = invoke(runner, "merge", tmp_path / "base-fp16", adapter, "-o", tmp_path / "out")
    assert_one_line_error(result, "model.layers.1.self_attn.q_proj.weight gives non-finite values")
    no_leftovers(tmp_path, "out")
    result = invoke(runner, "merge", tmp_path / "base-fp16", adapter, "-o", tmp_path / "out", "--scale", "nan")
    assert_one_line_error(result, "scale must be a finite number")


def test_existing_output_is_refused_and_left_intact_without_force(llama, runner, tmp_path):
    folder, _, _ = llama
    for command, args in (("extract", [folder / "base", folder / "ft", "--rank", "2"]),
                          ("merge", [folder / "base", folder / "peft-adapter"]),
                          ("unmerge", [folder / "ft", folder / "peft-adapter"])):
        out = tmp_path / f"{command}-out"
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        result = invoke(runner, command, *args, "-o", out)
        assert_one_line_error(result, "already exists; pass --force")
        assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
        result = invoke(runner, command, *args, "-o", out, "--force")
        assert result.exit_code == 0, result.output
        assert not (out / "precious.txt").exists() and (out / "config.json" if command != "extract"
                                                         else out / "adapter_config.json").is_file()
    (tmp_path / "report.json").write_text("{}")
    result = invoke(runner, "extract", folder / "base", folder / "ft", "-o", tmp_path / "new", "--rank", "2",
                    "--json", tmp_path / "report.json")
    assert_one_line_error(result, "report.json already exists")
    no_leftovers(tmp_path, "new")


@pytest.mark.parametrize("command", ["extract", "extract-energy", "merge", "unmerge"])
def test_failure_midway_leaves_no_partial_folder(llama, runner, tmp_path, monkeypatch, command):
    from deltakit.io.writer import ShardedWriter

    folder, _, _ = llama
    calls = {"n": 0}
    original = ShardedWriter.write

    def failing_write(self, name, tensor, start_row=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, name, tensor, start_row)

    monkeypatch.setattr(ShardedWriter, "write", failing_write)
    # One writer thread, so "nothing is written after the failure" is exact: with several, a write
    # another thread had already started when the third failed could still finish.
    monkeypatch.setattr(importlib.import_module("deltakit.lora.merging"), "IO_THREADS", 1)
    args = {
        "extract": ["extract", folder / "base", folder / "ft", "--rank", "2"],
        "extract-energy": ["extract", folder / "base", folder / "ft", "--energy", "0.5"],
        "merge": ["merge", folder / "base", folder / "peft-adapter"],
        "unmerge": ["unmerge", folder / "ft", folder / "peft-adapter", "--check", folder / "base"],
    }[command]
    result = invoke(runner, *args, "-o", tmp_path / "out")
    assert_one_line_error(result, "No space left on device")
    assert calls["n"] == 3
    no_leftovers(tmp_path, "out")


def test_unmerge_refuses_whole_tensors_unless_kept(llama, runner, tmp_path):
    folder, base, _ = llama
    tensors = load_file(folder / "peft-adapter" / "adapter_model.safetensors")
    norm = base.model.norm.weight.detach() * 2
    adapter = write_adapter(tmp_path / "with-norm", {**json.loads((folder / "peft-adapter" / "adapter_config.json")
                                                                  .read_text()), "modules_to_save": ["model.norm"]},
                            {**tensors, "base_model.model.model.norm.weight": norm})
    result = invoke(runner, "merge", folder / "base", adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(tmp_path / "merged" / "model.safetensors")["model.norm.weight"], norm)
    result = invoke(runner, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out")
    assert_one_line_error(result, "cannot restore them")
    no_leftovers(tmp_path, "out")
    result = invoke(runner, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out", "--keep-replaced",
                    "--check", folder / "base")
    assert result.exit_code == 0, result.output
    assert "warning: 1 tensors the adapter replaced whole are left as merged" in result.stderr
    assert "model.norm.weight" in result.stdout  # the worst tensor of --check


def test_missing_inputs_are_one_line_errors(llama, runner, tmp_path):
    folder, _, _ = llama
    result = invoke(runner, "extract", tmp_path / "nope", folder / "ft", "-o", tmp_path / "a", "--rank", "2")
    assert_one_line_error(result, "no such file or folder")
    result = invoke(runner, "merge", folder / "base", folder / "ft", "-o", tmp_path / "a")
    assert_one_line_error(result, "not a PEFT adapter folder")
    result = invoke(runner, "extract", folder / "peft-adapter", folder / "ft", "-o", tmp_path / "a", "--rank", "2")
    assert_one_line_error(result, "is a PEFT adapter; extract needs the full base model as BASE")
    result = invoke(runner, "unmerge", folder / "ft", folder / "peft-adapter", "-o", tmp_path / "a", "--check",
                    tmp_path / "nope")
    assert_one_line_error(result, "no such file or folder")
    no_leftovers(tmp_path, "a")
