"""The named targets (deltakit commands), their peers, and the check of each output against the truth.

A target is a ``deltakit`` command line on the pair, the output it writes and a check that reads that
output and the pair's stored tensors (never deltakit) and says whether the output is right:

| target | command | checked against |
| --- | --- | --- |
| rank | ``rank BASE FT --json`` | rank@90% of the exact fp64 spectrum of the stored ΔW |
| rank-full | ``rank ... --full-spectrum`` | the same; and rank's report against this one (adaptive vs full) |
| extract | ``extract BASE FT -o A --rank r --json`` | ‖ΔW − s·BA‖/‖ΔW‖ ÷ the truncated SVD's (Eckart–Young) |
| extract-aware | ``extract ... --calibration C --activation-aware`` | layer 0's q/k/v output errors from its inputs |
| extract-kohya | ``extract ... -o A.safetensors --format kohya`` | the same, read from the kohya file (LoCon included) |
| merge | ``merge BASE ADAPTER -o MERGED`` | every base tensor there; round(W0 + s·BA) on sampled matrices |
| compare | ``compare BASE FT ADAPTER --json`` | cos(ΔW, s·BA) computed from the files; top-k overlaps ≈ 1 |
| intruders | ``intruders BASE FT --json`` | max cosines of W_ft's top-10 left singular vectors from fp64 SVDs |

Peers (``--peers``): the plain svdvals loop (rank), mergekit-extract-lora (extract), LyCORIS's
extract_linear / extract_conv (extract-kohya), PEFT's merge_and_unload (merge), each checked like its target. Checks
read ``sample`` matrices spread over the model (all on small presets); a convolution is its (out, in·kh·kw) matrix.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.pair import Checkpoint, delta, energies, rank_at, sample, weight_files

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\."
                      r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")


@dataclass
class Run:
    """One tree's run on the pair: where its outputs go and the options its commands get."""

    folder: Path
    base: Path
    ft: Path
    rank: int
    device: str
    calibration: Path | None = None  # input_ids [sequences, tokens] for extract --calibration

    def out(self, name: str) -> Path:
        return self.folder / name


