"""Match base and fine-tune tensors by name, and say what is skipped and why.

Pure functions of tensor names, shapes and dtypes (plus the model's ``config.json``):
no tensor data is read here. Handles wrapper-prefix differences (``model.`` vs none,
PEFT's ``base_model.model.``), vocabulary growth in embeddings / lm_head (the shared rows
are analysed, the added rows reported), GPT-2 Conv1D weights stored [in, out], fused
projections, tied embeddings (analysed once; a head that unties a tied base is paired with the
base's embedding), convolutions (a ``.weight`` of 3 to 5 dimensions that is not a fused expert
tensor: its (out, in·∏kernel) matrix), and MoE experts: a fused 3-D expert tensor (E, a, b) becomes
one pair per expert named ``<tensor>[<e>]`` whose slice is read along dim 0.

Longer than ~450 lines: every rule that pairs a fine-tune tensor with a base tensor (names, shapes,
vocabulary growth, orientation, experts, convolutions, tied and untied heads) is made here and nowhere
else, so that each command reads it off the pair.

Example::

    plan = pair_tensors(base_infos, ft_infos)
    for pair in plan.pairs:
        print(pair.name, pair.shape, pair.module_type, pair.layer)
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import torch

from deltakit.errors import DeltakitError
from deltakit.io.diffusion_names import common_names, is_diffusion_file

# Wrapper prefixes that differ between saves of the same weights (outermost first).
WRAPPER_PREFIXES = ("base_model.model.", "module.", "model.", "transformer.", "bert.", "roberta.", "gpt_neox.")
# transformers models whose CONV1D_LEAF layers are transformers.pytorch_utils.Conv1D (stored [in, out]).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"}
CONV1D_LEAF = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")
FUSED_LEAF = re.compile(r"\.(c_attn|qkv_proj|query_key_value|Wqkv|qkv|gate_up_proj|w13)\.weight$")
EMBEDDING_LEAF = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|lm_head|embed_out|output)\.weight$")
LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|blocks|block)\.(\d+)\.")
# MoE experts: a fused tensor holding every expert along dim 0 (gpt-oss, transformers 5:
# ``mlp.experts.gate_up_proj`` (E, hidden, 2·inter), ``mlp.experts.down_proj``, ``*_bias`` (E, n)),
# or one module per expert (Mixtral ``block_sparse_moe.experts.3.w1.weight``, Qwen3-MoE / DeepSeek
# ``mlp.experts.3.gate_proj.weight``).
FUSED_EXPERTS = re.compile(r"(^|\.)experts\.[A-Za-z0-9_]+$")
EXPERT_BIAS = re.compile(r"(^|\.)experts\.[A-Za-z0-9_]+_bias$")
EXPERT_INDEX = re.compile(r"(^|\.)experts\.(\d+)\.")
INPUT_MAJOR_EXPERT_MODELS = {"gpt_oss"}  # fused experts stored (E, in, out), multiplied as x @ W[e]

# (module type, pattern on the tensor name); first match wins, order matters.
_MODULE_TYPES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("experts.gate_up", r"(^|\.)experts\.(\d+\.)?(gate_up_proj|w13)(\.weight)?$"),
        ("experts.gate", r"(^|\.)experts\.(\d+\.)?(gate_proj|w1)(\.weight)?$"),
        ("experts.up", r"(^|\.)experts\.(\d+\.)?(up_proj|w3)(\.weight)?$"),
        ("experts.down", r"(^|\.)experts\.(\d+\.)?(down_proj|w2)(\.weight)?$"),
        ("router", r"(\.router|block_sparse_moe\.gate|mlp\.gate)\.(weight|bias)$"),
        ("embed", r"(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_in)\.weight$"),
        ("lm_head", r"(lm_head|embed_out)\.weight$"),
        ("qkv", r"(c_attn|qkv_proj|query_key_value|Wqkv|qkv)\.weight$"),
        ("gate_up", r"(gate_up_proj|w13)\.weight$"),
        ("q", r"(q_proj|query|q_attn|wq)\.weight$"),
        ("k", r"(k_proj|key|wk)\.weight$"),
        ("v", r"(v_proj|value|wv)\.weight$"),
        ("o", r"(o_proj|out_proj|attn\.c_proj|attention\.output\.dense|dense_attn|wo)\.weight$"),
        ("gate", r"(gate_proj|w1)\.weight$"),
        ("up", r"(up_proj|w3)\.weight$"),
        ("down", r"(down_proj|w2)\.weight$"),
        ("mlp_in", r"(mlp\.c_fc|intermediate\.dense|fc1|dense_h_to_4h|fc_in)\.weight$"),
        ("mlp_out", r"(mlp\.c_proj|output\.dense|fc2|dense_4h_to_h|fc_out)\.weight$"),
        ("norm", r"(norm|ln_\w+|LayerNorm|layernorm)\.(weight|bias)$"),
        ("bias", r"(\.|_)bias$"),
    )
)

TensorMeta = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class TensorPair:
    """One base / fine-tune tensor pair to compare.

    ``shape`` is the analysed shape: for an embedding that gained vocabulary rows it is the
    base's (the shared rows), and ``added_rows`` counts the new ones.

    A convolution's weight (nn.Conv1d/2d/3d, stored (out, in, *kernel)) is analysed, factored and
    merged as its (out, in·∏kernel) matrix, the convention of kohya-ss and LyCORIS (an output
    channel per row, so row blocks are blocks of output channels); ``kernel`` holds the stored
    trailing dimensions, ``shape`` the matrix's, and :meth:`as_matrix` / :meth:`as_stored` move
    between the two. Only here is that layout known.

    ``transposed`` is the one orientation every command asks: the model stores this weight as the
    transpose of its layer's (out, in) matrix (a transformers Conv1D [in, out], an input-major
    expert slice, an nn.Embedding table [vocab, dim] whose (out, in) matrix is (dim, vocab)). It is
    decided once, here from the names, shapes and config (:func:`pair_tensors`), and for an adapter's
    pairs from the adapter's module as well (:func:`adapted_layout`, ``deltakit.adapters.adapter_pairs``).
    Surgery factors and applies the (out, in) matrix (:meth:`to_out_in`); the analyses read
    :meth:`analysed`, which keeps embedding tables as stored (a row per token).
    """

    name: str  # as stored in the fine-tune
    base_name: str
    shape: tuple[int, ...]
    base_dtype: torch.dtype
    ft_dtype: torch.dtype
    module_type: str
    layer: int | None
    layout: str = "linear"  # "linear" [out, in], "conv1d" / "input_major" [in, out], "embedding" [vocab, dim], "vector",
    # "conv" (nn.ConvNd, stored [out, in, *kernel], analysed as [out, in·∏kernel])
    transposed: bool = False  # stored as the transpose of the layer's (out, in) matrix: see the class docstring
    fused: bool = False
    added_rows: int = 0
    expert: int | None = None  # MoE expert index (a slice of a fused tensor, or a per-expert module)
    expert_slice: bool = False  # True: slice [expert] along dim 0 of the stored tensors; ``name`` ends in [expert]
    kernel: tuple[int, ...] = ()  # a convolution's kernel (stored dims 2..); () for anything else
    note: str | None = None  # how the pair was made where it is not by name (an untied head against an embedding)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape the model stores (a convolution's (out, in, *kernel)); ``shape`` for anything else."""
        if not self.kernel:
            return tuple(self.shape)
        rows, cols = self.shape
        return (rows, cols // math.prod(self.kernel), *self.kernel)

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """A stored tensor of this pair (whole, or rows of it) as the analysed matrix's rows: a
        convolution's (n, in, *kernel) as (n, in·∏kernel) (a view); anything else as it is."""
        return tensor.reshape(tensor.shape[0], -1) if self.kernel else tensor

    def as_stored(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`as_matrix`: rows of the analysed matrix as the model stores them."""
        return matrix.reshape(matrix.shape[0], *self.stored_shape[1:]) if self.kernel else matrix

    def stored_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors of the (out, in) matrix (A: r × in, B: out × r) shaped as PEFT's layer for this
        weight holds them: for a convolution A is a convolution with the layer's kernel
        (r, in, *kernel) and B a 1×1 one (out, r, 1, ...) (PEFT ``lora.layer._ConvNd.update_layer``);
        otherwise as they are."""
        if not self.kernel:
            return lora_a, lora_b
        ones = (1,) * len(self.kernel)
        return (lora_a.reshape(lora_a.shape[0], -1, *self.kernel), lora_b.reshape(*lora_b.shape, *ones))

    def to_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (stored like this pair) as its layer's (out, in) matrix, or back (the transpose is its
        own inverse): what a LoRA's B @ A is (PEFT's ``fan_in_fan_out``, embedding LoRA)."""
        return tensor.T if self.transposed else tensor

    def analysed(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the analyses read it: [out, in], so that left singular vectors are output
        directions; an embedding table stays [vocab, dim], a row per token (docs/intruders.md)."""
        return tensor.T if self.transposed and self.layout != "embedding" else tensor

    @property
    def ft_tensor(self) -> str:
        """The fine-tune's stored tensor name (``name`` without the ``[expert]`` of a slice)."""
        return self.name.rsplit("[", 1)[0] if self.expert_slice else self.name

    @property
    def rows(self) -> tuple[int, int] | None:
        """Dim-0 range to read from the stored tensors: the expert's slice, or None for all of it."""
        return (self.expert, self.expert + 1) if self.expert_slice and self.expert is not None else None

    @property
    def group(self) -> str | None:
        """The tensor an expert's matrix is summarised under: the fused tensor's name, or the
        per-expert name with its index as ``*`` (``mlp.experts.*.gate_proj.weight``); None if not an expert."""
        if self.expert is None:
            return None
        if self.expert_slice:
            return self.ft_tensor
        return EXPERT_INDEX.sub(lambda m: f"{m.group(1)}experts.*.", self.name, count=1)


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class PairPlan:
    """What will be compared, what will not, and the tensors found on one side only."""

    pairs: list[TensorPair] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)
    only_ft: list[str] = field(default_factory=list)
    filtered: int = 0  # names found on both sides but left out by include / exclude
    tied: tuple[str, str] | None = None  # (head, embedding) the config ties: skipped unless they differ (untie)
    tied_base: str | None = None  # the base tensor the tied head pairs with

    @property
    def matrices(self) -> list[TensorPair]:
        return [p for p in self.pairs if p.is_matrix]

    @property
    def vectors(self) -> list[TensorPair]:
        return [p for p in self.pairs if not p.is_matrix]


