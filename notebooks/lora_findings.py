"""The findings of notebooks/02_lora_learns_less.ipynb, written from its results (no hand-copied numbers).

Every number in the text comes from the notebook's results store (``results.json``: ``config``,
``data``, ``train_full``/``train_lora``, ``evaluation``, ``spectral``) and, for the learning-rate
comparison, from the sweep file the notebook shows; every verdict ("learned less", "below the
paper's range") is decided here from those numbers, so a re-run rewrites it. Pure functions of
dicts: no torch, no files.

Example::

    import lora_findings
    print(lora_findings.findings_markdown(results, sweep_runs, sweep_note))
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MODULE_TYPES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
TYPE_NAMES = {"query": "query", "key": "key", "value": "value", "attn_out": "attention output",
              "ffn_in": "FFN in", "ffn_out": "FFN out"}


def num(value: float, digits: int = 1) -> str:
    """A median that may be a half-integer: 95.0 -> "95", 95.5 -> "95.5"; else ``digits`` decimals."""
    value = float(value)
    if value == round(value):
        return f"{value:.0f}"
    if 2 * value == round(2 * value):
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def span(values: Sequence[float], digits: int = 1) -> str:
    """"a–b" of the smallest and largest value (one number when they are equal)."""
    low, high = num(min(values), digits), num(max(values), digits)
    return low if low == high else f"{low}–{high}"


def adapted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The matrices LoRA adapts (``module_type`` in MODULE_TYPES)."""
    return [r for r in rows if r.get("module_type") in MODULE_TYPES]


def track_median(point: dict[str, Any]) -> float:
    """Median rank@90% of one measurement during training (either layout: a dict or its median)."""
    if "rank90_median" in point:
        return float(point["rank90_median"])
    values = list((point.get("rank90") or {}).values())
    return float(np.median(values)) if values else 0.0


