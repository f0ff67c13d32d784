"""Work split over processes: balanced partition, and a 2-process gloo run equal to a single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


from deltakit.demo import write_demo_pair
from deltakit.distributed import matrix_cost, partition


def test_partition_covers_everything_once_and_balances():
    costs = [matrix_cost(s) for s in [(4096, 4096)] * 4 + [(11008, 4096)] * 3 + [(4096,)] * 5]
    shares = partition(costs, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) <= 4 / 3 * (sum(costs) / 3 + max(costs))
    assert partition(costs, 3) == shares  # deterministic: every process computes the same split
    assert partition(costs, 1) == [list(range(len(costs)))]


def test_matrix_cost_grows_with_size():
    assert matrix_cost((64, 64)) < matrix_cost((128, 64)) < matrix_cost((128, 128))
    assert matrix_cost((10,)) < matrix_cost((2, 2))


def test_reports_name_the_device_as_one_process_would():
    """Under torchrun each process computes on its own GPU; the report names the kind, like one
    process asked for --device cuda (or auto), so the JSON is the same either way."""
    from deltakit.distributed import Parallel, process_device, reported_device

    two = Parallel(rank=1, world_size=2, device="cpu")
    assert process_device(two, "cuda:0") == torch.device("cpu")  # the process's own device, not the asked one
    assert reported_device(two, torch.device("cuda:1")) == "cuda"
    assert reported_device(Parallel(), torch.device("cuda:1")) == "cuda:1"
    assert reported_device(Parallel(), torch.device("cuda")) == "cuda"
    assert reported_device(two, process_device(two, "auto")) == reported_device(Parallel(), torch.device("cpu")) == "cpu"


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same matmul order in every process


def command_line(*args, processes: int = 1) -> list[str]:
    """The CLI in one process, or under torchrun with ``processes`` gloo workers.

    ``--standalone``: torchrun's rendezvous store binds port 0, so the system picks a free port
    and tests running in parallel never collide on one.
    """
    if processes == 1:
        command = [sys.executable, "-m", "deltakit_cli.main", *args]
    else:
        # torchrun is `python -m torch.distributed.run`; the module form needs no script on PATH.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "deltakit_cli.main", *args]
    return [str(c) for c in command]


def deltakit(*args, processes: int = 1) -> subprocess.CompletedProcess:
    """Run the CLI (see :func:`command_line`) to completion."""
    return subprocess.run(command_line(*args, processes=processes), env=ENV, capture_output=True, text=True,
                          timeout=300)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-2000:]


def report(path: Path, *paths: str) -> dict:
    """A JSON report without its timing and without the given output-path keys."""
    data = json.loads(path.read_text())
    for key in ("elapsed_s", *paths):
        data.pop(key)
    return data


def same_files(a: Path, b: Path) -> list[str]:
    """The two folders hold the same file names with the same bytes; return the names."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_pair(tmp_path_factory.mktemp("pair"))


def test_rank_two_gloo_processes_match_single_process(tmp_path, demo):
    base, ft = demo
    common = ("rank", base, ft, "-q", "--device", "cpu", "--energy", "0.5", "--energy", "0.9")
    ok(deltakit(*common, "--json", tmp_path / "single.json"))
    ok(deltakit(*common, "--json", tmp_path / "multi.json", processes=2))
    single = report(tmp_path / "single.json")
    assert len(single["matrices"]) == 30
    assert single == report(tmp_path / "multi.json")


def test_extract_merge_unmerge_two_processes_write_what_one_writes(tmp_path, demo):
    """Every process writes its tensors into the shared files; the bytes equal a single process's."""
    base, ft = demo
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        ok(deltakit("extract", base, ft, "-o", out / "adapter", "--rank", "4", "--device", "cpu", "--save-modules",
                    "--json", out / "extract.json", processes=processes))
        ok(deltakit("extract", base, ft, "-o", out / "budget", "--budget", "20000", "--device", "cpu",
                    "--json", out / "budget.json", processes=processes))
        ok(deltakit("merge", base, out / "adapter", "-o", out / "merged", "--device", "cpu",
                    "--json", out / "merge.json", processes=processes))
        ok(deltakit("unmerge", out / "merged", out / "adapter", "-o", out / "unmerged", "--device", "cpu",
                    "--keep-replaced", "--check", ft, "--json", out / "unmerge.json", processes=processes))
    one, two = tmp_path / "p1", tmp_path / "p2"
    assert same_files(one / "adapter", two / "adapter") == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]
    same_files(one / "budget", two / "budget")
    shards = same_files(one / "merged", two / "merged")
    assert "model.safetensors.index.json" in shards and len(shards) > 3  # several shards, written by both
    same_files(one / "unmerged", two / "unmerged")
    assert report(one / "extract.json", "adapter") == report(two / "extract.json", "adapter")
    budget = report(one / "budget.json", "adapter")
    assert budget == report(two / "budget.json", "adapter")
    assert 0 < budget["parameters"] <= 20000
    assert len({m["rank"] for m in budget["matrices"]}) > 1  # the budget was shared out unevenly
    for name in ("merge.json", "unmerge.json"):
        paths = ("out", "adapter", "adapters", "model")  # the output and input paths differ between the runs
        assert report(one / name, *paths) == report(two / name, *paths)
    assert report(two / "unmerge.json", "out", "adapter", "model")["check_max_abs"] > 0  # checked against FT
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no temporary folder left behind