def module_type(name: str) -> str:
    """The role of a tensor from its name: q, k, v, o, qkv, gate, up, down, embed, lm_head, norm, ..."""
    for kind, pattern in _MODULE_TYPES:
        if pattern.search(name):
            return kind
    return "other"


MODULE_ORDER = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "mlp_in", "mlp_out", "router",
                "experts.gate", "experts.up", "experts.gate_up", "experts.down", "lm_head")


def model_order(name: str) -> tuple[int, int, int, str]:
    """Sort key of a tensor in the model's order, whatever its files' order (a single file's header is
    alphabetical): embeddings, the blocks by index (each in MODULE_ORDER), then the rest (final norm, head)."""
    layer, kind = layer_index(name), module_type(name)
    place = MODULE_ORDER.index(kind) if kind in MODULE_ORDER else len(MODULE_ORDER)
    if layer is not None:
        return (1, layer, place, name)
    return (0 if kind == "embed" else 2, 0, place, name)


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.7.`` -> 7), or None."""
    match = LAYER_INDEX.search(f".{name}")
    return int(match.group(1)) if match else None


def canonical_name(name: str) -> str:
    """``name`` without the wrapper prefixes of WRAPPER_PREFIXES (applied repeatedly)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix):], True
    return name


def _canonical_map(names: Iterable[str]) -> dict[str, str] | None:
    """canonical -> stored name, or None when two stored names collide."""
    mapping: dict[str, str] = {}
    for name in names:
        key = canonical_name(name)
        if key in mapping:
            return None
        mapping[key] = name
    return mapping


