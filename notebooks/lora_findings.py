"""The findings of notebooks/02_lora_learns_less.ipynb, written from its results (no hand-copied numbers).

Every number in the text comes from the notebook's results store (``results.json``: ``config``,
``data``, ``train_full``/``train_lora``, ``evaluation``, ``spectral``) and, for the learning-rate
comparison, from the sweep file the notebook shows; every verdict is decided here from those numbers,
so a re-run rewrites it: claims 1 and 2 by the paired tests of ``paired_stats`` on the ``paired``
step's per-query scores (one rule: established / contradicted / not established by a confidence
interval), claim 3 by the paper's stated range. Pure functions of dicts: no torch, no files.

Example::

    import lora_findings
    print(lora_findings.findings_markdown(results, sweep_runs, sweep_note))
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import paired_stats

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


# The measures of each claim, as (label, per-query field of ``per_query_scores``, which arm is subtracted
# from which): every difference is oriented so that the claim predicts d > 0.
CLAIMS = {
    "learns_less": ("Claim 1, LoRA learns less", [
        ("held-out code reciprocal rank, full − LoRA", "code_rr", "full_minus_lora"),
    ]),
    "forgets_less": ("Claim 2, LoRA forgets less", [
        ("prose next-sentence reciprocal rank, LoRA − full", "prose_next_rr", "lora_minus_full"),
        ("prose similarity structure kept (per-sentence Spearman vs the base), LoRA − full", "prose_spearman", "lora_minus_full"),
        ("prose embedding drift from the base, full − LoRA", "prose_drift", "full_minus_lora"),
    ]),
}


def chosen_runs(paired: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """The runs of one arm at its chosen rate, one per seed, in the plan's seed order."""
    by_seed = {run["seed"]: run for run in paired["runs"] if run["mode"] == mode and run["lr"] == paired["chosen"][mode]}
    return [by_seed[seed] for seed in paired["plan"]["seeds"]]


def paired_claims(paired: dict[str, Any]) -> dict[str, Any]:
    """Every paired test and verdict of claims 1 and 2, from ``paired_experiment``'s result.

    Per measure: the (seeds, queries) matrix of differences between the chosen full and LoRA runs of
    the same seed, oriented as ``CLAIMS`` says, and ``paired_stats.paired_test`` of it; per claim:
    ``paired_stats.combined_verdict`` of its measures.
    """
    full, lora = chosen_runs(paired, "full"), chosen_runs(paired, "lora")
    level, resamples = paired["plan"]["level"], paired["plan"]["resamples"]
    claims = {}
    for key, (title, measures) in CLAIMS.items():
        tests = []
        for label, field, orientation in measures:
            a = np.array([run["per_query"][field] for run in full])
            b = np.array([run["per_query"][field] for run in lora])
            differences = a - b if orientation == "full_minus_lora" else b - a
            tests.append({"label": label, "field": field, **paired_stats.paired_test(differences, level, resamples)})
        claims[key] = {"title": title, "tests": tests,
                       "verdict": paired_stats.combined_verdict([t["verdict"] for t in tests])}
    return claims


def test_line(test: dict[str, Any]) -> str:
    """One measure's paired test as a sentence fragment."""
    low, high = test["ci"]
    p = "n/a (every difference 0)" if test["wilcoxon_p"] is None else f"{test['wilcoxon_p']:.2g}"
    seeds = ", ".join(f"{m:+.4f}" for m in test["per_seed"])
    return (f"{test['label']}: mean {test['mean']:+.4f}, {100 * test['level']:.0f}% CI [{low:+.4f}, {high:+.4f}] "
            f"({test['queries']} queries × {test['seeds']} seeds; per seed {seeds}; {test['positive']} queries favour the claim, "
            f"{test['negative']} oppose it; Wilcoxon p {p}) → **{test['verdict']}**")


def edge_note(plan: dict[str, Any], chosen: dict[str, float]) -> str:
    """A sentence naming each arm whose chosen rate lies at an end of its grid (a wider grid might
    choose another rate), or "" when every choice is inside its grid or the grid has one rate."""
    ends = [f"{name}'s is its grid's {'highest' if chosen[mode] == max(grid) else 'lowest'}"
            for mode, name, grid in (("full", "full fine-tuning", plan["full_lrs"]), ("lora", "LoRA", plan["lora_lrs"]))
            if len(grid) > 1 and chosen[mode] in (min(grid), max(grid))]
    return f" Of the chosen rates, {' and '.join(ends)}: a wider grid might choose another." if ends else ""


