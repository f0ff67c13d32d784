"""The "What we found" sections of notebooks 03 and 04, written from the run's own numbers.

Every number in the text comes from the results the notebook just computed, and every verdict
("low rank or not", "above chance", "nearly orthogonal", "grows with rank") is decided by a stated
rule on those numbers, so a fast smoke run and a full run each read true. The notebooks call
:func:`surgery_findings` (03) and :func:`compare_findings` (04) in a code cell and display the
Markdown it returns.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

CHANCE = 3.0  # an overlap is "above chance" when it is more than this many times the random-subspace value


def _range(values: Sequence[float], digits: int = 0) -> str:
    low, high = min(values), max(values)
    fmt = f"{{:.{digits}f}}"
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}–{fmt.format(high)}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def mode_line(fast: bool, steps: int, batch: int, queries: int) -> str:
    if fast:
        return (f"**This is a FAST smoke run** ({steps} steps of {batch} pairs, {queries} held-out queries): it checks "
                "that every step works; its numbers say little about fine-tuning, and the verdicts below are "
                "read from them by fixed rules all the same.")
    return f"All numbers are from the run above: one seed, {steps} steps of {batch} pairs, {queries} held-out queries."


def surgery_findings(ranked: Any, lora_names: Sequence[str], surgery: Mapping[str, Mapping[str, Any]],
                     evaluation: Mapping[str, Mapping[str, float]], round_trip: Mapping[str, Any],
                     ranks: Sequence[int], full_rank: int, fast: bool, steps: int, batch: int, queries: int) -> str:
    """Notebook 03's findings: how low-rank the full fine-tune is, what extraction keeps, what the task keeps."""
    chosen = [m for m in ranked.matrices if m.name in lora_names]
    attention = [m for m in chosen if m.module_type in ("q", "k", "v", "o")]
    ffn = [m for m in chosen if m.module_type not in ("q", "k", "v", "o")]
    share = float(np.median([m.rank_at[0.9] / m.random_rank_at[0.9] for m in chosen]))
    low_rank = share < 0.25
    numerical = [m.rank if m.rank is not None else m.lower_bounds.get("rank", 0) for m in chosen]
    labels = [f"rank {r}" for r in ranks]
    errors = [surgery[label]["rel_error"] for label in labels]
    kept = [surgery[label]["kept_energy"] for label in labels]
    params = [surgery[label]["parameters"] for label in labels]
    ey_gap = max(abs(s["rel_error"] - s["eckart_young"]) for s in surgery.values())
    out = [mode_line(fast, steps, batch, queries), ""]
    out.append(f"**The full fine-tune's ΔW is {'low rank' if low_rank else 'not low rank'}** (rule: the median "
               f"ratio of rank@90% to a Gaussian matrix's is {share:.2f}, {'below' if low_rank else 'not below'} 0.25). "
               f"rank@90% is {_range([m.rank_at[0.9] for m in attention])} for the attention matrices and "
               f"{_range([m.rank_at[0.9] for m in ffn])} for the FFN matrices, against "
               f"{_range([m.random_rank_at[0.9] for m in attention])} / {_range([m.random_rank_at[0.9] for m in ffn])} "
               f"for a Gaussian matrix of the same shape; deltakit counts {_range(numerical)} singular values above "
               f"the noise floor. Extracted at rank {' / '.join(map(str, ranks))} the adapters keep "
               f"{' / '.join(f'{100 * k:.0f}%' for k in kept)} of ‖ΔW‖²_F: relative reconstruction error "
               f"**{' / '.join(f'{e:.3f}' for e in errors)}** with {' / '.join(_params(p) for p in params)} LoRA "
               f"parameters. The measured errors equal the Eckart–Young errors of the spectra to within {ey_gap:.0e}, "
               f"and the full-rank adapter (rank {full_rank}) leaves a relative error of "
               f"{surgery[f'rank {full_rank}']['rel_error']:.1e}.")
    base_mrr, full_mrr = evaluation["base"]["code_mrr"], evaluation["full fine-tune"]["code_mrr"]
    gain = full_mrr - base_mrr
    scores = ", ".join(f"{label} {evaluation[label]['code_mrr']:.3f}" + (
        f" ({100 * (evaluation[label]['code_mrr'] - base_mrr) / gain:.0f}% of the gain)" if gain > 0 else "")
        for label in [*labels, f"rank {full_rank}"])
    if gain > 0:
        out.append(f"\n**Task score.** Held-out code MRR: base {base_mrr:.3f}, full fine-tune {full_mrr:.3f}; through "
                   f"PEFT {scores}. One query moving from rank 1 to rank 2 moves an MRR by {0.5 / queries:.4f}.")
    else:
        out.append(f"\n**Task score.** The fine-tune did not raise the held-out code MRR (base {base_mrr:.3f}, full "
                   f"fine-tune {full_mrr:.3f}), so no share of a gain can be read; the adapters score {scores}.")
    spearman = [evaluation[label]["prose_spearman"] for label in labels]
    falling = all(a >= b for a, b in zip(spearman, spearman[1:]))
    out.append(f"\n**Forgetting** (prose similarity structure against the base, Spearman, 1 = unchanged): full "
               f"fine-tune {evaluation['full fine-tune']['prose_spearman']:.3f}; "
               + ", ".join(f"{label} {s:.3f}" for label, s in zip(labels, spearman))
               + f" — {'it grows steadily with rank' if falling else 'not monotone in rank'} (rule: Spearman never "
               f"rises from one rank to the next).")
    uniform, budget = surgery["rank 16"], surgery["budget"]
    ratio = budget["rel_error"] ** 2 / uniform["rel_error"] ** 2
    out.append(f"\n**Budget vs uniform rank 16 at equal parameters** ({budget['parameters']:,} vs "
               f"{uniform['parameters']:,}): relative error {budget['rel_error']:.4f} against {uniform['rel_error']:.4f}, "
               f"{'lower' if ratio < 1 else 'not lower'} ({100 * (1 - ratio):.1f}% less squared error), ranks "
               f"{budget['rank_min']}–{budget['rank_max']}; code MRR {evaluation['budget']['code_mrr']:.3f} against "
               f"{evaluation['rank 16']['code_mrr']:.3f}.")
    out.append(f"\n**Merge / unmerge round trip**: max |Δ| = {round_trip['check_max_abs']:.1e}, relative ‖Δ‖_F = "
               f"{round_trip['check_rel_fro']:.1e} from the original base; the merged folder's scores differ from "
               f"the PEFT-loaded adapter's by at most "
               f"{max(abs(round_trip['merged_scores'][k] - round_trip['peft_scores'][k]) for k in round_trip['peft_scores']):.1e}.")
    out.append("\n**Caveats.** One seed, one short fine-tune on a CPU, a 6-layer 384-wide model whose base was trained "
               "on CodeSearchNet, so docstring → code is a small step for it.")
    return "\n".join(out)