def match_names(base_names: Iterable[str], ft_names: Iterable[str]) -> dict[str, str]:
    """Fine-tune name -> base name, exactly when possible, else after dropping wrapper prefixes, else
    across diffusion layouts (an LDM single file and a diffusers folder: :func:`deltakit.io.diffusion_names.common_names`)."""
    base_names, ft_names = list(base_names), list(ft_names)
    exact = {name: name for name in ft_names if name in set(base_names)}
    best = exact
    base_canon, ft_canon = _canonical_map(base_names), _canonical_map(ft_names)
    if base_canon is not None and ft_canon is not None:
        canonical = {ft_canon[key]: base_canon[key] for key in ft_canon if key in base_canon}
        best = canonical if len(canonical) > len(best) else best
    if len(best) < len(ft_names) and is_diffusion_file(base_names) != is_diffusion_file(ft_names):
        base_common, ft_common = common_names(base_names), common_names(ft_names)
        across = {ft_common[key]: base_common[key] for key in ft_common if key in base_common}
        best = across if len(across) > len(best) else best
    return best


def selected(name: str, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> bool:
    """Glob filter on a tensor name: any ``include`` must match (when given), no ``exclude`` may."""
    include, exclude = tuple(include), tuple(exclude)
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def check_names(known: Iterable[str], names: Iterable[str], where: str = "the spectra file") -> list[str]:
    """``names`` as a list, or a DeltakitError naming the closest match for one not in ``known``."""
    known, names = list(known), list(names)
    present = set(known)
    for name in names:
        if name not in present:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            example = known[0] if known else "(none)"
            hint = f"; did you mean {close[0]}?" if close else f"; it has e.g. {example}"
            raise DeltakitError(f"no matrix named {name} in {where}{hint}")
    return names


def adapted_layout(pair: TensorPair, as_stored: tuple[int, ...], transposed: tuple[int, ...], fan_in_fan_out: bool,
                   config: Mapping[str, Any] | None, shown: frozenset[str] = frozenset()) -> str | None:
    """How the model stores the 2-D weight an adapter module changes: "conv1d" (its (out, in) matrix
    transposed, a transformers Conv1D) or "linear"; None when neither ``as_stored`` nor
    ``transposed`` (the module's update shape either way) is the weight's shape.

    PEFT decides by the layer's class and sets ``fan_in_fan_out`` to match it (True for a Conv1D,
    False for an nn.Linear, whatever the config said; ``LoraModel._create_new_module``). The class
    is not in the files, so: where the two shapes differ, the weight's shape decides. A square
    weight is a Conv1D where the model type uses Conv1D there (GPT-2's family); an nn.Linear
    where transformers defines the model type otherwise (a flag saying the opposite is one PEFT
    would reset); and where the model's code is its own (``auto_map``, or a model type
    transformers does not define, or transformers is not installed), as the adapter's
    ``fan_in_fan_out`` says, which PEFT saved after looking at the real layer. PEFT saves the
    flag of the last layer it wrapped, so where the adapter's other layers ``shown`` (the layouts
    their shapes prove) include the kind the flag denies, the model mixes both and a square weight
    is refused; so is a square weight named like a Conv1D layer of a model without a config whose
    adapter says False: nothing tells which way it is stored.
    """
    fits = [layout for layout, shape in (("linear", as_stored), ("conv1d", transposed))
            if tuple(shape) == tuple(pair.shape)]
    if len(fits) <= 1:
        return fits[0] if fits else None
    model_type = config.get("model_type") if config else None
    if model_type in CONV1D_MODEL_TYPES and CONV1D_LEAF.search(pair.name):
        return "conv1d"
    own_code = bool(config and config.get("auto_map")) or not transformers_defines(model_type)
    if not own_code:
        return "linear"
    flagged = "conv1d" if fan_in_fan_out else "linear"
    if shown - {flagged}:
        raise DeltakitError(
            f"cannot tell whether {pair.base_name} is stored [in, out] (a transformers Conv1D) or [out, in]: it is "
            f"square, the model's code is its own, and the adapter changes layers of both kinds while its "
            f"fan_in_fan_out (PEFT saves the last layer's) says {str(fan_in_fan_out).lower()}")
    if fan_in_fan_out:
        return "conv1d"
    if not config and CONV1D_LEAF.search(pair.name):
        raise DeltakitError(
            f"cannot tell whether {pair.base_name} is stored [in, out] (a transformers Conv1D) or [out, in]: "
            "it is square, the model has no config.json, and the adapter's fan_in_fan_out is false; "
            "add the model's config.json to its folder")
    return "linear"


@functools.lru_cache(maxsize=64)
def transformers_defines(model_type: Any) -> bool:
    """Whether ``model_type`` is one of transformers' own model types (False if transformers is absent)."""
    if not isinstance(model_type, str):
        return False
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return False
    return model_type in CONFIG_MAPPING_NAMES


def _is_conv1d(name: str, config: Mapping[str, Any] | None) -> bool:
    if config and config.get("model_type") in CONV1D_MODEL_TYPES:
        return bool(CONV1D_LEAF.search(name))
    return config is None and bool(CONV1D_LEAF.search(name)) and bool(re.search(r"(^|\.)h\.\d+\.", name))


def _tied_names(names: Iterable[str], config: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(lm_head name, embedding name) when the config ties them and both are stored."""
    if not config or not config.get("tie_word_embeddings", False):
        return None
    names = list(names)
    heads = [n for n in names if module_type(n) == "lm_head"]
    embeds = [n for n in names if re.search(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$", n)]
    return (heads[0], embeds[0]) if heads and embeds else None


def untied_head(base: Mapping[str, TensorMeta], ft: Mapping[str, TensorMeta], mapping: Mapping[str, str],
                base_config: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(fine-tune head, base embedding) where the fine-tune stores its own lm_head and the base, tied, stores
    none (``tie_word_embeddings`` not false, as transformers defaults): the base's head *is* its embedding, so
    that is what the fine-tune's head changed from."""
    if base_config is not None and base_config.get("tie_word_embeddings", True) is False:
        return None
    if any(module_type(n) == "lm_head" for n in base):
        return None
    heads = [n for n in ft if module_type(n) == "lm_head" and n not in mapping]
    embeds = [n for n in base if re.search(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$", n)]
    if len(heads) != 1 or len(embeds) != 1 or tuple(ft[heads[0]][0]) != tuple(base[embeds[0]][0]):
        return None
    return heads[0], embeds[0]


UNTIED_NOTE = "the fine-tune stores its own lm_head; the base ties it to {embed}: analysed against that"
DIFFERING_TIED_NOTE = "the config ties it to {embed}, but the stored tensors differ: analysed as stored"


def tied_pair(plan: PairPlan, base: Mapping[str, TensorMeta], ft: Mapping[str, TensorMeta],
              config: Mapping[str, Any] | None) -> TensorPair | Skipped:
    """The pair of a head the config calls tied (``plan.tied``) found to differ from its embedding, with a note."""
    head, embed = plan.tied  # type: ignore[misc]
    found = _pair_one(head, plan.tied_base, base[plan.tied_base], ft[head], config, None)  # type: ignore[index]
    return replace(found, note=DIFFERING_TIED_NOTE.format(embed=embed)) if isinstance(found, TensorPair) else found


def pair_tensors(
    base: Mapping[str, TensorMeta],
    ft: Mapping[str, TensorMeta],
    ft_config: Mapping[str, Any] | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    base_config: Mapping[str, Any] | None = None,
) -> PairPlan:
    """Plan the comparison of two checkpoints from their (shape, dtype) headers.

    A fine-tune that stores its own lm_head against a tied base is paired with the base's embedding
    (:func:`untied_head`); a head the config ties is skipped, and ``plan.tied`` names it so that the
    caller, who can read the tensors, pairs it after all where it differs (:func:`tied_pair`).
    Raises :class:`DeltakitError` when the two share no tensor at all.
    """
    mapping = match_names(base.keys(), ft.keys())
    untied = untied_head(base, ft, mapping, base_config) if mapping else None
    if untied is not None:
        mapping[untied[0]] = untied[1]
    if not mapping:
        raise DeltakitError(
            "base and fine-tune share no tensor names; first base key: "
            f"{next(iter(base), '(none)')}, first fine-tune key: {next(iter(ft), '(none)')}"
        )
    plan = PairPlan()
    matched_base = set(mapping.values())
    plan.only_base = [n for n in base if n not in matched_base and selected(n, include, exclude)]
    plan.only_ft = [n for n in ft if n not in mapping and selected(n, include, exclude)]
    tied = _tied_names(ft.keys(), ft_config)
    plan.tied = tied if tied and tied[0] in mapping and selected(tied[0], include, exclude) else None
    plan.tied_base = mapping[tied[0]] if plan.tied else None
    for ft_name, base_name in sorted(mapping.items(), key=lambda item: model_order(item[0])):
        if not selected(ft_name, include, exclude):
            plan.filtered += 1
            continue
        pair_or_skip = _pair_one(ft_name, base_name, base[base_name], ft[ft_name], ft_config, tied)
        if isinstance(pair_or_skip, TensorPair) and untied is not None and ft_name == untied[0]:
            pair_or_skip = replace(pair_or_skip, note=UNTIED_NOTE.format(embed=untied[1]))
        if isinstance(pair_or_skip, TensorPair):
            expert_slice = pair_or_skip.expert_slice
            plan.pairs += expert_slices(pair_or_skip, base[base_name][0]) if expert_slice else [pair_or_skip]
        else:
            plan.skipped.append(pair_or_skip)
    return plan


def expert_slices(pair: TensorPair, stored_shape: tuple[int, ...]) -> list[TensorPair]:
    """One pair per expert of a fused tensor (E, a, b) or (E, n): ``name[e]``, shape (a, b) or (n,)."""
    return [replace(pair, name=f"{pair.name}[{e}]", expert=e) for e in range(stored_shape[0])]


def _expert_layout(name: str, shape: tuple[int, ...], config: Mapping[str, Any] | None) -> str:
    """Orientation of one expert's (a, b) slice: "input_major" (a = in, as gpt-oss stores it) or "linear".

    gpt-oss is input-major by its model type; otherwise the config's hidden_size decides where
    it is unambiguous (gate/up read hidden, down writes it), and "linear" [out, in] when it is not.
    """
    config = config or {}
    if config.get("model_type") in INPUT_MAJOR_EXPERT_MODELS:
        return "input_major"
    hidden = config.get("hidden_size")
    a, b = shape[-2], shape[-1]
    if not isinstance(hidden, int) or a == b:
        return "linear"
    is_down = module_type(name) == "experts.down"
    return "input_major" if (b == hidden if is_down else a == hidden) else "linear"


def nothing_left_message(plan: PairPlan, matrices_only: bool = False) -> str:
    """Why ``plan`` leaves nothing to compare: names matched, shapes that differ, names on one side only.

    ``matrices_only``: the command compares weight matrices only, so 1-D pairs do not count.
    """
    shape = [s for s in plan.skipped if s.reason.startswith("shape mismatch")]
    other = [s for s in plan.skipped if not s.reason.startswith("shape mismatch")]
    matched = len(plan.pairs) + len(plan.skipped) + plan.filtered
    parts = [f"{matched} name{'s' if matched != 1 else ''} matched"]
    if plan.filtered:
        parts.append(f"{plan.filtered} left out by the include / exclude globs")
    if shape:
        shapes = shape[0].reason.removeprefix("shape mismatch: ")
        parts.append(f"{len(shape)} differ in shape (first {shape[0].name}: {shapes})")
    if other:
        parts.append(f"{len(other)} skipped (first {other[0].name}: {other[0].reason})")
    if matrices_only and plan.pairs:
        parts.append(f"{len(plan.pairs)} are not weight matrices (norms, biases)")
    only_base = len(plan.only_base)
    parts.append(f"{only_base} name{'s' if only_base != 1 else ''} only in the base, {len(plan.only_ft)} only in the "
                 "fine-tune")
    return f"no {'weight matrices' if matrices_only else 'tensor pairs'} left to compare: " + "; ".join(parts)


def _pair_one(
    ft_name: str, base_name: str, base_meta: TensorMeta, ft_meta: TensorMeta,
    config: Mapping[str, Any] | None, tied: tuple[str, str] | None,
) -> TensorPair | Skipped:
    (base_shape, base_dtype), (ft_shape, ft_dtype) = base_meta, ft_meta
    if not (base_dtype.is_floating_point and ft_dtype.is_floating_point):
        return Skipped(ft_name, f"not a floating-point tensor ({ft_dtype})")
    if tied and ft_name == tied[0]:
        return Skipped(ft_name, f"tied to {tied[1]}; analysed once, there")
    kind = module_type(ft_name)
    added_rows = 0
    shape = tuple(ft_shape)
    if tuple(base_shape) != tuple(ft_shape):
        grows_vocab = (
            len(base_shape) == 2 and len(ft_shape) == 2 and base_shape[1] == ft_shape[1]
            and ft_shape[0] > base_shape[0] and EMBEDDING_LEAF.search(ft_name)
        )
        if not grows_vocab:
            return Skipped(ft_name, f"shape mismatch: base {tuple(base_shape)} vs fine-tune {tuple(ft_shape)}")
        added_rows, shape = ft_shape[0] - base_shape[0], tuple(base_shape)
    expert_index = EXPERT_INDEX.search(ft_name)
    expert = int(expert_index.group(2)) if expert_index else None
    if added_rows == 0 and len(shape) == 3 and FUSED_EXPERTS.search(ft_name):
        layout = _expert_layout(ft_name, shape, config)
        return TensorPair(
            name=ft_name, base_name=base_name, shape=shape[1:], base_dtype=base_dtype, ft_dtype=ft_dtype,
            module_type=kind, layer=layer_index(ft_name), layout=layout, transposed=layout == "input_major",
            expert_slice=True,
        )
    if added_rows == 0 and len(shape) == 2 and EXPERT_BIAS.search(ft_name):
        return TensorPair(
            name=ft_name, base_name=base_name, shape=shape[1:], base_dtype=base_dtype, ft_dtype=ft_dtype,
            module_type=kind, layer=layer_index(ft_name), layout="vector", expert_slice=True,
        )
    if 3 <= len(shape) <= 5 and ft_name.endswith(".weight") and added_rows == 0:  # nn.Conv1d / 2d / 3d
        return TensorPair(
            name=ft_name, base_name=base_name, shape=(shape[0], math.prod(shape[1:])), base_dtype=base_dtype,
            ft_dtype=ft_dtype, module_type=kind, layer=layer_index(ft_name), layout="conv", expert=expert,
            kernel=tuple(shape[2:]),
        )
    if len(shape) == 1 or (len(shape) == 2 and min(shape) == 1):
        layout = "vector"
    elif len(shape) != 2:
        return Skipped(ft_name, f"{len(shape)}-D tensor {shape}; only matrices and vectors are analysed")
    elif kind in ("embed", "lm_head"):
        layout = "embedding"
    else:
        layout = "conv1d" if _is_conv1d(ft_name, config) else "linear"
    return TensorPair(
        name=ft_name, base_name=base_name, shape=shape, base_dtype=base_dtype, ft_dtype=ft_dtype,
        module_type=kind, layer=layer_index(ft_name), layout=layout,
        transposed=layout == "conv1d" or (layout == "embedding" and kind == "embed"),
        fused=bool(FUSED_LEAF.search(ft_name)), added_rows=added_rows, expert=expert,
    )