def paired_findings(results: dict[str, Any]) -> list[str]:
    """Claims 1 and 2 from the paired experiment: how the rates were chosen, each test, each verdict."""
    paired = results.get("paired") or {}
    if "runs" not in paired:
        return [f"**Claims 1 and 2:** no paired experiment in this run ({paired.get('error', 'not computed')}); "
                "no verdict on learning or forgetting."]
    plan, chosen = paired["plan"], paired["chosen"]

    def grid(mode: str) -> str:
        tuned = sorted((run for run in paired["runs"] if run["mode"] == mode and run["seed"] == plan["seeds"][0]),
                       key=lambda run: run["lr"])
        return ", ".join(f"{run['lr']:g} ({run['means']['val_code_rr']:.3f})" for run in tuned)

    claims = paired_claims(paired)
    base = paired["base"]["means"]
    full, lora = chosen_runs(paired, "full"), chosen_runs(paired, "lora")
    mean = lambda runs, field: float(np.mean([run["means"][field] for run in runs]))  # noqa: E731
    parts = [
        f"**Claims 1 and 2 on paired statistics.** Both arms had the same tuning budget: {len(plan['full_lrs'])} learning "
        f"rates each, chosen by the same rule ({plan['selection']}) on {plan['validation_queries']} validation queries, "
        f"never on the test queries. Full fine-tuning, rate (validation code MRR): {grid('full')} → **{chosen['full']:g}**; "
        f"LoRA: {grid('lora')} → **{chosen['lora']:g}**.{edge_note(plan, chosen)} Each chosen rate was then trained with seeds "
        f"{', '.join(str(s) for s in plan['seeds'])}. Test code MRR, mean over seeds: base {base['code_rr']:.3f}, "
        f"full {mean(full, 'code_rr'):.3f}, LoRA {mean(lora, 'code_rr'):.3f}; prose next-sentence MRR: base "
        f"{base['prose_next_rr']:.3f}, full {mean(full, 'prose_next_rr'):.3f}, LoRA {mean(lora, 'prose_next_rr'):.3f}. "
        f"The rule of section 6b, the same for claims 1 and 2: a claim is *established* when the {100 * plan['level']:.0f}% bootstrap "
        f"interval of its per-query difference (queries and seeds resampled, pairs kept) lies wholly on the claimed "
        f"side of 0, *contradicted* when it lies wholly on the other side, else *not established*; a claim with several "
        f"measures needs them all to agree.",
    ]
    for claim in claims.values():
        lines = "\n".join(f"  * {test_line(test)}" for test in claim["tests"])
        verdicts = [test["verdict"] for test in claim["tests"]]
        split = ("" if len(set(verdicts)) == 1 else " Its measures disagree ("
                 + ", ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts))) + "), so the claim as a whole is not established.")
        parts.append(f"**{claim['title']}: {claim['verdict']}.**{split}\n\n{lines}")
    return parts


def main_run_line(results: dict[str, Any]) -> str:
    """The main run's scores (section 3, the configured rates, one seed): context, not a verdict."""
    evaluation = results["evaluation"]
    base, full, lora = evaluation["base"], evaluation["full"], evaluation["lora"]
    return (f"*The main run of sections 2–5 (configured rates full {results['train_full']['lr']:g}, LoRA "
            f"{results['train_lora']['lr']:g}, one seed) is context for the spectra, not evidence for claims 1–2:* code MRR "
            f"base {base['code_mrr']:.3f}, full {full['code_mrr']:.3f}, LoRA {lora['code_mrr']:.3f}; prose Spearman "
            f"full {full['prose_spearman']:.3f}, LoRA {lora['prose_spearman']:.3f}. Section 6's LoRA-only sweep is "
            f"likewise descriptive.")


def scale_caveats(results: dict[str, Any]) -> str:
    """Why this small run may differ from the paper, with its own sizes."""
    config, data = results["config"], results["data"]
    epochs = config["steps"] * config["batch_size"] / max(1, data["train_pairs"])
    params = results["train_full"]["trainable_params"]
    plan = (results.get("paired") or {}).get("plan")
    paired = ("no paired step" if plan is None else
              f"claims 1–2 on {len(plan['seeds'])} seeds, {len(plan['full_lrs'])} learning rates per arm, "
              f"{plan['validation_queries']:,} validation and {plan['test_queries']:,} test code queries")
    return (
        f"**Scale.** A {params / 1e6:.1f} M-parameter sentence encoder, not a 7 B decoder; a contrastive embedding task whose "
        f"forgetting measures are geometric, not benchmark accuracy; a target domain the base model had largely seen; "
        f"{config['steps']} steps of {config['batch_size']} pairs per training on {data['train_pairs']:,} training pairs "
        f"(~{epochs:.2g} epochs), at most {config['max_code_tokens']} code tokens; {paired}; one seed for the spectra. "
        f"A verdict of *not established* at this scale says that these runs cannot tell the arms apart, not that "
        f"they are equal."
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
        *paired_findings(results),
        main_run_line(results),
        scale_caveats(results),
    ]
    return "\n\n".join(parts)
