"""`deltakit rank` / `deltakit demo` from the command line: outputs, the JSON contract, one-line errors."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from deltakit.demo import DEMO_LORA_RANK, write_demo_pair
from deltakit.io.spectra import load_spectra

from conftest import assert_one_line_error, invoke, low_rank

MATRIX_KEYS = {"name", "shape", "dtype", "delta_fro", "rel_delta", "spectral_norm", "rank", "stable_rank",
               "effective_rank", "rank_at", "random_rank_at", "noise_share", "unchanged_fraction", "signal_rank_at",
               "signal_effective_rank", "spectrum_method"}


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    return write_demo_pair(tmp_path_factory.mktemp("demo"))


def test_json_contract(demo_pair, runner, tmp_path):
    base, ft = demo_pair
    out = tmp_path / "r.json"
    result = invoke(runner, "rank", base, ft, "--energy", "0.5", "--energy", "0.9", "--json", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {"base", "ft", "energy", "matrices", "skipped", "summary"} <= set(data)
    assert data["energy"] == [0.5, 0.9]
    assert data["base"] == str(base) and data["ft"] == str(ft)
    for m in data["matrices"]:
        assert MATRIX_KEYS <= set(m)
        assert set(m["rank_at"]) == {"0.5", "0.9"} and set(m["random_rank_at"]) == {"0.5", "0.9"}
        assert set(m["signal_rank_at"]) == {"0.5", "0.9"} and m["spectrum_method"] == "gram"
    assert set(data["summary"]["noise_dominated"]) == {"0.5", "0.9"}
    by_name = {m["name"]: m for m in data["matrices"]}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q["rank"] == DEMO_LORA_RANK and q["dtype"] == "bfloat16" and q["shape"] == [128, 128]
    k = by_name["model.layers.0.self_attn.k_proj.weight"]
    assert k["rank"] == 0 and k["rank_at"]["0.9"] == 0 and k["delta_fro"] == 0
    summary = data["summary"]["by_module_type"]
    assert summary["q"]["mean_rank"] == DEMO_LORA_RANK and summary["k"]["mean_rank"] == 0
    assert set(data["summary"]["by_layer"]) == {"0", "1", "2", "3", "none"}


def test_table_csv_and_spectra(demo_pair, runner, tmp_path):
    base, ft = demo_pair
    result = invoke(runner, "rank", base, ft, "--device", "cpu", "--csv", tmp_path / "r.csv",
                    "--save-spectra", tmp_path / "s.safetensors", "--include", "*self_attn*")
    assert result.exit_code == 0, result.output
    assert "by module type" in result.stdout and "model.layers.3.self_attn.v_proj.weight" in result.stdout
    assert "mlp" not in result.stdout
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 16 and {r["rank"] for r in rows if "q_proj" in r["name"]} == {str(DEMO_LORA_RANK)}
    spectra, info = load_spectra(tmp_path / "s.safetensors")
    s = spectra["model.layers.1.self_attn.v_proj.weight"]
    assert s.shape == (128,) and (s[:-1] >= s[1:]).all() and s[DEMO_LORA_RANK] < 1e-2 * s[0]
    assert info["matrices"]["model.layers.1.self_attn.v_proj.weight"]["module_type"] == "v"


def test_exact_and_gram_agree_on_demo(demo_pair):
    import deltakit

    gram = deltakit.rank(*demo_pair, energy=(0.5, 0.9, 0.99))
    exact = deltakit.rank(*demo_pair, energy=(0.5, 0.9, 0.99), options=deltakit.SpectralOptions(exact=True, precision="fp64"))
    for a, b in zip(gram.matrices, exact.matrices):
        assert a.name == b.name and a.rank == b.rank or abs(a.rank - b.rank) <= 1, (a.name, a.rank, b.rank)
        for e in (0.5, 0.9, 0.99):
            assert abs(a.rank_at[e] - b.rank_at[e]) <= 1


def test_existing_output_needs_force(demo_pair, runner, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("keep me")
    result = invoke(runner, "rank", *demo_pair, "--json", out)
    assert_one_line_error(result, "--force")
    assert out.read_text() == "keep me"
    assert invoke(runner, "rank", *demo_pair, "--json", out, "--force", "-q").exit_code == 0
    assert json.loads(out.read_text())["matrices"]


def write_pair(folder, base_tensors, ft_tensors):
    (folder / "base").mkdir()
    (folder / "ft").mkdir()
    save_file(base_tensors, folder / "base" / "model.safetensors")
    save_file(ft_tensors, folder / "ft" / "model.safetensors")
    return folder / "base", folder / "ft"


def test_known_rank_fp32_pair(runner, tmp_path):
    w = torch.randn(80, 60) * 0.02
    delta = low_rank(80, 60, 5, scale=0.01).float()
    base, ft = write_pair(tmp_path, {"layers.0.q_proj.weight": w}, {"layers.0.q_proj.weight": w + delta})
    result = invoke(runner, "rank", base, ft, "--json", "-", "--device", "cpu")
    data = json.loads(result.stdout)
    assert data["matrices"][0]["rank"] == 5
    assert data["matrices"][0]["spectral_norm"] == pytest.approx(0.05, rel=1e-5)
    assert data["matrices"][0]["stable_rank"] == pytest.approx(55 / 25, rel=1e-4)


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "corrupt", "pickle", "disjoint", "energy0",
                                  "energy_big", "bad_device"])
def test_bad_input_one_line_error(case, runner, tmp_path):
    w = {"a.weight": torch.randn(4, 4)}
    base, ft = write_pair(tmp_path, w, w)
    args = ["rank", base, ft]
    if case == "missing":
        args = ["rank", base, tmp_path / "does-not-exist"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args = ["rank", base, tmp_path / "empty"]
    elif case == "truncated":
        data = (ft / "model.safetensors").read_bytes()
        (ft / "model.safetensors").write_bytes(data[: len(data) - 20])
    elif case == "corrupt":
        (ft / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-garbage!")
    elif case == "pickle":
        (ft / "model.safetensors").unlink()
        torch.save(w, ft / "pytorch_model.bin")
    elif case == "disjoint":
        save_file({"z.weight": torch.randn(4, 4)}, ft / "model.safetensors")
    elif case == "energy0":
        args += ["--energy", "0"]
    elif case == "energy_big":
        args += ["--energy", "1.5"]
    elif case == "bad_device":
        args += ["--device", "tpu"]
    expected = {"missing": "no such file", "empty": "no weights", "truncated": "truncated", "corrupt": "",
                "pickle": "--allow-pickle", "disjoint": "share no tensor", "energy0": "outside (0, 1]",
                "energy_big": "outside (0, 1]", "bad_device": "device"}[case]
    assert_one_line_error(invoke(runner, *args), expected)


def test_pickle_with_flag_works(runner, tmp_path):
    w = torch.randn(6, 6)
    (tmp_path / "b").mkdir(), (tmp_path / "f").mkdir()
    torch.save({"x.weight": w}, tmp_path / "b" / "pytorch_model.bin")
    torch.save({"x.weight": w + low_rank(6, 6, 2).float()}, tmp_path / "f" / "pytorch_model.bin")
    result = invoke(runner, "rank", tmp_path / "b", tmp_path / "f", "--allow-pickle", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["matrices"][0]["rank"] == 2


def test_console_script_demo_runs_without_arguments():
    """The README's first command: the installed console script on the embedded default."""
    result = subprocess.run([sys.executable, "-m", "deltakit_cli.main", "demo", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if "self_attn.q_proj" in l]
    assert len(lines) == 4 and all(l.split()[4] == str(DEMO_LORA_RANK) for l in lines)


def test_help_teaches(runner):
    result = invoke(runner, "rank", "--help")
    assert result.exit_code == 0 and "Examples:" in result.output and "--energy" in result.output


def test_console_script_leaves_its_objects_to_the_os(monkeypatch):
    """main() freezes the collector when the command is done, so the interpreter's shutdown does
    not walk torch's objects (docs/benchmarks.md has what that saves)."""
    import gc

    from deltakit_cli.main import main

    monkeypatch.setattr(sys, "argv", ["deltakit", "--version"])
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as stop:
            main()
        assert stop.value.code in (0, None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
