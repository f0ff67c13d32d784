"""Every layout PEFT can merge, against PEFT itself, built from PEFT's own test matrix.

The layer types and options of PEFT's ``tests/test_custom_models.py`` (an MLP, an embedding with a
transformers Conv1D, nn.Conv1d / 2d / 3d, 1×1 and grouped convolutions, nn.MultiheadAttention) on
small models, ``init_weights=False`` and noise on every trainable parameter. Per case:

* merge equals PEFT's ``merge_and_unload`` within 1e-5 relative (Frobenius, per tensor) in fp32,
  and so does PEFT's own fp32 merge against its fp64 merge (the reference is the fp64 one);
* rank (``--exact``, fp64) reports every changed tensor, a matrix's rank equal to
  ``torch.linalg.matrix_rank`` of PEFT's fp64 ΔW (a convolution's as its (out, in·∏kernel) matrix);
* unmerge returns the base (with the original model where ΔW depends on it);
* for some, a LoRA extracted from base and merged model (or from the adapter: a transformers
  Conv1D outside GPT-2's family is told from an nn.Linear by the adapter's fan_in_fan_out only) loads
  in PEFT and reproduces the merged model's forward pass.

A case PEFT itself cannot merge is not listed; what PEFT refuses (a grouped convolution under
LoRA) deltakit refuses with the layer named.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

REL_TOL = 1e-5


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))

    @staticmethod
    def example():
        return (torch.randn(3, 10),)


class EmbConv1D(nn.Module):
    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)  # stored [in, out] = (5, 1): PEFT's test model
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1))

    @staticmethod
    def example():
        return (torch.arange(30).reshape(3, 10),)


def conv_model(kind: type, in_channels: int, out_channels: int, kernel: Any, groups: int = 1,
               spatial: tuple[int, ...] = (6,)) -> type:
    class ConvModel(nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, kind.__name__.lower(), kind(in_channels, out_channels, kernel, groups=groups))
            self.lin0 = nn.Linear(out_channels, 2)

        def forward(self, x):
            y = getattr(self, kind.__name__.lower())(x)
            return self.lin0(y.flatten(2).mean(-1))

        @staticmethod
        def example():
            return (torch.randn(2, in_channels, *spatial),)

    return ConvModel


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])

    @staticmethod
    def example():
        return (torch.randn(4, 3, 10),)


MODELS: dict[str, Callable[[], type]] = {
    "MLP": lambda: MLP,
    "EmbConv1D": lambda: EmbConv1D,
    "Conv1d": lambda: conv_model(nn.Conv1d, 6, 8, 3),
    "Conv2d": lambda: conv_model(nn.Conv2d, 5, 10, 3, spatial=(5, 5)),
    "Conv2d1x1": lambda: conv_model(nn.Conv2d, 5, 10, 1, spatial=(4, 4)),
    "Conv2dGroups": lambda: conv_model(nn.Conv2d, 4, 8, 3, groups=2, spatial=(5, 5)),
    "Conv3d": lambda: conv_model(nn.Conv3d, 3, 6, (3, 2, 2), spatial=(4, 3, 3)),
    "MHA": lambda: Mha,
}


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    config: str  # a PEFT config class name
    kwargs: dict[str, Any] = field(default_factory=dict)
    extract: str = ""  # extract a LoRA from base and "model" (the merged one) or "adapter", and load it in PEFT


CASES = [
    # LoRA / DoRA on linear layers, transformers Conv1D, embeddings, convolutions, attention
    Case("mlp lora rslora patterns", "MLP", "LoraConfig", dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=7,
                                                                use_rslora=True, alpha_pattern={"lin1": 3})),
    Case("mlp lora modules_to_save", "MLP", "LoraConfig", dict(target_modules=["lin0"], modules_to_save=["lin1"])),
    Case("mlp lora_bias", "MLP", "LoraConfig", dict(target_modules=["lin0", "lin1"], lora_bias=True, lora_alpha=32)),
    Case("mlp dora", "MLP", "LoraConfig", dict(target_modules=["lin0", "lin1"], use_dora=True), extract="model"),
    Case("mlp lora on a parameter", "MLP", "LoraConfig", dict(target_modules=["lin0"], target_parameters=["lin1.weight"])),
    Case("conv1D lora", "EmbConv1D", "LoraConfig", dict(target_modules=["conv1d"]), extract="adapter"),
    Case("conv1D emb lora", "EmbConv1D", "LoraConfig", dict(target_modules=["emb", "conv1d"])),
    Case("conv1D dora", "EmbConv1D", "LoraConfig", dict(target_modules=["emb", "conv1d"], use_dora=True)),
    Case("conv1D trainable tokens", "EmbConv1D", "LoraConfig", dict(target_modules=["conv1d"],
                                                                     trainable_token_indices={"emb": [0, 10]})),
    Case("conv1d lora", "Conv1d", "LoraConfig", dict(target_modules=["conv1d"]), extract="model"),
    Case("conv1d dora", "Conv1d", "LoraConfig", dict(target_modules=["conv1d"], use_dora=True)),
    Case("conv2d lora", "Conv2d", "LoraConfig", dict(target_modules=["conv2d", "lin0"]), extract="model"),
    Case("conv2d dora", "Conv2d", "LoraConfig", dict(target_modules=["conv2d", "lin0"], use_dora=True)),
    Case("conv2d lora_bias", "Conv2d", "LoraConfig", dict(target_modules=["conv2d"], lora_bias=True, lora_alpha=32)),
    Case("conv2d 1x1 dora", "Conv2d1x1", "LoraConfig", dict(target_modules=["conv2d"], use_dora=True)),
    Case("conv3d lora", "Conv3d", "LoraConfig", dict(target_modules=["conv3d", "lin0"]), extract="model"),
    Case("conv3d dora", "Conv3d", "LoraConfig", dict(target_modules=["conv3d"], use_dora=True)),
    Case("conv3d lora_bias", "Conv3d", "LoraConfig", dict(target_modules=["conv3d"], lora_bias=True, lora_alpha=32)),
    Case("mha lora", "MHA", "LoraConfig", dict(target_modules=["mha", "lin0"])),
    # LoHa, LoKr (with and without CP cores, decompose_both), on linear layers and convolutions
    Case("mlp loha", "MLP", "LoHaConfig", dict(target_modules=["lin0", "lin1"], alpha=4)),
    Case("conv2d loha", "Conv2d", "LoHaConfig", dict(target_modules=["conv2d", "lin0"])),
    Case("conv2d loha cp", "Conv2d", "LoHaConfig", dict(target_modules=["conv2d"], use_effective_conv2d=True)),
    Case("conv1d loha cp", "Conv1d", "LoHaConfig", dict(target_modules=["conv1d"], r=2, use_effective_conv2d=True)),
    Case("conv2d groups loha", "Conv2dGroups", "LoHaConfig", dict(target_modules=["conv2d"])),
    Case("mlp lokr decompose_both", "MLP", "LoKrConfig", dict(target_modules=["lin0"], decompose_both=True, r=1,
                                                               alpha=1)),
    Case("conv2d lokr", "Conv2d", "LoKrConfig", dict(target_modules=["conv2d", "lin0"])),
    Case("conv2d lokr cp decompose_both", "Conv2d", "LoKrConfig", dict(
        target_modules=["conv2d", "lin0"], r=1, use_effective_conv2d=True, decompose_both=True, decompose_factor=4)),
    Case("conv1d lokr", "Conv1d", "LoKrConfig", dict(target_modules=["conv1d"], r=4)),
    Case("conv1d lokr r=1", "Conv1d", "LoKrConfig", dict(target_modules=["conv1d"], r=1)),
    Case("conv2d groups lokr", "Conv2dGroups", "LoKrConfig", dict(target_modules=["conv2d"])),
    # IA3 (output or input channels), AdaLoRA, VeRA
    Case("mlp ia3", "MLP", "IA3Config", dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    Case("conv1D ia3 modules_to_save", "EmbConv1D", "IA3Config", dict(
        target_modules=["conv1d"], feedforward_modules=["conv1d"], modules_to_save=["lin0"])),
    Case("conv1D ia3", "EmbConv1D", "IA3Config", dict(target_modules=["conv1d", "lin0"],
                                                       feedforward_modules=["conv1d", "lin0"])),
    Case("conv1D ia3 not feedforward", "EmbConv1D", "IA3Config", dict(target_modules=["conv1d"],
                                                                       feedforward_modules=[])),
    Case("conv2d ia3", "Conv2d", "IA3Config", dict(target_modules=["conv2d", "lin0"], feedforward_modules=[])),
    Case("conv2d ia3 feedforward", "Conv2d", "IA3Config", dict(target_modules=["conv2d", "lin0"],
                                                                feedforward_modules=["conv2d"])),
    Case("conv2d groups ia3 feedforward", "Conv2dGroups", "IA3Config", dict(target_modules=["conv2d"],
                                                                             feedforward_modules=["conv2d"])),
    Case("conv3d ia3 feedforward", "Conv3d", "IA3Config", dict(target_modules=["conv3d"],
                                                                feedforward_modules=["conv3d"])),
    Case("mlp adalora", "MLP", "AdaLoraConfig", dict(target_modules=["lin0"], init_r=6, target_r=3, total_step=10)),
    Case("conv1D adalora", "EmbConv1D", "AdaLoraConfig", dict(target_modules=["conv1d"], init_r=4, total_step=10)),
    Case("conv2d adalora", "Conv2d", "AdaLoraConfig", dict(target_modules=["conv2d"], init_r=4, total_step=10)),
    Case("conv1D vera", "EmbConv1D", "VeraConfig", dict(target_modules=["conv1d"], r=4)),
    Case("mlp vera without projections", "MLP", "VeraConfig", dict(target_modules=["lin0", "lin1"], r=4,
                                                                    save_projection=False, projection_prng_key=7)),
]

# Every other weight-changing type the installed PEFT merges, applied through PEFT's own layer
# (deltakit.adapters.peft_layer): on linear layers, convolutions, transformers Conv1D and embeddings.
THROUGH_PEFT = [
    Case("mlp oft", "MLP", "OFTConfig", dict(target_modules=["lin0"], r=2, oft_block_size=0, use_cayley_neumann=False)),
    Case("conv2d oft", "Conv2d", "OFTConfig", dict(target_modules=["conv2d"], r=5, oft_block_size=0)),
    Case("conv1D emb oft", "EmbConv1D", "OFTConfig", dict(target_modules=["emb"], r=1, oft_block_size=0)),
    Case("mlp boft", "MLP", "BOFTConfig", dict(target_modules=["lin0", "lin1"], boft_block_size=2)),
    Case("conv2d boft", "Conv2d", "BOFTConfig", dict(target_modules=["conv2d"], boft_block_size=45,
                                                      boft_block_num=0, boft_n_butterfly_factor=1)),
    Case("mlp hra", "MLP", "HRAConfig", dict(target_modules=["lin0", "lin1"])),
    Case("conv2d hra", "Conv2d", "HRAConfig", dict(target_modules=["conv2d"])),
    Case("mlp fourierft", "MLP", "FourierFTConfig", dict(target_modules=["lin0", "lin1"], n_frequency=20)),
    Case("mlp waveft", "MLP", "WaveFTConfig", dict(target_modules=["lin0", "lin1"], n_frequency=20)),
    Case("mlp c3a", "MLP", "C3AConfig", dict(target_modules=["lin0", "lin1"], block_size=2)),
    Case("mlp miss", "MLP", "MissConfig", dict(target_modules=["lin0", "lin1"], r=2)),
    Case("mlp shira", "MLP", "ShiraConfig", dict(target_modules=["lin0", "lin1"], r=1)),
    Case("mlp delora", "MLP", "DeloraConfig", dict(target_modules=["lin0", "lin1"])),
    Case("mlp gralora", "MLP", "GraloraConfig", dict(target_modules=["lin0", "lin1"])),
    Case("mlp hira", "MLP", "HiraConfig", dict(target_modules=["lin0", "lin1"])),
    Case("mlp osf", "MLP", "OSFConfig", dict(target_modules=["lin0", "lin1"])),
    Case("mlp peanut", "MLP", "PeanutConfig", dict(target_modules=["lin0", "lin1"])),
    Case("mlp psoft", "MLP", "PsoftConfig", dict(target_modules=["lin0"], r=4)),
    Case("mlp supertuning", "MLP", "SupertuningConfig", dict(target_modules=["lin0", "lin1"], sparsity=0.5)),
    Case("conv1D deft", "EmbConv1D", "DeftConfig", dict(target_modules=["conv1d"])),
    Case("mlp vblora", "MLP", "VBLoRAConfig", dict(target_modules=["lin0", "lin1"], r=2, vector_length=2,
                                                   num_vectors=16, topk=2)),
    Case("mlp randlora", "MLP", "RandLoraConfig", dict(target_modules=["lin0", "lin1"])),
    Case("mlp pvera", "MLP", "PveraConfig", dict(target_modules=["lin0", "lin1"])),
    Case("conv1D trainable tokens type", "EmbConv1D", "TrainableTokensConfig", dict(target_modules=["emb"],
                                                                                    token_indices=[0, 3])),
]
CASES += THROUGH_PEFT

def peft_config(case: Case):
    """The case's PEFT config, its adapter initialised away from the identity (``init_*=False``)."""
    import inspect

    import peft

    config_class = getattr(peft, case.config)
    flags = [f for f in ("init_lora_weights", "init_weights", "init_ia3_weights")
             if f in inspect.signature(config_class).parameters]
    return config_class(**{**{f: False for f in flags}, **case.kwargs})


