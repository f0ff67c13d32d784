"""Diffusion checkpoints: diffusers folders, single-file (LDM) checkpoints, kohya / LyCORIS and diffusers LoRA files.

Tiny real architectures built from configs (a diffusers UNet2DConditionModel, a transformers CLIP text
encoder); the references are the outside tools themselves: diffusers' convert_ldm_unet_checkpoint for
the name mapping, LyCORIS's extraction, loader and merge, diffusers' LoRA loader and save_lora_weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, invoke


from diffusers import UNet2DConditionModel  # noqa: E402
from lycoris.wrapper import LycorisNetwork  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from deltakit.adapters import base_info, open_adapter  # noqa: E402
from deltakit.errors import DeltakitError  # noqa: E402
from deltakit.io.checkpoint import open_checkpoint  # noqa: E402
from deltakit.io.diffusion_names import KohyaNamer, UnetBlocks, unet_from_ldm, unet_to_ldm  # noqa: E402
from deltakit.lora import extract_lora, merge, unmerge  # noqa: E402
from deltakit.lora.ranks import RankChoice, kohya_rank  # noqa: E402

UNET = dict(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=24, attention_head_dim=4,
            norm_num_groups=8, use_linear_projection=True)
SD_LIKE = dict(layers_per_block=1, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SDXL_LIKE = dict(layers_per_block=2, block_out_channels=(16, 32, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=48,
                 transformer_layers_per_block=(1, 1, 2))
CLIP = dict(vocab_size=50, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
RANK = 2  # the rank of every fine-tune update below


def low_rank_finetune(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with every nn.Linear and nn.Conv2d weight moved by a random rank-RANK update of its (out, in·kh·kw)
    matrix (norms kept), except a convolution of at most 2·RANK output channels (the UNet's conv_out): LyCORIS's
    extraction would store that update whole (``diff``, rank ≥ out / 2), which has a test of its own."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.shape[0] > 2 * RANK:
                out_features, in_features = module.weight.shape[0], module.weight[0].numel()
                update = torch.randn(out_features, RANK, generator=generator) @ torch.randn(
                    RANK, in_features, generator=generator)
                module.weight += 0.05 * update.reshape(module.weight.shape)
    return model


def matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as the (out, in·∏kernel) matrix kohya, LyCORIS and deltakit factor."""
    return tensor.reshape(tensor.shape[0], -1)


def copy_of(model: torch.nn.Module, make) -> torch.nn.Module:
    other = make()
    other.load_state_dict(model.state_dict())
    return other


def ldm_state(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """An SD 1.x-style single file: the UNet in LDM names, the text encoder under cond_stage_model.transformer."""
    state = unet.state_dict()
    blocks = UnetBlocks.of(state)
    out = {f"model.diffusion_model.{unet_to_ldm(k, blocks)}": v.contiguous() for k, v in state.items()}
    if text_encoder is not None:
        out.update({f"cond_stage_model.transformer.{k}": v.contiguous() for k, v in text_encoder.state_dict().items()})
    return out


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b)
    return (num / sum(float(b[k].double().norm() ** 2) for k in b)) ** 0.5


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD-like pair: UNet and text encoder folders, the same as LDM single files, LyCORIS's extraction."""
    from lycoris.utils import extract_diff

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    make_unet = lambda: UNet2DConditionModel(**UNET, **SD_LIKE)  # noqa: E731
    make_te = lambda: CLIPTextModel(CLIPTextConfig(**CLIP))  # noqa: E731
    unet, te = make_unet(), make_te()
    unet_ft, te_ft = low_rank_finetune(copy_of(unet, make_unet), 1), low_rank_finetune(copy_of(te, make_te), 2)
    for model, name in ((unet, "unet"), (unet_ft, "unet_ft"), (te, "te"), (te_ft, "te_ft")):
        model.save_pretrained(root / name)
    save_file(ldm_state(unet, te), root / "base.safetensors")
    save_file(ldm_state(unet_ft, te_ft), root / "ft.safetensors")
    # LyCORIS's extraction, convolutions included: 3×3 ones as Tucker LoCon (lora_mid; its default small_conv),
    # or as plain LoCon (small_conv=False, extract_locon.py --disable_cp)
    save_file(extract_diff([te], [te_ft], unet, unet_ft, mode="fixed", linear_mode_param=RANK, conv_mode_param=RANK),
              root / "lyco.safetensors")
    save_file(extract_diff([te], [te_ft], unet, unet_ft, mode="fixed", linear_mode_param=RANK, conv_mode_param=RANK,
                           small_conv=False), root / "lyco-locon.safetensors")
    return root


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL-like UNet pair (add_embedding: text_time): diffusers folders, and the same as LDM single files."""
    root = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    make_unet = lambda: UNet2DConditionModel(**UNET, **SDXL_LIKE)  # noqa: E731
    unet = make_unet()
    fine_tune = low_rank_finetune(copy_of(unet, make_unet), 1)
    for model, name in ((unet, "unet"), (fine_tune, "unet_ft")):
        model.save_pretrained(root / name)
        save_file(ldm_state(model, None), root / f"{name}.safetensors")
    return root


@pytest.fixture
def kohya_prefix(monkeypatch):
    """LyCORIS names its modules with a class-wide prefix: lora_unet, as kohya files have."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")


