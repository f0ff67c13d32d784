"""The benchmark suite (bench/): every target and peer on the tiny pair end to end, the rows it records, the
before/after and tall-pair forms, and checks that catch a wrong output. No timing is asserted."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives beside the package, not in it

from bench import run  # noqa: E402
from bench.pair import PRESETS, Checkpoint, Preset, write_pair  # noqa: E402
from bench.targets import (  # noqa: E402
    Run, Truth, check_activation_aware, check_adapter, check_compare, check_intruders, check_merge, check_rank,
)


@pytest.fixture(autouse=True)
def one_thread_per_child(monkeypatch):
    """The children start one OpenMP thread each: on a small shared machine spinning threads made the same
    tiny command take 0.2 s or 5 s."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_suite(tmp_path: Path, *argv: str) -> tuple[int, dict, Path]:
    work = tmp_path / "work"
    code = run.main(["--device", "cpu", "--workdir", str(work), "--out", str(tmp_path / "out"), "--keep-outputs",
                     *argv])
    return code, json.loads((tmp_path / "out" / "results.json").read_text()), work


def rows_by_name(result: dict) -> dict[tuple[str, bool], dict]:
    return {(row["target"], row["peer"]): row for row in result["rows"]}


def truth_and_run(work: Path, preset: str = "tiny") -> tuple[Truth, Run]:
    pair = json.loads((work / "pair" / "pair.json").read_text())
    base, ft = Path(pair["base"]), Path(pair["ft"])
    truth = Truth(Checkpoint(base), Checkpoint(ft), 0, torch.device("cpu"))
    return truth, Run(work / "runs" / "this-tree", base, ft, PRESETS[preset].extract_rank, "cpu")