def base_model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[case.model]()().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)  # IA3 and lora_bias change biases: none of them zero
    return model


def write_adapter(model: nn.Module, case: Case, folder) -> None:
    """PEFT's adapter of ``case`` with noise on every trainable parameter, saved by PEFT."""
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), peft_config(case))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(folder)


def peft_merged(model: nn.Module, adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(model).to(dtype), adapter).to(dtype)
    return {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}


def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm()) / max(float(reference.double().norm()), 1e-30)


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(delta.shape[0], -1) if delta.dim() > 2 else delta


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case name -> (base model, base folder, adapter folder, fp32 and fp64 PEFT merges), made once."""
    root = tmp_path_factory.mktemp("layouts")
    cache: dict[str, Any] = {}

    def get(case: Case):
        if case.name not in cache:
            folder = root / case.name.replace(" ", "_")
            model = base_model(case)
            (folder / "base").mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "base" / "model.safetensors")
            write_adapter(model, case, folder / "adapter")
            merged32 = peft_merged(model, folder / "adapter", torch.float32)
            try:
                merged64 = peft_merged(model, folder / "adapter", torch.float64)
            except TypeError:  # PSOFT initialises in fp32/fp16/bf16 only: its fp32 merge is the reference
                merged64 = {k: v.double() for k, v in merged32.items()}
            cache[case.name] = (model, folder, merged32, merged64)
        return cache[case.name]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_merge_rank_unmerge_as_peft(built, tmp_path, case):
    import deltakit
    from deltakit.spectral.options import SpectralOptions

    model, folder, merged32, merged64 = built(case)
    base = {k: v.detach() for k, v in model.state_dict().items()}
    changed = [k for k in base if not torch.equal(merged64[k].float(), base[k])]
    assert changed, "the adapter changes the model"

    report = deltakit.merge(folder / "base", folder / "adapter", tmp_path / "merged", device="cpu")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(ours) == set(base)
    for name, reference in merged64.items():
        assert relative(merged32[name], reference) <= REL_TOL, (name, "PEFT's own fp32 merge")
        assert relative(ours[name], reference) <= REL_TOL, name
    assert report.lora_modules >= 1
    assert report.adapter_types == [{"LoraConfig": "DORA" if case.kwargs.get("use_dora") else "LORA"}.get(
        case.config, peft_config(case).peft_type.value)]

    options = SpectralOptions(precision="fp64", exact=True, device="cpu")
    ranked = deltakit.rank(folder / "base", folder / "adapter", options=options)
    matrices = {m.name: m for m in ranked.matrices}
    vectors = {v.name: v for v in ranked.vectors}
    for name in changed:
        delta = merged64[name] - base[name].double()
        if delta.dim() == 1 or min(delta.shape) == 1:
            assert name in vectors or name in matrices, name
            continue
        assert matrices[name].rank == int(torch.linalg.matrix_rank(as_matrix(delta))), name
    assert set(matrices) | set(vectors) == set(changed)

    replaced = "modules_to_save" in case.kwargs
    needs_base = case.kwargs.get("use_dora") or "trainable_token_indices" in case.kwargs or case in THROUGH_PEFT
    deltakit.unmerge(tmp_path / "merged", folder / "adapter", tmp_path / "again", device="cpu",
                     base=folder / "base" if needs_base else None, keep_replaced=replaced)
    again = load_file(tmp_path / "again" / "model.safetensors")
    kept = {f"{m}.{p}" for m in case.kwargs.get("modules_to_save", []) for p in ("weight", "bias")}
    for name, value in base.items():
        expected = ours[name] if name in kept else value
        assert relative(again[name], expected) <= REL_TOL, name

    if case.extract:
        out = tmp_path / "extracted"
        source = tmp_path / "merged" if case.extract == "model" else folder / "adapter"
        deltakit.extract_lora(folder / "base", source, out, rank=64,
                              options=SpectralOptions(exact=True, device="cpu"))
        from peft import PeftModel

        fine_tuned = copy.deepcopy(model)
        fine_tuned.load_state_dict(ours)
        adapted = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
        inputs = model.example()
        with torch.no_grad():
            expected, got = fine_tuned(*inputs), adapted(*inputs)
        assert relative(got, expected) <= 1e-5
        assert relative(model(*inputs), expected) > 1e-3  # the adapter matters


def test_rank_lists_replacements_and_token_rows(built):
    """Tensors carried whole and rows set by trainable tokens are where they belong, with how they changed."""
    import deltakit

    _, folder, _, _ = built(next(c for c in CASES if c.name == "mlp lora modules_to_save"))
    report = deltakit.rank(folder / "base", folder / "adapter").to_dict()
    assert {m["name"]: m.get("change") for m in report["matrices"]} == {
        "lin0.weight": None, "lin1.weight": "replaced whole by the adapter (modules_to_save)"}
    assert [v["name"] for v in report["vectors"]] == ["lin1.bias"] and report["vectors"][0]["changed"]
    _, folder, merged, _ = built(next(c for c in CASES if c.name == "conv1D trainable tokens"))
    report = deltakit.rank(folder / "base", folder / "adapter").to_dict()
    emb = next(m for m in report["matrices"] if m["name"] == "emb.weight")
    assert emb["change"] == "rows 0, 10 replaced (trainable tokens)" and emb["rank"] == 2


def test_trainable_tokens_unmerge_needs_the_original(built, tmp_path):
    import deltakit

    _, folder, _, _ = built(next(c for c in CASES if c.name == "conv1D trainable tokens"))
    deltakit.merge(folder / "base", folder / "adapter", tmp_path / "merged", device="cpu")
    with pytest.raises(deltakit.DeltakitError, match="rows set by trainable tokens"):
        deltakit.unmerge(tmp_path / "merged", folder / "adapter", tmp_path / "again", device="cpu")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("config", [dict(target_modules=["conv2d"]),
                                    dict(target_modules=["conv2d"], use_dora=True)], ids=["lora", "dora"])
def test_grouped_convolution_is_refused_naming_the_layer(tmp_path, runner, config):
    """PEFT cannot merge LoRA into a convolution with groups > 1 (peft#2403); neither does deltakit."""
    from conftest import assert_one_line_error, invoke

    case = Case("groups", "Conv2dGroups", "LoraConfig", config)
    model = base_model(case)
    (tmp_path / "base").mkdir()
    save_file(dict(model.state_dict()), tmp_path / "base" / "model.safetensors")
    write_adapter(model, case, tmp_path / "adapter")
    with pytest.raises(NotImplementedError):  # PEFT's own refusal
        peft_merged(model, tmp_path / "adapter", torch.float32)
    for command in (["merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out"],
                    ["rank", tmp_path / "base", tmp_path / "adapter"]):
        result = invoke(runner, *command)
        assert_one_line_error(result, "conv2d is a LoRA on a convolution with groups=2")
    assert not (tmp_path / "out").exists()


def test_vera_projections_are_regenerated_as_peft_draws_them(built):
    """The projections PEFT saved equal deltakit's regeneration from the same key."""
    from deltakit.adapters.vera import regenerated_projections

    case = Case("vera", "MLP", "VeraConfig", dict(target_modules=["lin0", "lin1"], r=4, projection_prng_key=7))
    _, folder, _, _ = built(case)
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    vera_a, vera_b = regenerated_projections(7, 4, 20, 20)  # in_max 20 (lin1), out_max 20 (lin0)
    assert torch.equal(saved["base_model.vera_A"], vera_a) and torch.equal(saved["base_model.vera_B"], vera_b)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fused_expert_parameters_of_a_per_expert_checkpoint(tmp_path, arch):
    """transformers saves Mixtral and Qwen3-MoE experts one tensor per expert (block_sparse_moe.experts.<e>.w1,
    mlp.experts.<e>.gate_proj) but builds them fused; a target_parameters adapter names the fused
    parameters. Merge equals merge_and_unload once transformers reads the merged folder back; rank gives each
    stored expert tensor the fp64 rank of PEFT's ΔW rows; unmerge returns the base."""
    import transformers
    from peft import LoraConfig, get_peft_model

    import deltakit
    from deltakit.spectral.options import SpectralOptions

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8, num_experts_per_tok=2)
    if arch == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=24, num_local_experts=3, **common)
        model_class, gate, up, down = transformers.MixtralForCausalLM, "block_sparse_moe.experts.{}.w1", \
            "block_sparse_moe.experts.{}.w3", "block_sparse_moe.experts.{}.w2"
    else:
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=24, intermediate_size=32, num_experts=3, **common)
        model_class, gate, up, down = transformers.Qwen3MoeForCausalLM, "mlp.experts.{}.gate_proj", \
            "mlp.experts.{}.up_proj", "mlp.experts.{}.down_proj"
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(tmp_path / "base")
    stored = set(load_file(tmp_path / "base" / "model.safetensors"))
    assert f"model.layers.0.{gate.format(2)}.weight" in stored and "model.layers.0.mlp.experts.gate_up_proj" not in stored
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = peft_merged(model, tmp_path / "adapter", torch.float64)
    deltakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", device="cpu")
    ours = model_class.from_pretrained(tmp_path / "merged").state_dict()
    base = model.state_dict()
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert not torch.equal(reference[fused].float(), base[fused])
    for name, value in reference.items():
        assert relative(ours[name], value) <= REL_TOL, name

    report = deltakit.rank(tmp_path / "base", tmp_path / "adapter",
                           options=SpectralOptions(precision="fp64", exact=True, device="cpu"))
    ranks = {m.name: m.rank for m in report.matrices}
    delta = reference[fused] - base[fused].double()  # (E, 2I, H): gate rows over up rows
    for expert in range(3):
        for leaf, rows in ((gate, delta[expert, :24]), (up, delta[expert, 24:])):
            assert ranks[f"model.layers.1.{leaf.format(expert)}.weight"] == int(torch.linalg.matrix_rank(rows))
        down_delta = reference["model.layers.1.mlp.experts.down_proj"][expert] - \
            base["model.layers.1.mlp.experts.down_proj"][expert].double()
        assert ranks[f"model.layers.1.{down.format(expert)}.weight"] == int(torch.linalg.matrix_rank(down_delta))
    assert len(ranks) == 2 + 2 * 9  # q_proj and 3 experts × (gate, up, down) in each layer

    deltakit.unmerge(tmp_path / "merged", tmp_path / "adapter", tmp_path / "again", device="cpu")
    again, original = load_file(tmp_path / "again" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    for name, value in original.items():
        assert relative(again[name], value) <= REL_TOL, name


def test_weighted_ia3_unmerge_keeps_precision_where_gains_cancel(built, tmp_path):
    """Two IA3 vectors weighted so that a row's factor f = 1 + Σ wᵢ(lᵢ − 1) is 8.5e-4: merge writes W0 ⊙ f
    and unmerge divides it out, both against an fp64 reference, to fp32's own precision (formed in fp32,
    f's rounding made the unmerge lose ~5e-5)."""
    import deltakit

    case = next(c for c in CASES if c.name == "mlp ia3")
    model, folder, _, _ = built(case)
    weights = (0.7, 0.3)
    tensors = load_file(folder / "adapter" / "adapter_model.safetensors")
    second = {}
    for key, first in tensors.items():
        generator = torch.Generator().manual_seed(len(key))
        target = 1 + 0.5 * torch.rand(first.shape, generator=generator, dtype=torch.float64)
        target.view(-1)[0] = 8.5e-4  # one cancelling row (or column) per layer
        second[key] = ((target - 1 - weights[0] * (first.double() - 1)) / weights[1] + 1).float()
    other = tmp_path / "ia3-b"
    other.mkdir()
    (other / "adapter_config.json").write_text((folder / "adapter" / "adapter_config.json").read_text())
    save_file(second, other / "adapter_model.safetensors")

    deltakit.merge(folder / "base", [folder / "adapter", other], tmp_path / "merged", weights=weights, device="cpu")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = {k: v.detach() for k, v in model.state_dict().items()}
    factor = {"lin0.weight": lambda g: g.reshape(-1, 1), "lin1.weight": lambda g: g.reshape(1, -1),
              "lin0.bias": lambda g: g.reshape(-1)}
    for name, shape_gain in factor.items():
        module = name.rpartition(".")[0]
        key = f"base_model.model.{module}.ia3_l"
        gain = 1 + sum(w * (t[key].double() - 1) for w, t in zip(weights, (tensors, second)))
        assert float(gain.abs().min()) < 1e-3
        expected = base[name].double() * shape_gain(gain)
        assert relative(merged[name], expected) <= 1e-7, name
    deltakit.unmerge(tmp_path / "merged", [folder / "adapter", other], tmp_path / "again", weights=weights, device="cpu")
    again = load_file(tmp_path / "again" / "model.safetensors")
    for name, value in base.items():
        assert float(((again[name].double() - value.double()) / value.double().abs().clamp_min(1e-3)).abs().max()) <= 1e-6, name


@pytest.mark.parametrize("config, message", [
    ("RoadConfig", "the ROAD adapter changes the bias of lin0 as well"),
    ("TinyLoraConfig", "the TINYLORA adapter keeps tensors shared by all layers"),
], ids=["road on a biased layer", "tinylora"])
def test_what_one_layer_of_peft_cannot_reproduce_is_refused(tmp_path, runner, config, message):
    """PEFT merges these, but not one layer at a time: RoAd rotates the bias too, TinyLoRA ties vectors
    across the model's layers. Refused with the reason, nothing written."""
    from conftest import assert_one_line_error, invoke

    kwargs = dict(target_modules=["lin0", "lin1"], **({"group_size": 2} if config == "RoadConfig" else {"r": 2, "u": 4}))
    case = Case("refused", "MLP", config, kwargs)
    model = base_model(case)
    (tmp_path / "base").mkdir()
    save_file(dict(model.state_dict()), tmp_path / "base" / "model.safetensors")
    write_adapter(model, case, tmp_path / "adapter")
    peft_merged(model, tmp_path / "adapter", torch.float32)  # PEFT itself merges it
    result = invoke(runner, "merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", "--device", "cpu")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()
