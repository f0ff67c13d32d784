"""A first hour without surprises: one error style, fast start-up, messages that say what happened.

Each test is one case of issue 16: a mistake a new user makes, and the line they should get.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deltakit.demo import write_demo_pair
from deltakit.errors import DeltakitError
from deltakit.io import check_output_path

from conftest import assert_one_line_error, invoke


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    return write_demo_pair(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("args, message, command", [
    (["rank", "a", "b", "--bogus"], "no such option '--bogus'", "deltakit rank"),
    (["rank", "a"], "missing argument 'FT'", "deltakit rank"),
    (["plot", "s.safetensors", "-o", "x.png", "--energy", "1.5"], "1.5 is outside (0, 1]", "deltakit plot"),
    (["plot", "s.safetensors", "-o", "x.png", "--kind", "pie"], "'pie' is not one of", "deltakit plot"),
    (["extract", "a", "b", "--rank", "eight"], "'eight' is not a valid integer", "deltakit extract"),
    (["merge", "a", "b"], "missing option '-o' / '--output'", "deltakit merge"),
    (["rnak", "a", "b"], "no such command 'rnak'", "deltakit"),
])
def test_usage_errors_are_one_line_exit_1_with_the_help_to_read(runner, args, message, command):
    """click's own errors used to be a usage block, a hint and the error, exit 2."""
    result = invoke(runner, *args)
    assert result.exit_code == 1
    assert_one_line_error(result, message)
    assert result.stderr.strip().endswith(f"(see '{command} --help')"), result.stderr
    assert "Usage:" not in result.output


def test_deltakit_alone_prints_the_help(runner):
    result = invoke(runner)
    assert result.exit_code == 0 and "Start here:" in result.stdout and "Error" not in result.output


