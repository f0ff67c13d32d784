"""Which changed tensors become LoRA factors, which travel whole, and which cannot be carried.

Pure functions of the pairing plan (names, shapes, layouts) and the model config; no tensor
data. A matrix ΔW of a Linear or Conv1D layer is LoRA material, and so is a convolution's
(its (out, in·∏kernel) matrix; PEFT's A is a convolution with the kernel, B a 1×1 one; a grouped
convolution cannot be told from its weight, and PEFT cannot load LoRA factors for one). An embedding table is too
when asked for (``embeddings=True``, PEFT's embedding LoRA), except a table tied to the
output layer, where PEFT cannot add a LoRA consistently to both uses. Everything else that
changed (norms, biases, 1-D tensors, embeddings that grew rows, embeddings not extracted) can
only be carried whole, as PEFT ``modules_to_save`` (the whole module) or, for the bias of a
LoRA layer, as PEFT's ``bias="lora_only"`` key ``<module>.base_layer.bias``.

A fused MoE expert tensor (experts × a × b, gpt-oss ``mlp.experts.gate_up_proj``) is LoRA
material expert by expert (``experts=True``, the default): each expert's slice is factored on
its own and the factors are laid out as PEFT's LoRA on parameters (``target_parameters``,
:mod:`deltakit.lora.expert_params`). Fused expert biases cannot be carried: PEFT's ParamWrapper
has no bias term, and ``modules_to_save`` would replace the whole experts module.

Example::

    targets = plan_extraction(pair_plan, ft_config, embeddings=False)
    [t.module for t in targets.lora]          # ['model.layers.0.self_attn.q_proj', ...]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from deltakit.errors import DeltakitError
from deltakit.pairing import PairPlan, TensorPair, module_type

WORD_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
EMBEDDINGS_HINT = "pass --embeddings for a PEFT embedding LoRA, or --save-modules to carry it whole"


@dataclass(frozen=True)
class LoraTarget:
    """One matrix to factor: its pair, PEFT module path (base naming) and orientation kind."""

    pair: TensorPair
    module: str  # for an expert slice: ``<fused parameter>[<expert>]`` (its factors' own name)
    kind: str  # "linear" (B @ A is the weight), "conv1d", "embedding", "input_major" (B @ A is its transpose),
    # "conv" (B @ A is an nn.ConvNd's (out, in·∏kernel) matrix; A is written as a convolution with its kernel)
    parameter: str | None = None  # a fused expert tensor's base name (PEFT target_parameters); None for modules

    @property
    def out_in(self) -> tuple[int, int]:
        """Shape of B @ A: the layer's (out, in), the stored shape transposed where the pair is stored transposed."""
        rows, cols = self.pair.shape
        return (cols, rows) if self.pair.transposed else (rows, cols)

    @property
    def spatial(self) -> bool:
        """A convolution with a kernel larger than 1×1: what kohya-ss's conv_dim and LyCORIS's conv rank rank
        (a 1×1 convolution is ranked as a linear layer by both)."""
        return self.kind == "conv" and math.prod(self.pair.kernel) > 1

    @property
    def cost(self) -> int:
        """LoRA parameters per rank: a column of B plus a row of A, m + n."""
        return sum(self.out_in)


@dataclass
class ExtractionTargets:
    """The outcome of :func:`plan_extraction`."""

    lora: list[LoraTarget] = field(default_factory=list)
    whole: list[TensorPair] = field(default_factory=list)  # carried whole when changed and asked to
    whole_reasons: dict[str, str] = field(default_factory=dict)  # pair name -> why not LoRA
    not_carried: list[dict[str, str]] = field(default_factory=list)  # cannot be expressed at all
    tied_output: str | None = None  # module path of an output layer tied to the input embedding


def module_of(name: str) -> str:
    """Module path of a parameter: ``model.norm.weight`` -> ``model.norm``."""
    return name.rsplit(".", 1)[0] if "." in name else name


def ties_embeddings(config: Mapping[str, Any] | None) -> bool:
    """Whether the model ties its output layer to its input embedding (transformers' default is to tie)."""
    return bool(config) and bool(config.get("tie_word_embeddings", True))


def tied_output_module(config: Mapping[str, Any] | None, stored_names: set[str]) -> str | None:
    """Module path of the output layer that shares the embedding table, when it is not stored.

    transformers does not save a tied ``lm_head``; PEFT still names it when the embedding is
    carried whole with ``ensure_weight_tying``. Causal-LM heads are ``lm_head`` (``embed_out``
    for GPT-NeoX); other heads are not guessed.
    """
    if not ties_embeddings(config):
        return None
    architectures = [str(a) for a in (config or {}).get("architectures") or []]
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return None
    head = "embed_out" if (config or {}).get("model_type") == "gpt_neox" else "lm_head"
    return None if f"{head}.weight" in stored_names else head