def _above(value: float, random: float) -> str:
    return "above chance" if value > CHANCE * random else "at chance"


def compare_findings(lora: Mapping[str, Any], full_lora: Sequence[Mapping[str, Any]], labels: Sequence[str],
                     tasks: Mapping[str, Mapping[str, Any]], trajectory: Mapping[str, Any], fast: bool, steps: int,
                     batch: int) -> str:
    """Notebook 04's findings: LoRA r = 8 vs 64, full vs LoRA, two tasks, the trajectory."""
    out = [mode_line(fast, steps, batch, queries=0).replace(", 0 held-out queries", ""), ""]
    right1, right8 = lora["mean_right_overlap_at"]["1"], lora["mean_right_overlap_at"]["8"]
    left1, left8 = lora["mean_overlap_at"]["1"], lora["mean_overlap_at"]["8"]
    rand1, rand8 = lora["mean_random_overlap_at"]["1"], lora["mean_random_overlap_at"]["8"]
    rrand1, rrand8 = lora["mean_random_right_overlap_at"]["1"], lora["mean_random_right_overlap_at"]["8"]
    out.append(f"**Rank 8 vs rank 64 LoRA** (mean over the {lora['count']} adapted matrices; rule: above chance = more "
               f"than {CHANCE:g}× the random-subspace value). Input side (rows of A, what Hu et al. plot): right φ@1 = "
               f"{right1:.3f} ({_above(right1, rrand1)}, random {rrand1:.3f}), right φ@8 = {right8:.3f} "
               f"({_above(right8, rrand8)}, random {rrand8:.3f}). Output side (columns of B): φ@1 = {left1:.3f} "
               f"({_above(left1, rand1)}, random {rand1:.3f}), φ@8 = {left8:.3f} ({_above(left8, rand8)}, random "
               f"{rand8:.3f}). Hu et al.'s Figure 3 (top directions shared on the input side) is "
               f"{'reproduced' if right1 > CHANCE * rrand1 else 'not reproduced'} here by that rule.")
    parts = []
    for entry in full_lora:
        a, b = labels[entry["a"]], labels[entry["b"]]
        parts.append(f"{a} vs {b}: cosine {entry['mean_cosine']:.3f}, φ@8 {entry['mean_overlap_at']['8']:.3f} "
                     f"({_above(entry['mean_overlap_at']['8'], entry['mean_random_overlap_at']['8'])}, random "
                     f"{entry['mean_random_overlap_at']['8']:.3f})")
    out.append("\n**Full fine-tune vs LoRA on the same task**: " + "; ".join(parts) + ".")
    seed, prose = tasks["code vs code (seed 1)"], tasks["code vs prose"]
    orthogonal = abs(prose["mean_cosine"]) < 0.1
    out.append(f"\n**Two tasks**: the task-vector cosine of code vs prose is {prose['mean_cosine']:.3f} per matrix on "
               f"average ({'nearly orthogonal' if orthogonal else 'not orthogonal'}, rule: |cos| < 0.1, as Ilharco et "
               f"al. found for different tasks), against {seed['mean_cosine']:.3f} for the same task trained with "
               f"another seed; by layer {_range(prose['cosine'], 3)} (code vs prose) and "
               f"{_range(seed['cosine'], 3)} (seed). Their top-8 left subspaces overlap φ@8 = "
               f"{prose['mean_overlap8']:.3f} and {seed['mean_overlap8']:.3f} (random {prose['random8']:.3f}).")
    overall = trajectory["overall"]
    steps_list = trajectory["steps"]
    growth = ", ".join(f"step {s}: rel ΔW {p['mean_rel_delta']:.2e}, rank@90% {p['mean_rank_at']['0.9']:.1f}, "
                       f"φ@8 with the final {p['mean_overlap_with_final']['8']:.2f}" for s, p in zip(steps_list, overall))
    rising = all(a["mean_rel_delta"] <= b["mean_rel_delta"] for a, b in zip(overall, overall[1:]))
    out.append(f"\n**Trajectory of the full fine-tune** ({len(steps_list)} checkpoints): {growth}. The relative change "
               f"{'grows at every checkpoint' if rising else 'does not grow at every checkpoint'}.")
    out.append("\n**Caveats.** One seed per configuration, short runs on a CPU, a 6-layer model; the verdicts are "
               "the stated rules applied to these numbers.")
    if any(math.isnan(v) for v in (right1, left1, prose["mean_cosine"])):
        out.append("\n(Some overlaps are undefined: a ΔW without any direction above the noise floor.)")
    return "\n".join(out)