def test_help_version_and_usage_errors_do_not_import_the_library():
    """`--help`, `--version` and usage errors answer before torch, numpy or matplotlib is imported."""
    script = """
import json, sys
from deltakit_cli.main import cli
codes = []
for args in (["--help"], ["--version"], ["rank", "--help"], ["rank", "a", "b", "--bogus"],
             ["plot", "s", "-o", "x.png", "--energy", "1.5"], ["demo", "--help"]):
    try:
        cli.main(args, prog_name="deltakit")
    except SystemExit as exc:
        codes.append(exc.code)
heavy = ("torch", "numpy", "matplotlib", "safetensors", "scipy", "deltakit")
print(json.dumps({"codes": codes, "loaded": [m for m in heavy if m in sys.modules]}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"codes": [0, 0, 0, 1, 1, 0], "loaded": []}, result.stderr


def test_version_is_the_package_version(runner):
    import deltakit

    result = invoke(runner, "--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"deltakit, version {deltakit.__version__}"
    import importlib.metadata

    assert importlib.metadata.version("deltakit") == deltakit.__version__  # pyproject reads it from there


@pytest.mark.parametrize("command, flags", [
    ("plot", ("-o", "--output")),
    ("intruders", ("-o", "--output")),
    ("extract", ("-o", "--output")),
    ("merge", ("-o", "--output")),
    ("unmerge", ("-o", "--output")),
])
def test_the_output_flag_is_output_everywhere(runner, command, flags):
    """`-o/--output` on every command that writes a file or folder (cli/options.py); `--out` is a hidden alias."""
    result = invoke(runner, command, "--help")
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("-o, "))
    assert line.split()[:len(flags)] == [f + "," if i < len(flags) - 1 else f for i, f in enumerate(flags)]
    assert "--out " not in result.stdout and "--out," not in result.stdout  # the old spelling stays hidden


@pytest.mark.parametrize("spelling", ["-o", "--out", "--output"])
def test_plot_accepts_each_spelling_of_output(runner, tmp_path, spelling):
    """Parsing succeeds with every spelling: the error is about the missing file, not the flag."""
    result = invoke(runner, "plot", tmp_path / "none.safetensors", spelling, tmp_path / "x.png")
    assert_one_line_error(result, "no such spectra file")


def test_intruders_scale_needs_out(runner, tmp_path):
    """Checked before any file is opened."""
    assert_one_line_error(invoke(runner, "intruders", tmp_path, tmp_path, "--scale", "0"), "-o/--output")


def test_demo_keep_refuses_a_non_empty_folder(runner, tmp_path):
    folder = tmp_path / "pair"
    (folder / "base").mkdir(parents=True)
    stray = folder / "base" / "model.safetensors"
    stray.write_bytes(b"a stray file a new index would sit beside")
    result = invoke(runner, "demo", "--keep", folder, "--device", "cpu")
    assert_one_line_error(result, f"{folder} is not empty (base); choose a new folder, or pass --force")
    assert "force=True" not in result.stderr
    assert sorted(p.name for p in folder.rglob("*")) == ["base", "model.safetensors"]  # untouched

    result = invoke(runner, "demo", "--keep", folder, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert not stray.exists()  # base/ was replaced whole: the pair is exactly the demo pair
    index = json.loads((folder / "base" / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in (folder / "base").glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    assert f"demo pair written to {folder};" in result.stderr


def test_demo_keep_into_a_new_or_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new" / "nested", tmp_path / "empty"):
        base, ft = write_demo_pair(folder)
        assert (base / "config.json").is_file() and (ft / "model.safetensors.index.json").is_file()
    with pytest.raises(DeltakitError, match=r"not empty .*force=True \(--force\)"):
        write_demo_pair(tmp_path / "empty")


def test_demo_without_keep_says_the_pair_is_temporary(runner):
    result = invoke(runner, "demo", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "temporary folder, deleted when this command ends (--keep DIR keeps it)" in result.stderr
    assert "next:" not in result.stderr  # no command pointing at a folder that is gone


def test_demo_help_has_examples(runner):
    result = invoke(runner, "demo", "--help")
    assert result.exit_code == 0 and "Examples:" in result.stdout and "deltakit demo --keep demo" in result.stdout


def test_plot_of_the_json_report_says_so(runner, demo_pair, tmp_path):
    """The JSON that rank writes beside the spectra file is the likeliest thing to pass to plot."""
    report = tmp_path / "report.json"
    assert invoke(runner, "rank", *demo_pair, "--json", report, "-q", "--device", "cpu").exit_code == 0
    result = invoke(runner, "plot", report, "-o", tmp_path / "x.png")
    assert_one_line_error(result, f"{report} is a JSON report, not a spectra file")
    assert "--save-spectra" in result.stderr and "header" not in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_of_another_file_names_the_spectra_option(runner, tmp_path):
    weights = tmp_path / "garbage.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-garbage!")
    assert_one_line_error(invoke(runner, "plot", weights, "-o", tmp_path / "x.png"), "--save-spectra")


def _write(folder, tensors):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_rank_with_nothing_left_says_what_happened(runner, tmp_path):
    """Every shape differs, and no filter was given: the message counts instead of blaming --include."""
    base = _write(tmp_path / "base", {**{f"layers.{i}.q.weight": torch.zeros(8, 8) for i in range(3)},
                                      "layers.0.k.weight": torch.zeros(4, 4), "old.weight": torch.zeros(2)})
    ft = _write(tmp_path / "ft", {**{f"layers.{i}.q.weight": torch.zeros(6, 8) for i in range(3)},
                                  "layers.0.k.weight": torch.zeros(4, 5), "new.weight": torch.zeros(2),
                                  "new2.weight": torch.zeros(2)})
    result = invoke(runner, "rank", base, ft)
    assert_one_line_error(result, "no tensor pairs left to compare: 4 names matched; 4 differ in shape "
                                  "(first layers.0.k.weight: base (4, 4) vs fine-tune (4, 5)); "
                                  "1 name only in the base, 2 only in the fine-tune")
    assert "--include" not in result.stderr
    filtered = invoke(runner, "rank", base, ft, "--include", "layers.1.*")
    assert_one_line_error(filtered, "4 names matched; 3 left out by the include / exclude globs; 1 differ in shape")


def test_api_errors_speak_python_and_the_cli_speaks_flags(runner, tmp_path, monkeypatch):
    target = tmp_path / "exists.json"
    target.write_text("{}")
    with pytest.raises(DeltakitError, match=r"pass force=True \(--force\) to overwrite it"):
        check_output_path(target, force=False)

    from deltakit.device.placement import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeltakitError, match=r"use device='cpu' \(--device cpu\)"):
        resolve_device("cuda")
    result = invoke(runner, "rank", tmp_path, tmp_path, "--device", "cuda")
    assert_one_line_error(result, "no CUDA GPU is available; use --device cpu")
    assert "device='cpu'" not in result.stderr


def test_plot_functions_take_spectra_then_info(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltakit import plot

    spectra = {f"model.layers.{i}.self_attn.q_proj.weight": np.array([3.0, 2.0, 1.0, 0.0]) for i in range(2)}
    info = {"matrices": {name: {"shape": [4, 4], "module_type": "q", "layer": i, "rank_at": {"0.9": 3}}
                         for i, name in enumerate(spectra)}}
    functions = (plot.plot_overview, plot.plot_energy_curves, plot.plot_error_vs_rank, plot.plot_rank_heatmap,
                 plot.rank_grid)
    try:
        for function in functions:
            function(spectra, info)  # the one order
            with pytest.raises(TypeError, match=rf"{function.__name__}\(spectra, info, ...\).*swapped"):
                function(info, spectra)
            with pytest.raises(TypeError):  # energy and the rest are keyword-only
                function(spectra, info, 0.5)
        assert plot.rank_grid(None, info, energy=0.9).ranks.tolist() == [[3.0, 3.0]]
    finally:
        plt.close("all")