def test_intruders_two_processes_match_single_process(tmp_path, demo):
    base, ft = demo
    for processes in (1, 2):
        ok(deltakit("intruders", base, ft, "--device", "cpu", "-q", "-e", "0.5", "-e", "0.9", "--scale", "0",
                    "-o", tmp_path / f"scaled{processes}", "--max-shard-size", "300KB",
                    "--json", tmp_path / f"intruders{processes}.json", processes=processes))
    one = report(tmp_path / "intruders1.json")
    two = report(tmp_path / "intruders2.json")
    one["scaling"].pop("output"), two["scaling"].pop("output")
    assert one == two
    assert one["scaling"]["matrices"]  # something was scaled, by one process or the other
    assert len(same_files(tmp_path / "scaled1", tmp_path / "scaled2")) > 3


def test_intruders_scale_a_fused_expert_tensor_split_between_processes(tmp_path):
    """gpt-oss's fused expert slices are analysed by whichever process gets them, and each writes its
    slices' rows of the one stored tensor: the same files and report as one process."""
    from test_intruders import GATE_UP, gpt_oss_intruder_pair

    base, ft = gpt_oss_intruder_pair(tmp_path)
    for processes in (1, 2):
        ok(deltakit("intruders", base, ft, "--device", "cpu", "-q", "--scale", "0", "-o", tmp_path / f"scaled{processes}",
                    "--json", tmp_path / f"intruders{processes}.json", processes=processes))
    one, two = report(tmp_path / "intruders1.json"), report(tmp_path / "intruders2.json")
    one["scaling"].pop("output"), two["scaling"].pop("output")
    assert one == two and [m["name"] for m in one["scaling"]["matrices"]] == [f"{GATE_UP}[2]"]
    assert "model.safetensors" in same_files(tmp_path / "scaled1", tmp_path / "scaled2")


def test_merge_splits_one_tensors_rows_between_processes(tmp_path):
    """A tensor above merge's 64 MiB piece size is merged in row blocks that two processes share.

    Each process checks only the rows it wrote: a check for whole tensors failed every 7B merge
    on two GPUs ("planned tensors were never written": the embeddings were split).
    """
    from deltakit.lora.tensor_merge import PIECE_BYTES

    rows, cols = PIECE_BYTES // (2 * 4096) + 64, 4096  # bf16: one 64 MiB block and a 64-row block
    generator = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({name: torch.randn(rows, cols, generator=generator).bfloat16(),
               "model.norm.weight": torch.ones(cols, dtype=torch.bfloat16)}, str(base / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["down_proj"]}))
    prefix = "base_model.model." + name.removesuffix(".weight")
    save_file({f"{prefix}.lora_A.weight": torch.randn(2, cols, generator=generator) * 0.01,
               f"{prefix}.lora_B.weight": torch.randn(rows, 2, generator=generator) * 0.01},
              str(adapter / "adapter_model.safetensors"))
    for processes in (1, 2):
        ok(deltakit("merge", base, adapter, "-o", tmp_path / f"merged{processes}", "--device", "cpu", "-q",
                    processes=processes))
    assert same_files(tmp_path / "merged1", tmp_path / "merged2") == ["model.safetensors"]
    merged = load_file(tmp_path / "merged2" / "model.safetensors")[name]
    tensors = load_file(adapter / "adapter_model.safetensors")
    expected = load_file(base / "model.safetensors")[name].float() + 2 * tensors[f"{prefix}.lora_B.weight"] @ \
        tensors[f"{prefix}.lora_A.weight"]
    assert torch.equal(merged[-64:], expected[-64:].bfloat16())  # the second process's block is there


