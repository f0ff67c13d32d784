"""Work split over processes: balanced partition, and a 2-process gloo run equal to a single process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


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


def test_torchrun_two_gloo_processes_match_single_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    base, ft = write_demo_pair(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "deltakit_cli.main", "rank", base, ft, "-q", "--device", "cpu",
              "--energy", "0.5", "--energy", "0.9", "--json", tmp_path / "single.json"]
    multi = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "deltakit_cli.main", "rank", base, ft,
             "-q", "--device", "cpu", "--energy", "0.5", "--energy", "0.9", "--json", tmp_path / "multi.json"]
    for command in (single, multi):
        result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    a = json.loads((tmp_path / "single.json").read_text())
    b = json.loads((tmp_path / "multi.json").read_text())
    a.pop("elapsed_s"), b.pop("elapsed_s")
    assert len(a["matrices"]) == 30
    assert a == b
