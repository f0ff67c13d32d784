"""LoRA surgery: extract an adapter from a fine-tune, merge one into a model, unmerge it again.

Example::

    from deltakit.lora import extract_lora, merge, unmerge
    extract_lora("base", "ft", "adapter", rank=16)
    extract_lora("base", ["lora-a", "lora-b"], "lora-ab", weights=[0.7, 0.3], rank=16)   # resize / sum adapters
    merge("base", "adapter", "merged")
    unmerge("merged", "adapter", "base-again", check="base")
"""

from deltakit.lora.extraction import ExtractedMatrix, ExtractReport, extract_lora
from deltakit.lora.factors import LoraFactors, split_singular_values, svd_factors
from deltakit.lora.merging import MergeReport, merge, unmerge
from deltakit.lora.ranks import RankChoice, allocate_budget, energy_rank, kept_energy, ratio_rank, total_squared_error
from deltakit.lora.resize import LowRankDelta, lowrank_svd

__all__ = [
    "extract_lora", "ExtractReport", "ExtractedMatrix", "merge", "unmerge", "MergeReport",
    "RankChoice", "allocate_budget", "energy_rank", "kept_energy", "ratio_rank", "total_squared_error",
    "lowrank_svd", "LowRankDelta",
    "LoraFactors", "svd_factors", "split_singular_values",
]