def plan_extraction(plan: PairPlan, config: Mapping[str, Any] | None, embeddings: bool = False,
                    experts: bool = True) -> ExtractionTargets:
    """Sort the paired tensors into LoRA targets and whole-tensor candidates; report the rest.

    ``experts``: slices of fused expert tensors are LoRA targets (LoRA on parameters); with
    False they are whole candidates that can never be carried, as fused expert biases always are
    (``whole_reasons`` says why; extract reports them when they changed).
    """
    targets = ExtractionTargets()
    stored = {p.name for p in plan.pairs} | {s.name for s in plan.skipped}
    targets.tied_output = tied_output_module(config, stored)
    tied = targets.tied_output is not None
    for pair in plan.pairs:
        if pair.expert_slice and experts and pair.is_matrix:  # LoRA on the fused parameter, one expert's factors
            kind = "input_major" if pair.layout == "input_major" else "linear"
            targets.lora.append(LoraTarget(pair=pair, module=f"{pair.base_name}[{pair.expert}]",
                                           kind=kind, parameter=pair.base_name))
            continue
        reason = _expert_reason(pair) if pair.expert_slice else _not_lora_reason(pair, embeddings, tied)
        if reason is None:
            kind = "embedding" if pair.layout == "embedding" and pair.module_type == "embed" else (
                pair.layout if pair.layout in ("conv1d", "conv") else "linear")
            targets.lora.append(LoraTarget(pair=pair, module=module_of(pair.base_name), kind=kind))
        else:
            targets.whole.append(pair)
            targets.whole_reasons[pair.name] = reason
    for skipped in plan.skipped:
        if not skipped.reason.startswith("tied to"):
            targets.not_carried.append({"name": skipped.name, "reason": skipped.reason})
    targets.not_carried += [{"name": n, "reason": ONLY_FT} for n in plan.only_ft]
    targets.not_carried += [{"name": n, "reason": ONLY_BASE} for n in plan.only_base
                            if not (tied and module_type(n) == "lm_head")]  # a tied head the fine-tune did not store
    return targets


ONLY_FT = "only in the fine-tune: not in the base, no adapter can add it"
ONLY_BASE = "only in the base: removed by the fine-tune, no adapter can remove it"
UNPAIRED_REASONS = ("shape mismatch", ONLY_FT, ONLY_BASE)


def unpaired(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """The not-carried entries that are tensors the two checkpoints do not pair (another shape, one side only):
    an output without them is not the fine-tune, whatever the rank."""
    return [entry for entry in entries if entry["reason"].startswith(UNPAIRED_REASONS)]


def unpaired_message(entries: list[dict[str, str]], what: str, shown: int = 3) -> str:
    """One line naming the tensors that cannot be paired, and the flag that writes ``what`` without them."""
    names = ", ".join(entry["name"] for entry in entries[:shown]) + (f" and {len(entries) - shown} more"
                                                                      if len(entries) > shown else "")
    return (f"{len(entries)} tensor{'s' if len(entries) != 1 else ''} cannot be paired, so {what} would lack "
            f"{'them' if len(entries) != 1 else 'it'}: {names} (first: {entries[0]['reason']}); "
            f"pass skip_mismatched=True (--skip-mismatched) to write {what} without "
            f"{'them' if len(entries) != 1 else 'it'}")


EXPERTS_LEFT_OUT = "fused MoE expert tensor: left out by --no-experts"
EXPERT_BIAS = ("fused MoE expert bias: PEFT's LoRA on parameters has no bias term, and modules_to_save would "
               "replace the whole experts module")


def _expert_reason(pair: TensorPair) -> str:
    """Why a slice of a fused expert tensor is no LoRA target (it is never carried whole either)."""
    return EXPERTS_LEFT_OUT if pair.is_matrix else EXPERT_BIAS


def _not_lora_reason(pair: TensorPair, embeddings: bool, tied: bool) -> str | None:
    if not pair.is_matrix or pair.layout == "vector":
        return f"{len(pair.shape)}-D tensor {tuple(pair.shape)} ({pair.module_type}): not low-rank material"
    if pair.added_rows:
        return f"vocabulary grew by {pair.added_rows} rows: the new rows are not a delta of the base"
    if pair.layout == "embedding":
        if not embeddings:
            return f"embedding table: not extracted by default; {EMBEDDINGS_HINT}"
        if tied and WORD_EMBEDDING.search(pair.name):
            return "embedding tied to the output layer: PEFT cannot apply one LoRA to both uses; use --save-modules"
    return None


def check_budget(budget: int | None, targets: Sequence[LoraTarget], which: str) -> None:
    """Refuse a budget that cannot pay for rank 1 of any matrix."""
    if budget is None or not targets:
        return
    cheapest = min(targets, key=lambda t: t.cost)
    if budget < cheapest.cost:
        rows, cols = cheapest.pair.shape
        raise DeltakitError(
            f"budget {budget} is too small for rank 1 anywhere: the cheapest {which}matrix, {cheapest.pair.name} "
            f"({rows}×{cols}), needs {cheapest.cost} parameters per rank")
