"""Name matching, vocabulary growth, Conv1D, tied embeddings and filters."""

import pytest
import torch

from deltakit.errors import DeltakitError
from deltakit.pairing import TensorPair, canonical_name, layer_index, match_names, module_type, pair_tensors

F32, BF16 = torch.float32, torch.bfloat16


def metas(**shapes):
    return {name.replace("__", "."): (shape, F32) for name, shape in shapes.items()}


def test_prefix_differences_are_tolerated():
    base = {"model.layers.0.self_attn.q_proj.weight": ((4, 4), F32), "model.norm.weight": ((4,), F32)}
    ft = {"base_model.model.model.layers.0.self_attn.q_proj.weight": ((4, 4), F32), "norm.weight": ((4,), F32)}
    mapping = match_names(base, ft)
    assert mapping == {"base_model.model.model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
                       "norm.weight": "model.norm.weight"}
    plan = pair_tensors(base, ft)
    assert {p.name for p in plan.pairs} == set(ft)  # names as stored in the fine-tune


def test_one_sided_tensors_listed_not_fatal():
    base = {"a.weight": ((2, 2), F32), "b.weight": ((2, 2), F32)}
    ft = {"a.weight": ((2, 2), F32), "c.weight": ((2, 2), F32)}
    plan = pair_tensors(base, ft)
    assert [p.name for p in plan.pairs] == ["a.weight"]
    assert plan.only_base == ["b.weight"] and plan.only_ft == ["c.weight"]


def test_no_shared_names_is_an_error_naming_first_keys():
    with pytest.raises(DeltakitError, match="first base key: x.weight.*first fine-tune key: y.weight"):
        pair_tensors({"x.weight": ((2, 2), F32)}, {"y.weight": ((2, 2), F32)})


def test_vocabulary_growth_analyses_shared_rows():
    base = {"model.embed_tokens.weight": ((100, 8), BF16), "lm_head.weight": ((100, 8), BF16)}
    ft = {"model.embed_tokens.weight": ((103, 8), BF16), "lm_head.weight": ((103, 8), BF16)}
    plan = pair_tensors(base, ft)
    assert all(p.shape == (100, 8) and p.added_rows == 3 and p.layout == "embedding" for p in plan.pairs)


def test_other_shape_mismatch_is_skipped_with_reason():
    plan = pair_tensors({"a.q_proj.weight": ((4, 4), F32), "b.weight": ((2,), F32)},
                        {"a.q_proj.weight": ((4, 5), F32), "b.weight": ((2,), F32)})
    assert plan.skipped[0].name == "a.q_proj.weight" and "shape mismatch" in plan.skipped[0].reason


def test_integer_buffers_skipped():
    plan = pair_tensors({"pos_ids": ((1, 8), torch.int64), "w.weight": ((2, 2), F32)},
                        {"pos_ids": ((1, 8), torch.int64), "w.weight": ((2, 2), F32)})
    assert [s.name for s in plan.skipped] == ["pos_ids"]


def test_conv1d_and_fused_detection_from_config():
    names = {"transformer.h.0.attn.c_attn.weight": ((64, 192), F32), "transformer.h.0.mlp.c_fc.weight": ((64, 256), F32)}
    plan = pair_tensors(names, names, {"model_type": "gpt2"})
    by_name = {p.name: p for p in plan.pairs}
    assert by_name["transformer.h.0.attn.c_attn.weight"].layout == "conv1d"
    assert by_name["transformer.h.0.attn.c_attn.weight"].fused
    assert by_name["transformer.h.0.attn.c_attn.weight"].module_type == "qkv"
    assert by_name["transformer.h.0.mlp.c_fc.weight"].module_type == "mlp_in"
    llama = {"model.layers.0.self_attn.q_proj.weight": ((4, 4), F32)}
    assert pair_tensors(llama, llama, {"model_type": "llama"}).pairs[0].layout == "linear"


def test_tied_embeddings_analysed_once():
    names = {"model.embed_tokens.weight": ((10, 4), F32), "lm_head.weight": ((10, 4), F32)}
    plan = pair_tensors(names, names, {"tie_word_embeddings": True})
    assert [p.name for p in plan.pairs] == ["model.embed_tokens.weight"]
    assert "tied" in plan.skipped[0].reason


def test_include_exclude_globs():
    names = {f"model.layers.{i}.self_attn.{p}.weight": ((4, 4), F32) for i in range(2) for p in ("q_proj", "k_proj")}
    plan = pair_tensors(names, names, include=["*q_proj*"], exclude=["*layers.1.*"])
    assert [p.name for p in plan.pairs] == ["model.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize("name,kind,layer", [
    ("model.layers.3.self_attn.q_proj.weight", "q", 3), ("model.layers.0.mlp.down_proj.weight", "down", 0),
    ("transformer.h.11.attn.c_proj.weight", "o", 11), ("transformer.h.2.mlp.c_proj.weight", "mlp_out", 2),
    ("encoder.layer.5.attention.self.key.weight", "k", 5), ("encoder.layer.5.attention.output.dense.weight", "o", 5),
    ("encoder.layer.1.intermediate.dense.weight", "mlp_in", 1), ("encoder.layer.1.output.dense.weight", "mlp_out", 1),
    ("model.embed_tokens.weight", "embed", None), ("lm_head.weight", "lm_head", None),
    ("model.layers.1.self_attn.qkv_proj.weight", "qkv", 1), ("model.layers.1.mlp.gate_up_proj.weight", "gate_up", 1),
])
def test_module_types_and_layers(name, kind, layer):
    assert module_type(name) == kind and layer_index(name) == layer


def test_canonical_name():
    assert canonical_name("base_model.model.model.layers.0.x.weight") == "layers.0.x.weight"
    assert canonical_name("bert.encoder.layer.0.x") == "encoder.layer.0.x"


@pytest.mark.parametrize("layout, transposed", [("linear", False), ("embedding", False), ("conv1d", True),
                                                 ("input_major", True)])
def test_oriented_reads_every_layout_as_out_by_in(layout, transposed):
    stored = torch.arange(6.0).reshape(2, 3)
    pair = TensorPair(name="w", base_name="w", shape=(2, 3), base_dtype=torch.float32, ft_dtype=torch.float32,
                      module_type="x", layer=None, layout=layout, transposed=layout != "linear")
    assert torch.equal(pair.analysed(stored), stored.T if transposed else stored)