@dataclass
class Truth:
    """The pair's stored tensors, read for the checks; exact spectra cached per matrix."""

    base: Checkpoint
    ft: Checkpoint
    count: int
    device: torch.device
    cache: dict = field(default_factory=dict)

    def matrices(self, count: int | None = None, projections: bool = False) -> list[str]:
        """Sampled weights of two or more dimensions both sides hold (convolutions included)."""
        names = [n for n in self.base.names() if len(self.base.shape(n)) >= 2 and n in self.ft.files]
        if projections:  # what every LoRA tool decomposes (embeddings and lm_head are stored whole by some)
            names = [n for n in names if "embed" not in n and "lm_head" not in n]
        return sample(names, self.count if count is None else count)

    def delta(self, name: str) -> torch.Tensor:
        """ΔW as the (out, in·∏kernel) matrix every LoRA tool factors, float64."""
        return _matrix(delta(self.base, self.ft, name, self.device))

    def energies(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            self.cache[name] = energies(self.delta(name)).cpu()
        return self.cache[name]


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    argv: Callable[[Run], list]      # the command after bench/child.py
    output: Callable[[Run], Path]
    check: Callable[[Truth, Run, Path], dict]
    extra_reads: Callable[[Run], list[Path]] = lambda run: []
    needs_adapter: bool = False
    reads_ft: bool = True  # False: reads BASE and the adapter (merge)
    missing: Callable[[Run], str | None] = lambda run: None  # why a peer cannot run here, or None


def read_adapter(folder: Path, names: list[str] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """module → (A, B, scaling, transposed) of a PEFT LoRA adapter; scaling = lora_alpha / r (rsLoRA:
    / √r), per module where rank_pattern / alpha_pattern name it (peft LoraLayer.update_layer). A file is
    a kohya one: ``lora_unet_<module>`` in diffusers or LDM names of the tensors ``names``, scaling = alpha / r; a LoCon
    module's down (r, in, kh, kw) and up (out, r, 1, 1) as the matrices of its (out, in·kh·kw) ΔW, and a module
    LyCORIS stores whole (``diff``, from rank ≥ out / 2 on) as A = I, B = ΔW. Convolutions in a PEFT folder
    likewise: A (r, in, *kernel), B (out, r, 1, ...) as matrices."""
    from safetensors import safe_open

    if folder.is_file():
        from deltakit.io.diffusion_names import kohya_spellings  # diffusers and LDM spellings (SDXL is written in
        # LDM names, as sd-scripts writes it); the mapping is checked against diffusers' converter in tests/test_diffusion.py

        modules = {k: _module(weights[0]) for k, weights in kohya_spellings(names).items()
                   if k.startswith("lora_unet_") and len(weights) == 1}
        factors = {}
        with safe_open(str(folder), framework="pt") as handle:
            keys = set(handle.keys())
            for k, module in modules.items():
                if f"{k}.diff" in keys:
                    whole = _matrix(handle.get_tensor(f"{k}.diff")).float()
                    factors[module] = (torch.eye(whole.shape[1]), whole, 1.0, False)
                elif f"{k}.lora_down.weight" in keys:
                    down = _matrix(handle.get_tensor(f"{k}.lora_down.weight")).float()
                    factors[module] = (down, _matrix(handle.get_tensor(f"{k}.lora_up.weight")).float(),
                                       float(handle.get_tensor(f"{k}.alpha")) / down.shape[0], False)
        return factors

    config = json.loads((folder / "adapter_config.json").read_text())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if match := LORA_KEY.match(key):
                    parts.setdefault(match["module"], {})[match["part"]] = handle.get_tensor(key)

    def pattern(name: str, module: str, default):
        found = [v for k, v in (config.get(name) or {}).items() if re.fullmatch(rf"(.*\.)?{re.escape(k)}", module)]
        return found[0] if found else default

    factors = {}
    for module, found in parts.items():
        rank = pattern("rank_pattern", module, config.get("r", 8))
        alpha = pattern("alpha_pattern", module, config.get("lora_alpha", rank))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if "lora_embedding_A" in found:  # peft's Embedding stores the factors of ΔWᵀ
            factors[module] = (found["lora_embedding_A"], found["lora_embedding_B"], scaling, True)
        else:
            factors[module] = (_matrix(found["lora_A"]), _matrix(found["lora_B"]), scaling,
                               bool(config.get("fan_in_fan_out")))
    return factors


def lora_delta(factor: tuple, device: torch.device) -> torch.Tensor:
    a, b, scaling, transposed = factor
    product = (b.to(device, torch.float64) @ a.to(device, torch.float64)) * scaling
    return product.T if transposed else product


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as its (out, in·∏kernel) matrix."""
    return weight.reshape(weight.shape[0], -1)


def _result(ok: bool, summary: str, **details) -> dict:
    return {"ok": bool(ok), "summary": summary, **details}


def check_rank(truth: Truth, run: Run, output: Path) -> dict:
    """rank_at["0.9"] of each sampled matrix against the exact spectrum's (±1 allowed: fp32 at a crossing)."""
    found = {m["name"]: m.get("rank_at", {}).get("0.9") for m in json.loads(output.read_text())["matrices"]}
    names = truth.matrices()
    missing = [n for n in names if found.get(n) is None]
    diffs = [found[n] - rank_at(truth.energies(n), 0.9) for n in names if n not in missing]
    equal = sum(d == 0 for d in diffs)
    worst = max(map(abs, diffs), default=0)
    absent = f"; {len(missing)} missing" if missing else ""
    return _result(not missing and worst <= 1, f"rank@90% equal to the exact spectrum's on {equal} of {len(names)} "
                   f"sampled matrices (max |difference| {worst}{absent})",
                   matrices=len(names), equal=equal, max_abs_diff=worst, missing=missing[:5])


def check_adapter(truth: Truth, run: Run, adapter: Path) -> dict:
    """Each sampled projection's relative error against the exact truncated SVD of the same rank (≤ 1 % above it);
    where that rank covers the matrix (the SVD's error is 0), the error of storing the factors (≤ 1 %: bf16's 2⁻⁸)."""
    factors = read_adapter(adapter, truth.base.names())
    names = truth.matrices(projections=True)
    errors, optima, missing, ratios, covered = [], [], [], [], []
    for name in names:
        if _module(name) not in factors:
            missing.append(name)
            continue
        change = truth.delta(name)
        errors.append(float(torch.linalg.vector_norm(change - lora_delta(factors[_module(name)], truth.device))
                            / torch.linalg.vector_norm(change)))
        squared = truth.energies(name)
        optima.append(math.sqrt(float(squared[factors[_module(name)][0].shape[0]:].sum() / squared.sum())))
        if optima[-1] > 0:
            ratios.append(errors[-1] / optima[-1])
        else:
            covered.append(errors[-1])
    ratio = max(ratios, default=math.inf if not covered else 1.0)
    mean, optimum = (sum(v) / len(v) if v else math.nan for v in (errors, optima))
    convolutions = sum(len(truth.base.shape(n)) > 2 for n in names if n not in missing)
    absent = f"; {len(missing)} matrices have no LoRA" if missing else ""
    whole = f"; {len(covered)} covered by the rank, max error {max(covered):.1e}" if covered else ""
    return _result(not missing and ratio <= 1.01 and max(covered, default=0.0) <= 0.01,
                   f"rel. error {mean:.4f} (max {max(errors, default=math.nan):.4f}) on {len(errors)} sampled "
                   f"matrices ({convolutions} convolutions); exact truncated SVD {optimum:.4f}; worst ratio "
                   f"{ratio:.4f}{whole}{absent}", rel_error_mean=mean, rel_error_max=max(errors, default=None),
                   optimum_mean=optimum, worst_ratio=ratio, convolutions=convolutions, covered=len(covered),
                   missing=missing[:5])


def check_merge(truth: Truth, run: Run, merged: Path, adapter: Path | None = None) -> dict:
    """Every base tensor there with its shape; sampled adapted matrices equal round(W0 + s·BA) to a few
    last-bit flips (deviation ≤ 5 % of ‖s·BA‖; a missing or wrong update reads ~100 %); a tensor the
    adapter does not touch equal to the base's."""
    factors = read_adapter(adapter or run.out("adapter"))
    output = Checkpoint(merged)
    absent = [n for n in truth.base.names() if n not in output.files or output.shape(n) != truth.base.shape(n)]
    names = [n for n in truth.matrices(projections=True) if _module(n) in factors and n not in absent]
    deviations = []
    for name in names:
        stored = output.get(name)
        update = lora_delta(factors[_module(name)], truth.device).reshape(stored.shape)
        expected = (truth.base.get(name).to(truth.device, torch.float64) + update).to(stored.dtype)
        deviations.append(float(torch.linalg.vector_norm(stored.to(truth.device, torch.float64) - expected.double())
                                / torch.linalg.vector_norm(update)))
    untouched = [n for n in truth.base.names() if _module(n) not in factors and n not in absent][:1]
    same = all(torch.equal(output.get(n), truth.base.get(n)) for n in untouched)
    worst = max(deviations, default=math.inf)
    return _result(not absent and worst <= 0.05 and same,
                   f"{len(truth.base.names()) - len(absent)} of {len(truth.base.names())} base tensors there; max "
                   f"‖W − round(W0 + s·BA)‖/‖s·BA‖ = {worst:.2e} on {len(deviations)} sampled matrices; untouched "
                   f"tensor {'equal' if same else 'CHANGED'}", missing=absent[:5], max_deviation=worst)


def check_compare(truth: Truth, run: Run, output: Path) -> dict:
    """compare FT ADAPTER: each sampled matrix's cosine against ⟨ΔW, s·BA⟩/(‖ΔW‖‖s·BA‖) from the files
    (±2e-3), and its top-k overlaps ≥ 0.9 (the adapter spans ΔW's top-r subspaces; random ones give k/m)."""
    reported = {m["name"]: m for m in json.loads(output.read_text())["matrices"]}
    factors = read_adapter(run.out("adapter"))
    names = [n for n in truth.matrices(projections=True) if _module(n) in factors]
    cosine_gaps, overlaps, missing = [], [], []
    for name in names:
        if name not in reported:
            missing.append(name)
            continue
        change, update = truth.delta(name), lora_delta(factors[_module(name)], truth.device)
        exact = float((change * update).sum() / (torch.linalg.vector_norm(change) * torch.linalg.vector_norm(update)))
        cosine_gaps.append(abs(reported[name]["cosine"] - exact))
        overlaps += [*reported[name]["overlap_at"].values(), *reported[name].get("right_overlap_at", {}).values()]
    gap, low = max(cosine_gaps, default=math.inf), min(overlaps, default=0.0)
    return _result(not missing and gap <= 2e-3 and low >= 0.9,
                   f"cosine within {gap:.1e} of the exact one on {len(cosine_gaps)} sampled matrices; "
                   f"smallest top-k overlap {low:.4f}" + (f"; {len(missing)} missing" if missing else ""),
                   max_cosine_gap=gap, min_overlap=low, missing=missing[:5])


def left_vectors(w: torch.Tensor) -> torch.Tensor:
    """The left singular vectors of an m×n float64 matrix, by descending σ (min(m, n) of them), from the
    eigenvectors of its Gram matrix on the smaller side (U = W V / σ when m > n)."""
    if w.shape[0] <= w.shape[1]:
        return torch.linalg.eigh(w @ w.T)[1].flip(1)
    values, right = torch.linalg.eigh(w.T @ w)
    return (w @ right.flip(1)) / values.flip(0).clamp_min(1e-300).sqrt()


def check_intruders(truth: Truth, run: Run, output: Path) -> dict:
    """Per sampled matrix, the max |cos| of W_ft's top-k left singular vectors with all of W_base's (fp64)
    against the report's (±0.05), and the intruder counts at each ε equal."""
    report = json.loads(output.read_text())
    reported = {m["name"]: m for m in report["matrices"]}
    names = truth.matrices(max(1, truth.count // 4) if truth.count else 0, projections=True)
    gaps, unequal, missing = [], [], []
    for name in names:
        if name not in reported:
            missing.append(name)
            continue
        u_base = left_vectors(_matrix(truth.base.get(name)).to(truth.device, torch.float64))
        u_ft = left_vectors(_matrix(truth.ft.get(name)).to(truth.device, torch.float64))[:, :reported[name]["k"]]
        similarity = (u_ft.T @ u_base).abs().amax(dim=1).cpu()
        gaps.append(float((similarity - torch.tensor(reported[name]["similarities"], dtype=torch.float64)).abs().max()))
        counts = {eps: int((similarity < float(eps)).sum()) for eps in reported[name]["intruder_count"]}
        unequal += [name] if counts != reported[name]["intruder_count"] else []
    gap = max(gaps, default=math.inf)
    return _result(not missing and not unequal and gap <= 0.05,
                   f"top-{report.get('k')} similarities within {gap:.1e} of fp64 ones on {len(gaps)} sampled matrices; "
                   f"intruder counts equal on {len(gaps) - len(unequal)}", max_similarity_gap=gap, unequal=unequal[:5],
                   missing=missing[:5])


def first_layer_inputs(truth: Truth, run: Run) -> torch.Tensor:
    """X of layer 0's q/k/v on the calibration ids (tokens × hidden, float64), from the fine-tune's files:
    Llama's input RMSNorm of the embedded tokens, x·(mean(x²) + ε)^-½·g."""
    from safetensors.torch import load_file

    ids = load_file(str(run.calibration))["input_ids"].reshape(-1)
    eps = json.loads((run.ft / "config.json").read_text()).get("rms_norm_eps", 1e-6)
    hidden = truth.ft.get("model.embed_tokens.weight")[ids].to(truth.device, torch.float64)
    gain = truth.ft.get("model.layers.0.input_layernorm.weight").to(truth.device, torch.float64)
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps) * gain


def check_activation_aware(truth: Truth, run: Run, adapter: Path) -> dict:
    """Layer 0's q/k/v: the reported output error ‖(ΔW − s·BA)Xᵀ‖/‖ΔW·Xᵀ‖ against one computed from X of the
    files in float64 (±2 %: the model ran in bf16), and not above the plain truncated SVD's (1 % slack);
    the adapter's KL below the base's."""
    report = json.loads(run.out("extract-aware.json").read_text())
    reported = {m["name"]: m.get("output_error") for m in report["matrices"]}
    factors, x = read_adapter(adapter), first_layer_inputs(truth, run)
    covariance = x.T @ x
    del x

    def output_error(error: torch.Tensor, change: torch.Tensor) -> float:
        return math.sqrt(float(((error @ covariance) * error).sum() / ((change @ covariance) * change).sum()))

    gaps, ratios = [], []
    for name in (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"):
        change = truth.delta(name)
        aware = output_error(change - lora_delta(factors[_module(name)], truth.device), change)
        u, sigma, vh = torch.linalg.svd(change, full_matrices=False)
        rank = factors[_module(name)][0].shape[0]
        plain = output_error(change - (u[:, :rank] * sigma[:rank]) @ vh[:rank], change)
        gaps.append(abs(reported[name] - aware) / aware)
        ratios.append(aware / plain)
    fidelity = report.get("fidelity") or {}
    kl, kl_base = fidelity.get("kl", math.inf), fidelity.get("kl_base", 0.0)
    return _result(max(gaps) <= 0.02 and max(ratios) <= 1.01 and kl < kl_base,
                   f"layer 0 q/k/v output errors within {max(gaps):.1e} of fp64 ones; ÷ plain SVD's "
                   f"{min(ratios):.3f}–{max(ratios):.3f}; KL {kl:.4g} (base {kl_base:.4g}); mean output error "
                   f"{report.get('mean_output_error') or math.nan:.4f}", max_gap=max(gaps), ratios=ratios, kl=kl,
                   kl_base=kl_base)


def _no_module(*names: str) -> Callable[[Run], str | None]:
    def missing(run: Run) -> str | None:
        absent = [n for n in names if importlib.util.find_spec(n) is None]
        if absent:
            return f"{' and '.join(absent)} not importable"
        return None if (run.base / "config.json").is_file() else "the pair has no config.json (a tall preset)"
    return missing


def _adapter_files(run: Run) -> list[Path]:
    return sorted(run.out("adapter").glob("*.safetensors"))


TARGETS = {t.name: t for t in (
    Target("rank", "deltakit rank", lambda r: ["deltakit", "rank", r.base, r.ft, "--json", r.out("rank.json"),
                                               "--device", r.device], lambda r: r.out("rank.json"), check_rank),
    Target("rank-full", "deltakit rank --full-spectrum",
           lambda r: ["deltakit", "rank", r.base, r.ft, "--json", r.out("rank-full.json"), "--device", r.device,
                      "--full-spectrum"], lambda r: r.out("rank-full.json"), check_rank),
    Target("extract", "deltakit extract --rank {rank}",
           lambda r: ["deltakit", "extract", r.base, r.ft, "-o", r.out("adapter"), "--rank", r.rank,
                      "--device", r.device, "--json", r.out("extract.json")],
           lambda r: r.out("adapter"), check_adapter),
    Target("extract-aware", "deltakit extract --rank {rank} --calibration --activation-aware",
           lambda r: ["deltakit", "extract", r.base, r.ft, "-o", r.out("adapter-aware"), "--rank", r.rank,
                      "--calibration", r.calibration, "--activation-aware", "--device", r.device,
                      "--json", r.out("extract-aware.json")], lambda r: r.out("adapter-aware"), check_activation_aware,
           # the fine-tune is read again by transformers, the base once more for the fidelity
           lambda r: weight_files(r.ft) + weight_files(r.base) + [r.calibration]),
    Target("extract-kohya", "deltakit extract --format kohya --rank {rank}",
           lambda r: ["deltakit", "extract", r.base, r.ft, "-o", r.out("lora.safetensors"), "--format", "kohya",
                      "--rank", r.rank, "--device", r.device, "--json", r.out("extract-kohya.json")],
           lambda r: r.out("lora.safetensors"), check_adapter),
    Target("merge", "deltakit merge", lambda r: ["deltakit", "merge", r.base, r.out("adapter"), "-o", r.out("merged"),
                                                 "--device", r.device],
           lambda r: r.out("merged"), check_merge, _adapter_files, needs_adapter=True, reads_ft=False),
    Target("compare", "deltakit compare FT ADAPTER",
           lambda r: ["deltakit", "compare", r.base, r.ft, r.out("adapter"), "--device", r.device, "--json",
                      r.out("compare.json")], lambda r: r.out("compare.json"), check_compare, _adapter_files,
           needs_adapter=True),
    Target("intruders", "deltakit intruders", lambda r: ["deltakit", "intruders", r.base, r.ft, "--device", r.device,
                                                         "--json", r.out("intruders.json")],
           lambda r: r.out("intruders.json"), check_intruders),
)}

PEERS = {t.name: t for t in (  # keyed by the target they are a peer of
    Target("rank", "plain loop: torch.linalg.svdvals",
           lambda r: ["peer", "svdvals", r.base, r.ft, "--json", r.out("svdvals.json"), "--device", r.device],
           lambda r: r.out("svdvals.json"), check_rank),
    Target("extract", "mergekit-extract-lora --max-rank {rank}",
           lambda r: ["mergekit-extract-lora", "--model", r.ft, "--base-model", r.base, "--out-path",
                      r.out("mergekit-adapter"), "--max-rank", r.rank, "--device", r.device],
           lambda r: r.out("mergekit-adapter"), check_adapter, missing=_no_module("mergekit")),
    Target("extract-kohya", "LyCORIS extract_linear / extract_conv, rank {rank}",
           lambda r: ["peer", "lycoris-extract", r.base, r.ft, "-o", r.out("lycoris.safetensors"), "--rank", r.rank,
                      "--device", r.device], lambda r: r.out("lycoris.safetensors"), check_adapter,
           missing=_no_module("lycoris")),
    Target("merge", "PEFT merge_and_unload + save_pretrained",
           lambda r: ["peer", "peft-merge", r.base, r.out("adapter"), "-o", r.out("peft-merged"), "--device", r.device],
           lambda r: r.out("peft-merged"), check_merge, _adapter_files, needs_adapter=True, reads_ft=False,
           missing=_no_module("peft", "transformers")),
)}