def test_a_failure_in_one_process_stops_all_and_leaves_nothing(tmp_path, demo):
    """One module's update overflows, so one process fails; the other must stop too, not hang."""
    base, ft = demo
    ok(deltakit("extract", base, ft, "-o", tmp_path / "adapter", "--rank", "4", "--device", "cpu"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    module = sorted(k for k in tensors if "mlp.down_proj.lora_B" in k)[-1].removesuffix(".lora_B.weight")
    for factor in ("lora_A", "lora_B"):  # B·A ≈ r·10⁷⁶, beyond fp32's range: not finite
        tensors[f"{module}.{factor}.weight"] = torch.full_like(tensors[f"{module}.{factor}.weight"], 1e38)
    save_file(tensors, weights)
    result = deltakit("merge", base, tmp_path / "adapter", "-o", tmp_path / "merged", "--device", "cpu",
                      processes=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2, result.stderr[-3000:]  # one line from each process
    assert any("down_proj" in line and "non-finite" in line for line in errors), errors
    assert any("process" in line and "failed" in line for line in errors), errors  # the other one was told
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no output, no temporary folder


def test_more_processes_than_gpus_is_a_user_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a 1-GPU host: one clear error, not a CUDA traceback."""
    from deltakit.distributed import init_parallel
    from deltakit.errors import DeltakitError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeltakitError, match="one GPU per process: use --nproc_per_node 1"):
        init_parallel("auto")


def test_sigterm_under_torchrun_stops_every_process_and_leaves_nothing(tmp_path):
    """torchrun forwards SIGTERM to its workers: each prints one Error line, none hangs, nothing is left.

    Both workers are stopped inside a write (DELTAKIT_TEST_HOLD_WRITE: each creates a marker file
    and waits) before the signal is sent, so the signal lands mid-write on both.
    """
    import signal
    import time

    from test_faults import write_model

    base, adapter = write_model(tmp_path / "inputs")
    out = tmp_path / "out"
    out.mkdir()
    hold = tmp_path / "hold"
    process = subprocess.Popen(command_line("merge", base, adapter, "-o", out / "merged", "--device", "cpu",
                                            processes=2),
                               env={**ENV, "DELTAKIT_TEST_HOLD_WRITE": str(hold)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("hold.*"))) < 2:  # polling for a condition, not waiting for time to pass
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the workers never reached their hold point"
            time.sleep(0.05)
        assert [p.name.startswith(".merged.tmp-") for p in out.iterdir()] == [True]  # mid-write
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2, err[-3000:]  # one line from each worker
    assert all("interrupted (SIGTERM)" in line for line in errors), errors
    assert list(out.iterdir()) == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs: one process per GPU")
def test_nccl_two_gpus_write_and_report_what_one_gpu_does(tmp_path, demo):
    """torchrun on two GPUs (NCCL, cuda:0 and cuda:1) against one process on cuda:0: the same bytes and JSON.

    Each matrix is computed by one process on one GPU of the same model, with the same kernels
    and seeds, so nothing may differ; the gloo tests above cannot reach NCCL's collectives on
    CUDA tensors or the per-process device placement.
    """
    base, ft = demo
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        common = ("--device", "cuda", "-q")
        ok(deltakit("rank", base, ft, *common, "-e", "0.5", "-e", "0.9", "--json", out / "rank.json",
                    processes=processes))
        ok(deltakit("extract", base, ft, "-o", out / "adapter", "--rank", "4", *common, "--json", out / "extract.json",
                    processes=processes))
        ok(deltakit("merge", base, tmp_path / "p1" / "adapter", "-o", out / "merged", *common,
                    "--json", out / "merge.json", processes=processes))
        ok(deltakit("compare", base, ft, tmp_path / "p1" / "adapter", *common, "--json", out / "compare.json",
                    processes=processes))
    one, two = tmp_path / "p1", tmp_path / "p2"
    same_files(one / "adapter", two / "adapter")
    assert len(same_files(one / "merged", two / "merged")) > 3
    assert report(one / "rank.json") == report(two / "rank.json")
    assert report(one / "extract.json", "adapter") == report(two / "extract.json", "adapter")
    assert report(one / "merge.json", "out", "adapter", "adapters", "model") == \
        report(two / "merge.json", "out", "adapter", "adapters", "model")
    assert report(one / "compare.json") == report(two / "compare.json")