def rewrite(path: Path, change) -> None:
    """Apply ``change`` to one safetensors file's tensors (a dict) and write it back."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_spectra_targets_and_the_svdvals_peer_run_and_checks_catch_wrong_reports(tmp_path):
    code, result, work = run_suite(tmp_path, "--preset", "tiny", "--target", "rank,rank-full,intruders", "--peers")
    rows = rows_by_name(result)
    assert code == 0 and set(rows) == {("rank", False), ("rank", True), ("rank-full", False), ("intruders", False)}
    for row in rows.values():
        assert row["status"] == "ok" and row["check"]["ok"], row
        assert row["wall_s"] > 0 and row["floor_s"] > 0 and row["read_bytes"] == sum(result["pair"]["bytes"].values())
        assert row["peak_rss_mb"] > 50 and row["rss_source"] in ("/usr/bin/time -v", "wait4 rusage (ru_maxrss)")
        assert row["gpu_peak_reserved_mb"] == 0
    assert rows[("rank", False)]["deltakit_file"].startswith(str(run.REPO))
    assert rows[("rank", False)]["check"]["matrices"] == 16 == rows[("rank", False)]["check"]["equal"]
    assert rows[("rank", False)]["agreement_with_full"]["rank_at"] == 16  # the CPU's default is the full path
    assert rows[("rank", True)]["label"] == "plain loop: torch.linalg.svdvals"
    assert "rank@90%" in (tmp_path / "out" / "results.md").read_text()

    truth, the_run = truth_and_run(work)
    report = json.loads(the_run.out("rank.json").read_text())
    report["matrices"][3]["rank_at"]["0.9"] += 2
    (tmp_path / "wrong.json").write_text(json.dumps(report))
    assert not check_rank(truth, the_run, tmp_path / "wrong.json")["ok"]
    report["matrices"][3]["rank_at"]["0.9"] -= 2
    del report["matrices"][5]
    (tmp_path / "wrong.json").write_text(json.dumps(report))
    assert check_rank(truth, the_run, tmp_path / "wrong.json")["missing"]

    intruders = json.loads(the_run.out("intruders.json").read_text())
    matrix = next(m for m in intruders["matrices"] if "q_proj" in m["name"])
    matrix["similarities"][0] = 0.3  # an intruder the exact vectors do not have
    (tmp_path / "wrong.json").write_text(json.dumps(intruders))
    assert not check_intruders(truth, the_run, tmp_path / "wrong.json")["ok"]


def test_surgery_targets_and_peers_run_and_checks_catch_wrong_outputs(tmp_path):
    # merge first: it needs an adapter, which the runner makes (untimed) before its row
    code, result, work = run_suite(tmp_path, "--preset", "tiny", "--target", "merge,compare,extract", "--peers")
    rows = rows_by_name(result)
    assert code == 0 and set(rows) == {("merge", False), ("merge", True), ("compare", False), ("extract", False),
                                       ("extract", True)}
    assert rows[("extract", True)]["status"] in ("ok", "skipped: mergekit not importable")
    assert rows[("merge", True)]["status"] in ("ok", "skipped: peft not importable")
    for row in (rows[key] for key in rows if rows[key]["status"] != "ok"):
        assert row["status"].startswith("skipped")
    truth, the_run = truth_and_run(work)
    assert (the_run.folder / "prepare-extract.out").is_file()
    assert rows[("merge", False)]["write_bytes"] == sum(p.stat().st_size for p in the_run.out("merged").rglob("*")
                                                          if p.is_file())
    assert rows[("merge", False)]["read_bytes"] < sum(result["pair"]["bytes"].values())  # BASE and the adapter
    assert rows[("extract", False)]["check"]["worst_ratio"] <= 1.01
    assert rows[("merge", False)]["check"]["max_deviation"] < 0.05
    assert rows[("compare", False)]["check"]["min_overlap"] > 0.9

    original = the_run.out("adapter")
    wrong = tmp_path / "adapter-wrong"
    shutil.copytree(original, wrong)
    rewrite(wrong / "adapter_model.safetensors",
            lambda t: t.update({k: v * 1.2 for k, v in t.items() if "layers.1.mlp.up_proj.lora_B" in k}))
    assert not check_adapter(truth, the_run, wrong)["ok"]
    compare = json.loads(the_run.out("compare.json").read_text())
    compare["matrices"][2]["cosine"] -= 0.01
    the_run.out("compare.json").write_text(json.dumps(compare))
    assert not check_compare(truth, the_run, the_run.out("compare.json"))["ok"]

    merged = the_run.out("merged")
    name = "model.layers.0.self_attn.v_proj.weight"
    shard = next(f for f in merged.glob("*.safetensors") if name in safe_open(str(f), framework="pt").keys())
    rewrite(shard, lambda t: t.update({name: truth.base.get(name)}))  # that matrix's update left out
    assert check_merge(truth, the_run, merged)["max_deviation"] > 0.5
    assert not check_merge(truth, the_run, merged)["ok"]


def test_unet_kohya_extract_and_the_lycoris_peer_include_convolutions(tmp_path):
    """tiny-unet: deltakit's kohya file and LyCORIS's extract_linear / extract_conv peer both hold every
    convolution (LoCon, or whole where LyCORIS stores it so: conv_out, 4 outputs at rank 4), checked as
    (out, in·kh·kw) matrices against the exact truncated SVD; the check catches a wrong LoCon factor."""
    code, result, work = run_suite(tmp_path, "--preset", "tiny-unet", "--target", "extract-kohya", "--peers")
    rows = rows_by_name(result)
    assert code == 0 and set(rows) == {("extract-kohya", False), ("extract-kohya", True)}
    for row in rows.values():
        assert row["status"] == "ok" and row["check"]["ok"], row
        assert row["check"]["convolutions"] > 10 and row["check"]["covered"] == 1
    truth, the_run = truth_and_run(work, "tiny-unet")
    with safe_open(str(the_run.out("lycoris.safetensors")), framework="pt") as handle:
        assert "lora_unet_conv_out.diff" in handle.keys()
        assert handle.get_slice("lora_unet_conv_in.lora_down.weight").get_shape() == [4, 4, 3, 3]
    wrong = tmp_path / "wrong.safetensors"
    shutil.copy(the_run.out("lora.safetensors"), wrong)
    scaled = []

    def scale_first_conv1(tensors: dict) -> None:  # each block's first resnet conv1, in LDM names (SDXL-shaped)
        scaled.extend(k for k in tensors if "_0_in_layers_2.lora_up" in k)
        tensors.update({k: tensors[k] * 1.2 for k in scaled})

    rewrite(wrong, scale_first_conv1)
    assert scaled
    assert not check_adapter(truth, the_run, wrong)["ok"]


def test_activation_aware_extract_runs_and_its_check_catches_a_wrong_output_error(tmp_path):
    pytest.importorskip("transformers")
    code, result, work = run_suite(tmp_path, "--preset", "tiny", "--target", "extract,extract-aware")
    rows = rows_by_name(result)
    assert code == 0 and rows[("extract-aware", False)]["status"] == "ok", rows[("extract-aware", False)]
    check = rows[("extract-aware", False)]["check"]
    assert check["max_gap"] <= 0.02 and max(check["ratios"]) <= 1.01 and check["kl"] < check["kl_base"]
    assert rows[("extract-aware", False)]["read_bytes"] > 2 * rows[("extract", False)]["read_bytes"] * 0.99
    truth, the_run = truth_and_run(work)
    the_run.calibration = work / "pair" / "calib.safetensors"
    report = json.loads(the_run.out("extract-aware.json").read_text())
    for matrix in report["matrices"]:
        if matrix["name"] == "model.layers.0.self_attn.k_proj.weight":
            matrix["output_error"] *= 1.05
    the_run.out("extract-aware.json").write_text(json.dumps(report))
    assert not check_activation_aware(truth, the_run, the_run.out("adapter-aware"))["ok"]


def test_before_and_after_run_each_target_on_both_trees_in_one_run(tmp_path):
    code, result, _ = run_suite(tmp_path, "--preset", "tiny", "--target", "rank", "--baseline", "HEAD")
    before, after = result["rows"]
    assert code == 0 and before["status"] == after["status"] == "ok"
    assert before["tree"].startswith("before: ") and after["tree"].startswith("after: ")
    baseline = tmp_path / "work" / f"tree-{before['tree'].removeprefix('before: ')}"
    assert before["deltakit_file"] == str(baseline / "deltakit" / "__init__.py")  # not the installed tree
    assert after["deltakit_file"] == str(run.REPO / "deltakit" / "__init__.py")
    assert "after ÷ before" in (tmp_path / "out" / "results.md").read_text()


def test_tall_pair_row_reports_peak_rss_beside_one_tensors_fp32_size(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tall-test", Preset(hidden=64, layers=3, tall_rows=8192, targets=("rank",)))
    code, result, work = run_suite(tmp_path, "--preset", "tall-test")
    (row,) = result["rows"]
    assert code == 0 and row["status"] == "ok" and row["check"]["equal"] == 3
    assert result["pair"]["largest_fp32_bytes"] == 8192 * 64 * 4
    assert [Path(f).name for f in result["pair"]["files"]["base"]] == ["base.safetensors"]
    assert row["rss_source"] == ("/usr/bin/time -v" if run.TIME else "wait4 rusage (ru_maxrss)")
    assert "RSS ÷ largest fp32 tensor" in (tmp_path / "out" / "results.md").read_text()
    written = (work / "pair" / "base.safetensors").stat().st_mtime_ns
    assert write_pair(work / "pair", PRESETS["tall-test"]) == result["pair"]  # the same pair is reused, not rewritten
    assert (work / "pair" / "base.safetensors").stat().st_mtime_ns == written


def test_a_failing_command_is_a_failed_row_and_an_unknown_target_an_error(tmp_path):
    code, result, _ = run_suite(tmp_path, "--preset", "tiny", "--target", "rank", "--device", "cuda:7")
    assert code == 1 and result["rows"][0]["status"].startswith("failed (rc 1): Error:")
    with pytest.raises(SystemExit):
        run.parse_args(["--target", "rank,ranks"])


@pytest.mark.parametrize("preset", ["sdxl-unet", "tiny-unet"])
def test_unet_presets_are_diffusers_unets(preset):
    """The UNet presets' tensors are, name for name and shape for shape, what diffusers' UNet2DConditionModel
    builds from the config.json written beside them (on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    from bench.pair import layout, unet_config

    config = {k: v for k, v in unet_config(PRESETS[preset]).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    expected = {name: tuple(t.shape) for name, t in unet.state_dict().items()}
    assert dict(layout(PRESETS[preset])) == expected
    if preset == "sdxl-unet":
        assert sum(t.numel() for t in unet.state_dict().values()) == 2_567_463_684  # SDXL's UNet