def deltakit_matrices(spectral: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """The adapted matrices of one deltakit.rank report in the results (empty if it failed or is absent)."""
    entry = spectral.get("deltakit", {}).get(label) or {}
    if "report" not in entry:
        return []
    out = []
    for m in entry["report"].get("matrices", []):
        kind = next((t for t, needle in (("query", "attention.self.query"), ("key", "attention.self.key"),
                                         ("value", "attention.self.value"), ("attn_out", "attention.output.dense"),
                                         ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"))
                     if needle in m["name"]), None)
        if kind is not None:
            out.append({**m, "module_type": kind})
    return out


def spectra_findings(results: dict[str, Any]) -> list[str]:
    """Claim 3 (spectra): bullet points."""
    spectral, config = results["spectral"], results["config"]
    r = config["lora_r"]
    summary = spectral["summary"]
    overall, by_type, by_layer = summary["all"], summary["by_type"], summary["by_layer"]
    lo, hi = summary["paper_ratio_range"]
    full_rows = adapted(spectral["numpy"]["full"])
    dim = overall["dim"]
    gaussians = sorted({(g["dim"], g["random"]) for g in by_type.values()}, key=lambda item: item[1])
    gaussian_text = ", ".join(f"{rank}" for _, rank in gaussians)
    ranked_types = sorted(by_type.items(), key=lambda item: item[1]["full_median"])
    layers = ", ".join(f"{num(g['full_median'])} (layer {k})" for k, g in by_layer.items())
    bullets = [
        f"Full fine-tuning's ΔW: median rank@90% **{num(overall['full_median'])}** over the "
        f"{overall['n']} adapted matrices (range {overall['full_min']}–{overall['full_max']}), "
        f"{100 * overall['full_median'] / dim:.0f}% of the width ({dim}); a Gaussian matrix of the same shapes needs "
        f"{gaussian_text} (full/Gaussian median {overall['full_over_random']:.2f}), the base matrices W themselves a median of "
        f"{num(overall['base_w_median'])}. By module type the lowest median is {TYPE_NAMES[ranked_types[0][0]]} "
        f"({num(ranked_types[0][1]['full_median'])}), the highest {TYPE_NAMES[ranked_types[-1][0]]} "
        f"({num(ranked_types[-1][1]['full_median'])}); by depth: {layers}.",
        f"LoRA's ΔW has rank ≤ r = {r} by construction and uses less: **median rank@90% {num(overall['lora_median'])}, "
        f"at most {overall['lora_max']}**.",
    ]
    verdict = ("below" if overall["full_over_r"] < lo else "within" if overall["full_over_r"] <= hi else "above")
    per_type_r = ", ".join(f"{by_type[t]['full_over_r']:.1f}× ({TYPE_NAMES[t]})" for t in by_type)
    bullets.append(
        f"**The paper's ratio — full fine-tuning's rank@90% / the configured LoRA rank r = {r}: "
        f"{overall['full_over_r']:.1f}× overall** (median), by module type {per_type_r}; per matrix "
        f"{overall['full_over_r_min']:.1f}–{overall['full_over_r_max']:.1f}×. That is **{verdict}** the paper's "
        f"{lo:.0f}–{hi:.0f}× range" + (f", for the median matrix; {sum(1 for row in full_rows if row['rank_at'] >= lo * r)} of "
        f"{len(full_rows)} matrices reach {lo:.0f}×" if verdict == "below" else "") +
        f". The width caps it here: no ΔW can exceed rank {dim}, so the largest possible ratio is {dim}/{r} = {dim / r:.0f}×."
    )
    bullets.append(
        f"Against LoRA's *measured* rank@90% (a different comparison, not the paper's: LoRA used only part of its "
        f"r = {r}) the ratio is {overall['full_over_lora']:.1f}× (ratio of medians; per matrix "
        f"{overall['full_over_lora_min']:.1f}–{overall['full_over_lora_max']:.1f}×)."
    )
    bullets += growth_findings(results)
    bullets += deltakit_findings(results)
    return bullets


def growth_findings(results: dict[str, Any]) -> list[str]:
    """How rank@90% moved during training (skipped when ranks were not tracked)."""
    full_track = [p for p in results["train_full"]["track"] if p["step"] > 0]
    lora_track = [p for p in results["train_lora"]["track"] if p["step"] > 0]
    if not full_track or not any(track_median(p) for p in full_track):
        return []
    first, last = full_track[0], full_track[-1]
    direction = "grows" if track_median(last) > track_median(first) else "does not grow"
    lora_values = [track_median(p) for p in lora_track]
    return [
        f"During training the full fine-tune's median rank@90% {direction}: {num(track_median(first))} after "
        f"{first['step']} steps, {num(track_median(last))} after {last['step']}; LoRA's stays within "
        f"{span(lora_values)} from step {lora_track[0]['step']} on."
    ]


def deltakit_findings(results: dict[str, Any]) -> list[str]:
    """deltakit.rank against numpy, its other rank measures, and the noise-aware columns."""
    spectral = results["spectral"]
    dk = spectral.get("deltakit", {})
    if not dk.get("available"):
        return ["`deltakit.rank` was not available in this run; only the numpy figures exist."]
    bullets = []
    agreements = [f"{label.replace('_', ' ')} {dk[label]['agreement']['equal']}/{dk[label]['agreement']['matched']}"
                  for label in ("full", "lora_merged", "lora_adapter") if "agreement" in dk.get(label, {})]
    failed = [label for label in ("full", "lora_merged", "lora_adapter") if "error" in dk.get(label, {})]
    if agreements:
        bullets.append(f"`deltakit.rank` gives the same rank@90% as the float64 numpy SVD on: {', '.join(agreements)} "
                       f"matrices (matched by name)." + (f" It failed on: {', '.join(failed)}." if failed else ""))
    full, lora = deltakit_matrices(spectral, "full"), deltakit_matrices(spectral, "lora_merged")
    if full and lora:
        bullets.append(
            f"Beyond rank@90%: full fine-tuning's numerical rank above deltakit's noise floor is "
            f"{span([m['rank'] for m in full])} of {results['spectral']['summary']['all']['dim']}, its stable rank "
            f"{span([m['stable_rank'] for m in full])} and effective rank {span([m['effective_rank'] for m in full])}; "
            f"LoRA's: numerical rank {span([m['rank'] for m in lora])}, stable rank {span([m['stable_rank'] for m in lora])}, "
            f"effective rank {span([m['effective_rank'] for m in lora])} (ranges over the adapted matrices)."
        )
        shares = [m["noise_share"] for m in full + lora if m.get("noise_share") is not None]
        if shares:
            same = sum(1 for m in full + lora if m.get("signal_rank_at") and m["signal_rank_at"].get("0.9") == m["rank_at"].get("0.9"))
            bullets.append(
                f"Both checkpoints were saved in fp32, so storage rounding is no part of these ΔW: estimated noise share at most "
                f"{max(shares):.2g}, and the signal rank@90% equals the raw one on {same} of {len(full + lora)} matrices."
            )
    stored = deltakit_matrices(spectral, "full_bf16")
    truth = {r["name"].removesuffix(".weight"): r["rank_at"] for r in adapted(spectral["numpy"]["full"])}
    if stored:
        pairs = [(m, truth.get(next((n for n in truth if m["name"].removesuffix(".weight").endswith(n)), ""))) for m in stored]
        pairs = [(m, t) for m, t in pairs if t is not None]
        raw_gap = [abs(m["rank_at"]["0.9"] - t) for m, t in pairs]
        text = (f"**If the same two checkpoints were stored in bf16** (both rounded, as most published weights are): "
                f"rank@90% of the stored ΔW differs from the fp32 truth by a median of {num(np.median(raw_gap))} "
                f"(at most {max(raw_gap)}) over {len(pairs)} matrices")
        if all(m.get("noise_share") is not None for m, _ in pairs):
            signal_gap = [abs(m["signal_rank_at"]["0.9"] - t) for m, t in pairs if (m.get("signal_rank_at") or {}).get("0.9") is not None]
            text += (f"; deltakit estimates rounding's share of ‖ΔW‖² at {span([m['noise_share'] for m, _ in pairs], 3)} "
                     f"and {span([m.get('unchanged_fraction') or 0.0 for m, _ in pairs], 3)} of the entries unchanged")
            if signal_gap:
                text += (f", and its signal rank@90% differs from the truth by a median of {num(np.median(signal_gap))} "
                         f"(at most {max(signal_gap)}) on the {len(signal_gap)} matrices where it gives one")
            if len(signal_gap) < len(pairs):
                text += (f"; on {len(pairs) - len(signal_gap)} it gives none (the components above the rounding's edge hold "
                         f"less than 90% of the estimated signal: the rest is buried in rounding)")
        bullets.append(text + ".")
    elif "error" in dk.get("full_bf16", {}):
        bullets.append(f"The bf16 comparison failed: {dk['full_bf16']['error']}")
    return bullets


def learning_findings(results: dict[str, Any], runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Claim 1 (LoRA learns less): one paragraph with its verdict."""
    evaluation = results["evaluation"]
    base, full, lora = evaluation["base"], evaluation["full"], evaluation["lora"]
    se = full.get("code_mrr_se")
    lora_runs = [run for label, run in runs if run["mode"] == "lora"]
    lora_mrrs = [run["scores"]["code_mrr"] for run in lora_runs] or [lora["code_mrr"]]
    best_lora = max(lora_mrrs)
    gap = full["code_mrr"] - best_lora
    rates = ", ".join(f"{run['lr']:g}" for run in sorted(lora_runs, key=lambda run: run["lr"])) or f"{results['train_lora']['lr']:g}"
    if se:
        verdict = ("*yes*: full fine-tuning's code MRR is more than two standard errors above every LoRA run" if gap > 2 * se
                   else "*not established*: the gap to the best LoRA run is within two standard errors" if gap > -2 * se
                   else "*no*: a LoRA run learned more than full fine-tuning, by more than two standard errors")
        se_text = f" The standard error of one MRR on this pool is {se:.3f}, so the gap of {gap:+.3f} is {gap / se:+.1f} standard errors."
    else:
        verdict = "*yes*" if gap > 0 else "*no*"
        se_text = ""
    return (
        f"**Claim 1, LoRA learns less:** {verdict}. Held-out code MRR rises from {base['code_mrr']:.3f} (base) to "
        f"**{full['code_mrr']:.3f} with full fine-tuning** and **{span(lora_mrrs, 3)} with LoRA** at the learning "
        f"rates shown in section 6 ({rates}); acc@1 {base['code_acc@1']:.3f} → {full['code_acc@1']:.3f} (full) vs "
        f"{span([run['scores']['code_acc@1'] for run in lora_runs] or [lora['code_acc@1']], 3)} (LoRA).{se_text} One seed."
    )


def forgetting_findings(results: dict[str, Any], runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Claim 2 (LoRA forgets less): one paragraph with its verdict per learning rate."""
    evaluation = results["evaluation"]
    full = evaluation["full"]
    lora_runs = sorted((run for _, run in runs if run["mode"] == "lora"), key=lambda run: run["lr"])
    if not lora_runs:
        lora_runs = [{"lr": results["train_lora"]["lr"], "scores": evaluation["lora"], "rel_delta_median": None}]
    less = [run for run in lora_runs if run["scores"]["prose_spearman"] > full["prose_spearman"]]
    less_rates = ", ".join(f"lr {run['lr']:g}" for run in less)
    verdict = ("*yes, at every learning rate shown*" if len(less) == len(lora_runs)
               else "*no, at no learning rate shown*" if not less
               else f"*only at {less_rates}* of the rates shown")
    per_rate = "; ".join(
        f"lr {run['lr']:g}: Spearman {run['scores']['prose_spearman']:.3f}, drift {run['scores']['prose_drift']:.3f}, "
        f"next-sentence MRR {run['scores']['prose_next_mrr']:.3f}" for run in lora_runs
    )
    sizes = [run for run in lora_runs if run.get("rel_delta_median") is not None]
    full_size = results["spectral"]["summary"]["all"]["rel_delta_full_median"]
    size_text = ""
    if sizes:
        values = [run["rel_delta_median"] for run in sizes]
        trend = ("grows with the rate" if len(values) > 1 and all(a < b for a, b in zip(values, values[1:]))
                 else "by rate")
        size_text = (f" LoRA's size of change {trend}: median ‖ΔW‖/‖W‖ of the adapted matrices "
                     + ", ".join(f"{100 * run['rel_delta_median']:.1f}% (LoRA {run['lr']:g})" for run in sizes)
                     + f", against {100 * full_size:.1f}% for the full fine-tune.")
    return (
        f"**Claim 2, LoRA forgets less:** {verdict}, judged by the prose similarity structure kept (Spearman vs the "
        f"base model; higher = less forgetting). Full fine-tuning: Spearman {full['prose_spearman']:.3f}, drift {full['prose_drift']:.3f}, "
        f"next-sentence MRR {full['prose_next_mrr']:.3f} (base {evaluation['base']['prose_next_mrr']:.3f}). LoRA — {per_rate}."
        + size_text
    )


def scale_caveats(results: dict[str, Any]) -> str:
    """Why this small run may differ from the paper, with its own sizes."""
    config, data = results["config"], results["data"]
    epochs = config["steps"] * config["batch_size"] / max(1, data["train_pairs"])
    params = results["train_full"]["trainable_params"]
    return (
        f"**Scale.** A {params / 1e6:.1f} M-parameter sentence encoder, not a 7 B decoder; a contrastive embedding task whose "
        f"forgetting measures are geometric, not benchmark accuracy; a target domain the base model had largely seen; "
        f"{config['steps']} steps of {config['batch_size']} pairs on {data['train_pairs']:,} training pairs "
        f"(~{epochs:.2g} epochs); one seed; no learning-rate sweep for full fine-tuning."
    )


def findings_markdown(results: dict[str, Any], runs: list[tuple[str, dict[str, Any]]], mode: str, sweep_note: str) -> str:
    """Section 6 of the notebook as Markdown, from the results store, the runs of section 6
    (``sweep_runs``' list) and two notes: the run's ``mode`` and where the sweep came from."""
    pools = (f"{results['data']['heldout_eval_pool']:,} held-out code queries, {results['data']['prose_pairs']:,} prose pairs, "
             f"{results['data']['prose_sentences']:,} prose sentences")
    spectra = spectra_findings(results)
    overall = results["spectral"]["summary"]["all"]
    lo, hi = results["spectral"]["summary"]["paper_ratio_range"]
    ratio = f"full fine-tuning's rank@90% is {overall['full_over_r']:.1f}× the configured LoRA rank r (median)"
    headline = (f"reproduced: {ratio}, within the paper's {lo:.0f}–{hi:.0f}×" if lo <= overall["full_over_r"] <= hi
                else f"reproduced and exceeded: {ratio}, above the paper's {lo:.0f}–{hi:.0f}×" if overall["full_over_r"] > hi
                else f"partly: {ratio} — higher than r, but below the paper's {lo:.0f}–{hi:.0f}×" if overall["full_over_r"] > 1
                else f"not reproduced: {ratio}")
    parts = [
        f"*Written by the code cell above from this run's results ({pools}; mode: {mode}); "
        f"section 6's runs: {sweep_note}.*",
        f"**Claim 3, spectra: {headline}.**",
        "\n".join(f"* {b}" for b in spectra),
        learning_findings(results, runs),
        forgetting_findings(results, runs),
        scale_caveats(results),
    ]
    return "\n\n".join(parts)
