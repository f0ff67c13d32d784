"""bench/adapter_bench.py runs end to end on the tiny preset (CPU) and writes its JSON."""

import json

import torch
from safetensors.torch import load_file

from bench import adapter_bench


def test_adapter_bench_tiny_preset_runs_and_reports(tmp_path):
    assert adapter_bench.main(["--preset", "tiny", "--workdir", str(tmp_path / "work"), "--out",
                               str(tmp_path / "results"), "--device", "cpu", "--rank", "4", "--repeat", "1"]) == 0
    summary = json.loads((tmp_path / "results" / "adapter_bench.json").read_text())
    assert summary["lora"]["modules"] == summary["dora"]["modules"] == 7 * 2  # 7 projections × 2 layers
    assert summary["lora"]["best_s"] > 0 and summary["dora"]["best_s"] > 0
    assert summary["dora_over_lora"] > 0 and summary["machine"]["torch"] == torch.__version__
    assert not any((tmp_path / "work").glob("merged-*"))  # merged models are removed after timing
    dora = load_file(tmp_path / "work" / "adapters" / "dora-r4" / "adapter_model.safetensors")
    assert sum(key.endswith("lora_magnitude_vector") for key in dora) == 14