def load_unet(folder):
    return UNet2DConditionModel.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("config", [SD_LIKE, SDXL_LIKE], ids=["sd", "sdxl"])
def test_ldm_names_are_diffusers_conversion_both_ways(config):
    """unet_to_ldm, read back by diffusers' own convert_ldm_unet_checkpoint, gives every tensor its name again;
    unet_from_ldm inverts it; the structure reads the same from either layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(**UNET, **config)
    state = unet.state_dict()
    blocks = UnetBlocks.of(state)
    ldm = {f"model.diffusion_model.{unet_to_ldm(k, blocks)}": v for k, v in state.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert all(unet_from_ldm(unet_to_ldm(k, blocks), blocks) == k for k in state)
    assert UnetBlocks.of(k.removeprefix("model.diffusion_model.") for k in ldm) == blocks


def test_kohya_names_follow_sd_scripts():
    """An SD 1.x UNet in diffusers names (sd-scripts converts a single file's), an SDXL UNet in LDM names
    (sd-scripts' sdxl_original_unet), a diffusers folder's converted; text encoders with transformers 4's
    text_model_ whatever the stored spelling."""
    sd_names = [f"model.diffusion_model.{n}.weight" for n in ("input_blocks.1.1.proj_in", "input_blocks.3.0.op",
                                                              "output_blocks.2.1.conv", "middle_block.1.proj_in")]
    namer = KohyaNamer(sd_names + ["cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"])
    assert namer("model.diffusion_model.input_blocks.1.1.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert namer("cond_stage_model.transformer.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    unet = UNet2DConditionModel(**UNET, **SDXL_LIKE)
    assert KohyaNamer(unet.state_dict())("down_blocks.1.attentions.0.proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert KohyaNamer(unet.state_dict())("add_embedding.linear_2") == "lora_unet_label_emb_0_2"
    ldm = ldm_state(unet, None)
    assert KohyaNamer(ldm)("model.diffusion_model.input_blocks.4.1.proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert KohyaNamer(["text_model.encoder.layers.0.mlp.fc1.weight"], folder="text_encoder_2")(
        "text_model.encoder.layers.0.mlp.fc1") == "lora_te2_text_model_encoder_layers_0_mlp_fc1"


# ------------------------------------------------------------------------------- LyCORIS's own files


@pytest.mark.parametrize("file", ["lyco.safetensors", "lyco-locon.safetensors"], ids=["tucker", "locon"])
def test_merge_of_lycoris_extraction_equals_lycoris_merge(sd, tmp_path, kohya_prefix, file):
    """A kohya file made by LyCORIS's extraction, convolutions included (Tucker LoCon with lora_mid, or plain
    LoCon), merged by deltakit into the diffusers UNet folder, is what LyCORIS's loader merges; its text encoder
    modules are left out of a UNet base and listed."""
    from lycoris import create_lycoris_from_weights

    with safe_open(str(sd / file), framework="pt") as handle:
        keys = list(handle.keys())
    assert ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight" in keys) == (file == "lyco.safetensors")
    assert "lora_unet_conv_in.lora_down.weight" in keys and "lora_unet_down_blocks_0_downsamplers_0_conv.alpha" in keys
    report = merge(sd / "unet", sd / file, tmp_path / "merged")
    reference = load_unet(sd / "unet")
    network, _ = create_lycoris_from_weights(1.0, str(sd / file), reference)
    assert any(isinstance(m.org_module[0], torch.nn.Conv2d) for m in network.loras)
    network.merge_to()
    merged = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")  # diffusers' own file name
    expected = reference.state_dict()
    assert set(merged) == set(expected)
    assert max(float((merged[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    assert report.lora_modules == len(network.loras)
    assert report.left_out and all(e["name"].startswith("lora_te_") for e in report.to_dict()["left_out"])
    adapter = open_adapter(sd / file, base=base_info(open_checkpoint(sd / "unet")))
    assert adapter.format == "kohya" and adapter.left_out and all(e["name"].startswith("lora_te_") for e in adapter.left_out)
    load_unet(tmp_path / "merged")  # diffusers loads the output folder


def test_modules_lycoris_extraction_stores_whole_merge_as_lycoris_merges(sd, tmp_path, kohya_prefix):
    """Where the rank asked for is at least half a layer's outputs, LyCORIS's extraction stores its ΔW whole
    (``diff`` and the bias's ``diff_b``: conv_out, 4 outputs, at conv rank RANK); deltakit merges such a file as
    LyCORIS's loader does."""
    from lycoris import create_lycoris_from_weights
    from lycoris.utils import extract_diff

    base, fine_tune = load_unet(sd / "unet"), load_unet(sd / "unet_ft")
    with torch.no_grad():
        fine_tune.conv_out.weight += 0.05 * torch.randn(fine_tune.conv_out.weight.shape,
                                                       generator=torch.Generator().manual_seed(4))
    fine_tune.save_pretrained(tmp_path / "ft")
    file = tmp_path / "lyco.safetensors"
    save_file(extract_diff([], [], base, fine_tune, mode="fixed", linear_mode_param=RANK, conv_mode_param=RANK,
                           small_conv=False), file)
    assert "lora_unet_conv_out.diff" in load_file(file)
    report = merge(sd / "unet", file, tmp_path / "merged")
    reference = load_unet(sd / "unet")
    network, _ = create_lycoris_from_weights(1.0, str(file), reference)
    network.merge_to()
    merged, expected = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"), reference.state_dict()
    assert max(float((merged[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    assert report.lora_modules == len(network.loras) + 1  # conv_out's diff_b: its bias, a tensor of its own
    # conv_out is the fine-tune's up to the fp16 the diff is stored in
    assert relative_distance({"w": merged["conv_out.weight"]}, {"w": fine_tune.conv_out.weight.detach()}) < 1e-3


def test_merge_into_a_single_file_equals_lycoris_merge(sd, tmp_path):
    """The same file (diffusers names) into an SD single file (LDM names, text encoder included): LyCORIS's
    merge of UNet and text encoder, spelled in LDM names; written as one file of the input's name; unmerged back."""
    from lycoris.utils import merge as lycoris_merge

    merge(sd / "base.safetensors", sd / "lyco.safetensors", tmp_path / "merged")
    unet, te = load_unet(sd / "unet"), CLIPTextModel.from_pretrained(sd / "te")
    lycoris_merge([te], unet, load_file(sd / "lyco.safetensors"), 1.0)
    expected = ldm_state(unet, te)
    merged = load_file(tmp_path / "merged" / "base.safetensors")
    assert set(merged) == set(expected)
    assert max(float((merged[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    report = unmerge(tmp_path / "merged" / "base.safetensors", sd / "lyco.safetensors", tmp_path / "back",
                     check=sd / "base.safetensors")
    assert report.check_max_abs <= 1e-6


@pytest.mark.parametrize("algo,tucker", [("loha", False), ("loha", True), ("lokr", False), ("lokr", True),
                                         ("dora", False), ("locon", True)])
def test_lycoris_files_merge_as_lycoris_computes(sd, tmp_path, monkeypatch, algo, tucker):
    """LoHa, LoKr (W1 whole, W2 a product: scale α / r), DoRA (dora_scale, norms per output channel) and LoCon
    files that LyCORIS saves, on linear layers and convolutions (their factors as the (out, in·kh·kw) matrix's,
    or with use_tucker as CP / Tucker products with cores lora_mid, hada_t1 / hada_t2, lokr_t2), merged by
    deltakit, give every layer the output LyCORIS's own modules compute; `rank` reads each ΔW's rank as
    LyCORIS's ΔW in fp64 has it.

    The reference is the modules' forward: LyCORIS 4.1's merge_to applies α / r twice to LoHa and LoKr
    (get_diff_weight scales get_weight's already scaled ΔW), unlike its forward, A1111 and ComfyUI; and its
    loader cannot rebuild a Tucker LoKr module from its own file (LokrModule has no lokr_w2_a then).
    """
    import torch.nn.functional as F

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    monkeypatch.setattr(LycorisNetwork, "TARGET_REPLACE_MODULE", ["Linear", "Conv2d"])
    monkeypatch.setattr(LycorisNetwork, "TARGET_REPLACE_NAME", [])
    unet = load_unet(sd / "unet")
    options = {"dora": dict(network_module="lora", weight_decompose=True), "loha": dict(network_module="loha"),
               "lokr": dict(network_module="lokr", factor=2), "locon": dict(network_module="locon")}[algo]
    network = LycorisNetwork(unet, lora_dim=2, alpha=3.0, conv_lora_dim=2, conv_alpha=3.0, use_tucker=tucker, **options)
    network.apply_to()  # the modules become the network's (its state dict)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "dora_scale" not in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.mul_(1.0 + 0.1 * torch.rand(parameter.shape, generator=generator))
    network.save_weights(str(tmp_path / "adapter.safetensors"), torch.float32, None)
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as handle:
        kinds = {key.split(".", 1)[1] for key in handle.keys()}
    cores = {"lora_mid.weight", "hada_t1", "lokr_t2"} & kinds
    assert bool(cores) == tucker
    merge(sd / "unet", tmp_path / "adapter.safetensors", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    weight_of = {f"lora_unet_{name.replace('.', '_')}": name for name, _ in unet.named_modules()}
    convolutions = 0
    with torch.no_grad():
        for module in network.loras:
            name, layer = weight_of[module.lora_name], module.org_module[0]
            bias = merged[f"{name}.bias"] if layer.bias is not None else None
            if isinstance(layer, torch.nn.Conv2d):
                inputs = torch.randn(2, layer.in_channels, 6, 6, generator=generator)
                got = F.conv2d(inputs, merged[f"{name}.weight"], bias, layer.stride, layer.padding)
                convolutions += 1
            else:
                inputs = torch.randn(3, layer.in_features, generator=generator)
                got = F.linear(inputs, merged[f"{name}.weight"], bias)
            assert torch.allclose(got, module.forward(inputs), atol=2e-5, rtol=1e-5), name
    assert convolutions > 0
    adapter = open_adapter(tmp_path / "adapter.safetensors", base=base_info(open_checkpoint(sd / "unet")))
    label = {"locon": "LORA"}.get(algo, algo.upper())
    assert adapter.label == label and len(adapter.modules) == len(network.loras)
    if algo == "dora":  # DoRA's ΔW rescales whole rows of W0 + ΔW: no low rank to read
        return
    from deltakit import rank

    ranks = {m.name: m.rank for m in rank(sd / "unet", tmp_path / "adapter.safetensors").matrices}
    network.double()
    with torch.no_grad():
        for module in network.loras:  # the rank of LyCORIS's own ΔW, formed in fp64
            shape = module.org_module[0].weight.shape
            delta = module.get_diff_weight()[0] if algo == "locon" else module.get_weight(shape)
            assert ranks[f"{weight_of[module.lora_name]}.weight"] == int(torch.linalg.matrix_rank(matrix(delta)))


# --------------------------------------------------------------------------- deltakit's kohya files


def test_kohya_file_written_by_deltakit_loads_in_lycoris_and_diffusers(sd, tmp_path, kohya_prefix):
    """extract --format kohya at the rank of the update, convolutions as LoCon (lora_down with the layer's
    kernel, a 1×1 lora_up): LyCORIS and diffusers load it, and both merge it to the fine-tune to 1e-4
    relative, convolutions included; the metadata is sd-scripts'."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from lycoris import create_lycoris_from_weights

    out = tmp_path / "lora.safetensors"
    report = extract_lora(sd / "unet", sd / "unet_ft", out, rank=RANK, format="kohya", dtype="fp32")
    assert report.format == "kohya" and report.relative_error < 1e-5
    assert report.unchanged == ["conv_out.weight"]
    with safe_open(str(out), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
        alphas = {handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == str(RANK)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": str(RANK)}
    assert alphas == {float(RANK)} and all(k.startswith("lora_unet_") for k in keys)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert shapes[f"{conv}.lora_down.weight"] == (RANK, 16, 3, 3)
    assert shapes[f"{conv}.lora_up.weight"] == (16, RANK, 1, 1)
    assert shapes["lora_unet_up_blocks_0_resnets_0_conv_shortcut.lora_down.weight"] == (RANK, 64, 1, 1)
    assert sum(m.kind == "conv" for m in report.matrices) > 5
    fine_tune = load_unet(sd / "unet_ft").state_dict()

    unet = load_unet(sd / "unet")
    network, _ = create_lycoris_from_weights(1.0, str(out), unet)
    assert len(network.loras) == len(report.matrices)
    assert sum(isinstance(m.org_module[0], torch.nn.Conv2d) for m in network.loras) == sum(
        m.kind == "conv" for m in report.matrices)
    network.merge_to()
    assert relative_distance(unet.state_dict(), fine_tune) < 1e-4
    convolutions = {k: v for k, v in unet.state_dict().items() if v.dim() == 4}
    assert relative_distance(convolutions, {k: fine_tune[k] for k in convolutions}) < 1e-4

    unet = load_unet(sd / "unet")
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(out))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet)
    unet.fuse_lora()
    unet.unload_lora()
    assert relative_distance(unet.state_dict(), fine_tune) < 1e-4
    assert relative_distance({k: unet.state_dict()[k] for k in convolutions},
                             {k: fine_tune[k] for k in convolutions}) < 1e-4


def test_sdxl_kohya_file_in_ldm_names_loads_in_diffusers(sdxl, tmp_path):
    """From SDXL single files: LoCon modules in sd-scripts' LDM names (input_blocks_0_0, in_layers_2,
    out_layers_3, skip_connection, op), which diffusers' SDXL loader maps to the UNet and fuses to the
    fine-tune, convolutions included."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    out = tmp_path / "lora.safetensors"
    extract_lora(sdxl / "unet.safetensors", sdxl / "unet_ft.safetensors", out, rank=RANK, format="kohya", dtype="fp32")
    with safe_open(str(out), framework="pt") as handle:
        keys = set(handle.keys())
    for module in ("input_blocks_0_0", "input_blocks_1_0_in_layers_2", "input_blocks_4_0_skip_connection",
                   "input_blocks_3_0_op", "output_blocks_0_0_out_layers_3"):
        assert f"lora_unet_{module}.lora_down.weight" in keys, module
    unet = load_unet(sdxl / "unet")
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(out), unet_config=unet.config)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state, alphas, unet)
    unet.fuse_lora()
    unet.unload_lora()
    merged, expected = unet.state_dict(), load_unet(sdxl / "unet_ft").state_dict()
    convolutions = [k for k, v in expected.items() if v.dim() == 4]
    assert relative_distance(merged, expected) < 1e-4
    assert relative_distance({k: merged[k] for k in convolutions}, {k: expected[k] for k in convolutions}) < 1e-4


def test_sdxl_kohya_file_from_diffusers_folders_is_in_ldm_names(sdxl, tmp_path):
    """From SDXL diffusers folders: the kohya names are sd-scripts' LDM ones (label_emb_0_0 for
    add_embedding.linear_1), which diffusers' SDXL loader puts on every module, add_embedding included, and
    fuses to the fine-tune; deltakit reads it on the diffusers folder, merges it there as the fine-tune and
    unmerges it back to the base."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = tmp_path / "lora.safetensors"
    report = extract_lora(sdxl / "unet", sdxl / "unet_ft", out, rank=RANK, format="kohya", dtype="fp32")
    with safe_open(str(out), framework="pt") as handle:
        modules = {k.removesuffix(".lora_down.weight") for k in handle.keys() if k.endswith(".lora_down.weight")}
    assert len(modules) == len(report.matrices)
    assert {"lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2", "lora_unet_time_embed_0",
            "lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_3_0_op"} <= modules
    assert not any(m.startswith(("lora_unet_down_blocks", "lora_unet_add_embedding")) for m in modules)
    unet = load_unet(sdxl / "unet")
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(out), unet_config=unet.config)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state, alphas, unet)
    adapted = {name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)}
    assert len(adapted) == len(modules)
    assert {"add_embedding.linear_1", "add_embedding.linear_2"} <= adapted
    unet.fuse_lora()
    unet.unload_lora()
    expected = load_unet(sdxl / "unet_ft").state_dict()
    assert relative_distance(unet.state_dict(), expected) < 1e-4
    assert not open_adapter(out, base=base_info(open_checkpoint(sdxl / "unet"))).left_out
    merge(sdxl / "unet", out, tmp_path / "merged")
    assert relative_distance(load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"), expected) < 1e-4
    assert unmerge(tmp_path / "merged", out, tmp_path / "back", check=sdxl / "unet").check_max_abs <= 1e-5


def test_kohya_file_from_single_files_with_text_encoder(sd, tmp_path):
    """From SD single files: the UNet in diffusers names (sd-scripts' SD 1.x convention), the text encoder as
    lora_te_text_model_*, in fp16 as asked; merged back into the single file it is the fine-tune."""
    out = tmp_path / "lora.safetensors"
    extract_lora(sd / "base.safetensors", sd / "ft.safetensors", out, rank=RANK, format="kohya", dtype="fp16")
    with safe_open(str(out), framework="pt") as handle:
        keys = list(handle.keys())
        dtypes = {handle.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # LoCon, in diffusers names
    merge(sd / "base.safetensors", out, tmp_path / "merged")
    assert relative_distance(load_file(tmp_path / "merged" / "base.safetensors"),
                             load_file(sd / "ft.safetensors")) < 1e-3  # fp16 factors


def test_diffusers_format_loads_in_diffusers(sd, tmp_path):
    """extract --format diffusers from SD single files: save_lora_weights' layout (unet. in diffusers names,
    text_encoder. as stored, lora_adapter_metadata), which diffusers' loaders put on the UNet and the text
    encoder, both merging to the fine-tune; deltakit merges it back into the single file."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = tmp_path / "lora"
    extract_lora(sd / "base.safetensors", sd / "ft.safetensors", out, rank=RANK, format="diffusers", dtype="fp32")
    state, alphas, metadata = Loader.lora_state_dict(str(out), return_lora_metadata=True)
    assert metadata["unet.r"] == RANK and metadata["unet.lora_alpha"] == RANK
    assert state["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (RANK, 16, 3, 3)  # PEFT's conv LoRA
    unet, te = load_unet(sd / "unet"), CLIPTextModel.from_pretrained(sd / "te")
    Loader.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    Loader.load_lora_into_text_encoder(state, alphas, te, prefix="text_encoder", metadata=metadata)
    unet.fuse_lora()
    unet.unload_lora()
    for module in te.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    merged_te = {k.replace(".base_layer", ""): v for k, v in te.state_dict().items() if "lora_" not in k}
    assert relative_distance(unet.state_dict(), load_unet(sd / "unet_ft").state_dict()) < 1e-4
    assert relative_distance(merged_te, CLIPTextModel.from_pretrained(sd / "te_ft").state_dict()) < 1e-4
    merge(sd / "base.safetensors", out, tmp_path / "merged")
    assert relative_distance(load_file(tmp_path / "merged" / "base.safetensors"), load_file(sd / "ft.safetensors")) < 1e-5


def test_resize_and_weighted_sum_of_kohya_files_in_factor_space(sd, tmp_path):
    """A kohya file resized to rank 1 is the best rank-1 approximation of its ΔW, computed from the factors, for
    a linear layer and a LoCon module alike (written back as LoCon);
    a weighted sum of two files at the sum of their ranks merges to the weighted sum of their updates."""
    lora = tmp_path / "lora.safetensors"
    extract_lora(sd / "unet", sd / "unet_ft", lora, rank=RANK, format="kohya", dtype="fp32")
    resized = extract_lora(sd / "unet", lora, tmp_path / "r1.safetensors", rank=1, format="kohya")
    assert resized.method == "factor-space"
    adapter = open_adapter(lora, base=base_info(open_checkpoint(sd / "unet")))
    linear = next(m for m in adapter.modules.values() if not m.kernel)
    conv = next(m for m in adapter.modules.values() if m.kernel == (3, 3))  # a LoCon module
    for module in (linear, conv):
        dense = module.delta(adapter.load(module), None, False).double()
        best = torch.linalg.svdvals(dense)
        worst = next(m for m in resized.matrices if m.name == module.target)
        assert worst.rank == 1 and worst.rel_error == pytest.approx(float(best[1:].norm() / best.norm()), rel=1e-5)
    with safe_open(str(tmp_path / "r1.safetensors"), framework="pt") as handle:
        down = handle.get_tensor(f"{KohyaNamer(open_checkpoint(sd / 'unet').keys())(conv.module)}.lora_down.weight")
    assert down.shape[0] == 1 and down.shape[2:] == (3, 3)

    summed = extract_lora(sd / "unet", [lora, sd / "lyco.safetensors"], tmp_path / "sum.safetensors", rank=2 * RANK,
                          weights=[0.7, -0.2], format="kohya", dtype="fp32")
    assert summed.relative_error < 1e-5
    merge(sd / "unet", [lora, sd / "lyco.safetensors"], tmp_path / "two", weights=[0.7, -0.2])
    merge(sd / "unet", tmp_path / "sum.safetensors", tmp_path / "one")
    two = load_file(tmp_path / "two" / "diffusion_pytorch_model.safetensors")
    one = load_file(tmp_path / "one" / "diffusion_pytorch_model.safetensors")
    assert relative_distance(one, two) < 1e-6


def test_conv_rank_and_conv_energy_rank_the_larger_kernels(sd, tmp_path, runner):
    """--conv-rank gives the convolutions with a kernel larger than 1×1 their own fixed rank (kohya's conv_dim,
    in ss_network_args), each the best approximation of its (out, in·kh·kw) matrix at that rank; 1×1
    convolutions and linear layers follow --rank. --conv-energy: the smallest rank keeping that fraction of
    each such ΔW's energy, from the fp64 spectrum."""
    out = tmp_path / "locon.safetensors"
    result = invoke(runner, "extract", sd / "unet", sd / "unet_ft", "-o", out, "--format", "kohya", "--rank", RANK,
                    "--conv-rank", 1, "--dtype", "fp32", "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    matrices = json.loads((tmp_path / "report.json").read_text())["matrices"]
    base, ft = load_unet(sd / "unet").state_dict(), load_unet(sd / "unet_ft").state_dict()
    spectra = {m["name"]: torch.linalg.svdvals(matrix(ft[m["name"]].double() - base[m["name"]].double()))
               for m in matrices}
    spatial = {m["name"] for m in matrices if base[m["name"]].dim() == 4 and base[m["name"]][0, 0].numel() > 1}
    pointwise = {m["name"] for m in matrices if base[m["name"]].dim() == 4} - spatial
    assert len(spatial) > 5 and pointwise
    for m in matrices:
        expected = 1 if m["name"] in spatial else RANK
        assert m["rank"] == expected, m["name"]
        s = spectra[m["name"]]
        assert m["rel_error"] == pytest.approx(float(s[expected:].norm() / s.norm()), rel=1e-3, abs=1e-6), m["name"]
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == str(RANK)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1"}

    fraction = 0.999
    report = extract_lora(sd / "unet", sd / "unet_ft", tmp_path / "energy.safetensors", rank=1, conv_energy=fraction,
                          format="kohya", dtype="fp32")
    for m in report.matrices:
        if m.name in spatial:  # the fine-tune's update has rank RANK: its top values are the signal
            energy = spectra[m.name][:RANK] ** 2
            assert m.rank == int((energy.cumsum(0) < fraction * energy.sum()).sum()) + 1, m.name
        else:
            assert m.rank == 1, m.name
    assert {m.rank for m in report.matrices if m.name in spatial} == {RANK}
    assert report.selection["conv_energy"] == fraction


def test_clamp_quantile_is_sd_scripts_clamp_and_reports_its_cost(sd, tmp_path):
    """--clamp-quantile clamps up = U·S and down = Vᵀ at their joint quantile as sd-scripts does; each matrix
    reports the error of the unclamped truncation and the (larger) error of what was written."""
    out = tmp_path / "lora.safetensors"
    report = extract_lora(sd / "unet", sd / "unet_ft", out, rank=1, format="kohya", dtype="fp32", clamp_quantile=0.9)
    unet, fine_tune = load_unet(sd / "unet").state_dict(), load_unet(sd / "unet_ft").state_dict()
    chosen = next(m for m in report.matrices if m.name == "down_blocks.0.resnets.0.conv1.weight")  # a 3×3 LoCon
    delta = matrix(fine_tune[chosen.name] - unet[chosen.name]).double()
    u, s, vh = torch.linalg.svd(delta)
    name = KohyaNamer(unet)(chosen.module)
    with safe_open(str(out), framework="pt") as handle:
        written_up = matrix(handle.get_tensor(f"{name}.lora_up.weight"))
        written_down = matrix(handle.get_tensor(f"{name}.lora_down.weight"))
    # Singular vectors are defined up to sign, and the quantile of signed entries is not: take the written sign.
    sign = torch.sign((written_down.double() * vh[:1]).sum())
    up, down = u[:, :1] * s[:1] * sign, vh[:1] * sign
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9)
    assert torch.allclose(written_up.double(), up.clamp(-high, high), atol=1e-5)
    assert torch.allclose(written_down.double(), down.clamp(-high, high), atol=1e-5)
    assert chosen.unclamped_rel_error == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)
    assert all(m.rel_error >= m.unclamped_rel_error - 1e-7 for m in report.matrices)
    assert report.to_dict()["clamp_quantile"] == 0.9 and "unclamped_rel_error" in report.to_dict()["matrices"][0]


# ------------------------------------------------------------------------------ rank rules, layouts


def test_kohya_and_lycoris_rules_by_their_definitions():
    """σ = (4, 2, 1, 1): Σσ-fractions 0.5, 0.75, 0.875, 1; σ²-fractions 16/22, 20/22, 21/22, 1."""
    s = [4.0, 2.0, 1.0, 1.0]
    assert kohya_rank(s, "sv_cumulative", 0.75, 4) == 2  # the smallest k with c_k ≥ 0.75
    assert kohya_rank(s, "quantile", 0.75, 4) == 1  # #{k : c_k < 0.75}
    assert kohya_rank(s, "quantile", 0.1, 4) == 1  # at least 1
    assert kohya_rank(s, "sv_fro", 0.9, 4) == 2  # e_k ≥ 0.81
    assert kohya_rank(s, "sv_fro", 0.96, 4) == 3  # e_k ≥ 0.9216
    assert kohya_rank(s, "sv_ratio", 3.0, 4) == 2  # σ > 4/3
    assert kohya_rank(s, "sv_ratio", 4.0, 4) == 2  # σ > 1, strictly
    assert kohya_rank(s, "sv_cumulative", 1.0, 3) == 3  # clamped
    assert RankChoice(sv_fro=0.9).matrix_rank(s, 4) == RankChoice(energy=0.81).matrix_rank(s, 4)
    with pytest.raises(DeltakitError, match="sv-ratio"):
        RankChoice(sv_ratio=0.5)


@pytest.mark.parametrize("q", [0.3, 0.6, 0.8])
def test_quantile_rule_is_lycoris_extract_linear(q):
    """LyCORIS's own extract_linear keeps the rank kohya_rank(…, "quantile") gives."""
    from lycoris.utils import extract_linear

    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 48, generator=generator) @ torch.diag(torch.linspace(3, 0.01, 48) ** 2) @ torch.randn(
        48, 48, generator=generator)
    (down, _, _), mode = extract_linear(weight, "quantile", q)
    assert mode == "low rank"
    assert down.shape[0] == kohya_rank(torch.linalg.svdvals(weight).numpy(), "quantile", q, 48)


def test_rank_pairs_a_single_file_with_a_diffusers_folder(sd, tmp_path, runner):
    """An LDM single file against a diffusers UNet folder: the UNet's matrices pair across layouts and read
    as they do folder against folder (the text encoder, only in the file, is listed)."""
    from deltakit import rank

    across = rank(sd / "base.safetensors", sd / "unet_ft", energy=(0.9,))
    same = rank(sd / "unet", sd / "unet_ft", energy=(0.9,))
    by_name = {m.name: m for m in same.matrices}
    assert len(across.matrices) == len(same.matrices) > 0
    for m in across.matrices:  # conv_out is the one weight the fine-tune keeps
        assert m.rank_at[0.9] == by_name[m.name].rank_at[0.9] == (0 if m.name == "conv_out.weight" else RANK)
    assert any(n.startswith("cond_stage_model.") for n in across.only_base)


def test_conv_and_linear_ranks_read_right_on_a_unet_pair(sd):
    """rank on the UNet pair: every weight's rank, a convolution's of its (out, in·kh·kw) matrix, is the rank the
    fine-tune was built with (RANK, or 0 for the weights :func:`low_rank_finetune` keeps), above the fp32 storage
    rounding of the files; the convolutions are there with their matrix shapes."""
    from deltakit import rank

    report = rank(sd / "unet", sd / "unet_ft", energy=(0.9,))
    base, ft = load_unet(sd / "unet").state_dict(), load_unet(sd / "unet_ft").state_dict()
    weights = {k for k, v in base.items() if v.dim() >= 2}
    assert {m.name for m in report.matrices} == weights
    for m in report.matrices:
        delta = matrix(ft[m.name].double() - base[m.name].double())
        assert tuple(m.shape) == tuple(delta.shape)
        assert m.rank == (RANK if delta.shape[0] > 2 * RANK else 0), m.name
    convolutions = [m for m in report.matrices if base[m.name].dim() == 4]
    assert len(convolutions) > 5 and {m.rank for m in convolutions} == {0, RANK}


# ---------------------------------------------------------------------------------- diffusers files


def test_diffusers_lora_file_merges_as_diffusers_fuses(sd, tmp_path):
    """A LoRA saved by diffusers (save_lora_weights, lora_alpha in lora_adapter_metadata) merges into the UNet
    folder and into the single file as diffusers' fuse_lora changes the weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = load_unet(sd / "unet")
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v", "proj_in"])
    unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    unet.fuse_lora()
    unet.unload_lora()
    expected = unet.state_dict()
    merge(sd / "unet", tmp_path / "lora", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    assert max(float((merged[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    merge(sd / "base.safetensors", tmp_path / "lora" / "pytorch_lora_weights.safetensors", tmp_path / "ldm")
    blocks = UnetBlocks.of(expected)
    single = load_file(tmp_path / "ldm" / "base.safetensors")
    assert all(torch.allclose(single[f"model.diffusion_model.{unet_to_ldm(k, blocks)}"], v, atol=1e-6)
               for k, v in expected.items())


# ------------------------------------------------------------------------------------ text encoders


def test_text_encoder_parts_are_told_apart_by_shape(sd, tmp_path):
    """An SDXL-style file with te1 (this encoder's width) and te2 (another's) modules: on this text encoder folder
    te1 applies and te2 is left out; the UNet modules too."""
    te = open_checkpoint(sd / "te")
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for part, width in (("te1", 24), ("te2", 40)):
        for layer in range(2):
            name = f"lora_{part}_text_model_encoder_layers_{layer}_self_attn_q_proj"
            tensors[f"{name}.lora_down.weight"] = torch.randn(2, width, generator=generator)
            tensors[f"{name}.lora_up.weight"] = torch.randn(width, 2, generator=generator)
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
    tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"] = torch.randn(2, 32, generator=generator)
    tensors["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"] = torch.randn(32, 2, generator=generator)
    save_file(tensors, tmp_path / "sdxl.safetensors")
    adapter = open_adapter(tmp_path / "sdxl.safetensors", base=base_info(te))
    assert sorted(adapter.modules) == [f"encoder.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    assert sorted(e["name"].split("_text")[0].split("_mid")[0] for e in adapter.left_out) == [
        "lora_te2", "lora_te2", "lora_unet"]
    module = adapter.modules["encoder.layers.0.self_attn.q_proj.weight"]
    assert module.scaling == pytest.approx(0.5)  # alpha 1 over rank 2


# -------------------------------------------------------------------------------------------- errors


def test_refusals_are_one_line(sd, tmp_path, runner):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    (pipeline / "unet").symlink_to(sd / "unet")
    assert_one_line_error(invoke(runner, "rank", pipeline, sd / "unet_ft"), f"{pipeline / 'unet'}")
    conv = {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 5, 5),
            "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 2, 1, 1)}
    save_file(conv, tmp_path / "locon.safetensors")
    assert_one_line_error(invoke(runner, "merge", sd / "unet", tmp_path / "locon.safetensors", "-o", tmp_path / "m"),
                          "makes a 16×100 (kernel 5×5) update, but it names conv_in.weight (16, 4, 3, 3)")
    norm = {"lora_unet_conv_norm_out.w_norm": torch.zeros(16), "lora_unet_conv_norm_out.b_norm": torch.zeros(16)}
    save_file(norm, tmp_path / "norm.safetensors")
    assert_one_line_error(invoke(runner, "merge", sd / "unet", tmp_path / "norm.safetensors", "-o", tmp_path / "m"),
                          "LyCORIS's norm algorithm")
    extra = {**conv, "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3), "lora_unet_conv_in.hada_t1":
             torch.zeros(2, 2, 3, 3)}
    save_file(extra, tmp_path / "extra.safetensors")
    assert_one_line_error(invoke(runner, "merge", sd / "unet", tmp_path / "extra.safetensors", "-o", tmp_path / "m"),
                          "LORA module with hada_t1 too")
    result = invoke(runner, "extract", sd / "unet", sd / "unet_ft", "-o", tmp_path / "o.safetensors", "--format",
                    "kohya", "--rank", "2", "--conv-rank", "1", "--conv-energy", "0.9")
    assert_one_line_error(result, "at most one of --conv-rank and --conv-energy")
    stray = {"lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 4),
             "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 2)}
    save_file(stray, tmp_path / "stray.safetensors")
    assert_one_line_error(invoke(runner, "merge", sd / "unet", tmp_path / "stray.safetensors", "-o", tmp_path / "m"),
                          "names no weight of the base")
    result = invoke(runner, "extract", sd / "unet", sd / "unet_ft", "-o", tmp_path / "out", "--format", "kohya",
                    "--rank", "2")
    assert_one_line_error(result, ".safetensors")
    result = invoke(runner, "extract", sd / "unet", sd / "unet_ft", "-o", tmp_path / "o.safetensors", "--format",
                    "kohya", "--rank", "2", "--save-modules")
    assert_one_line_error(result, "modules_to_save")
    result = invoke(runner, "extract", sd / "unet", sd / "unet_ft", "-o", tmp_path / "o.safetensors", "--sv-fro", "1.5")
    assert_one_line_error(result, "outside (0, 1]")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "m").exists()
