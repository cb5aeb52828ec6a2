"""Offline residual-stream rotation (QuaRot / SpinQuant R1): exact in float, composable with RTN / GPTQ / AWQ."""

import copy
import warnings

import pytest
import torch

from lightning_quant import QuantSpec, export, quantize_model, testing
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.evaluation import kl_to_reference, reference_logits
from lightning_quant.methods.rotation import Rotation, rotate_model
from lightning_quant.methods.rotation_layouts import ROTATION_LAYOUTS, RotationLayout, register_rotation_layout
from lightning_quant.targets import select_linears

IDS = torch.randint(0, testing.TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
CALIB = torch.cat(testing.random_token_batches(4, 32, 2))
HELD = torch.cat(testing.random_token_batches(2, 32, 2, seed=1))


def _tiny_from(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=testing.TINY_VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=24, **kw)
    return model_cls(cfg).eval()


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _tiny_from(Qwen3Config, Qwen3ForCausalLM, tie_word_embeddings=False)


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _tiny_from(MistralConfig, MistralForCausalLM)


BUILDERS = {
    "llama-gqa": testing.tiny_llama,
    "llama-tied": lambda: testing.tiny_llama(tie_word_embeddings=True),
    "qwen2-tied-biases": testing.tiny_qwen2,
    "qwen3": tiny_qwen3,
    "mistral": tiny_mistral,
    "opt-layernorm-tied": testing.tiny_opt,
}


def perturbed(model, seed=0, outliers=()):
    """Random norm scales (and LayerNorm shifts), so that folding them is not a no-op; ``outliers``: feature
    indices whose scale is set to 20 in every norm (the outlier features rotations are for)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.weight[list(outliers)] = 20.0
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def rotated(model, rotation=None, **kw):
    rotation = Rotation() if rotation is None else rotation
    r = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the untie warning (tested on its own)
        report = rotate_model(r, rotation, **kw)
    return r, report


# ---- exactness ----------------------------------------------------------------------------------------------
#: float32: rounding of the fused weights; float64: LlamaRMSNorm-like norms compute in float32 internally, so
#: their models agree to float32 rounding only, OPT's LayerNorm keeps float64 (a tight bound)
ATOL = {torch.float32: 2e-5, torch.float64: {"opt-layernorm-tied": 1e-12}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_rotated_float_model_has_the_same_logits(arch, dtype):
    model = perturbed(BUILDERS[arch]()).to(dtype)
    rot, report = rotated(model)
    ref, out = model(IDS).logits, rot(IDS).logits
    atol = ATOL[dtype] if dtype == torch.float32 else ATOL[dtype].get(arch, 1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=atol * ref.abs().max().item())
    sd, sd_ref = rot.state_dict(), model.state_dict()
    assert list(sd) == list(sd_ref) and all(sd[k].shape == sd_ref[k].shape for k in sd)
    assert not torch.equal(sd[next(k for k in sd if "embed_tokens" in k)], sd_ref[next(k for k in sd if "embed_tokens" in k)])
    # every linear of these architectures is a reader or a writer of the residual stream
    assert set(select_linears(model, exclude=())) <= set(report.rotated)
    assert report.centered == (arch.startswith("opt")) and report.hidden_size == 96


def test_layernorm_model_gets_a_zero_mean_residual_stream():
    """OPT (SliceGPT's step): after centring the embeddings and residual writers, every hidden state fed to a
    LayerNorm has zero mean over its features, so the LayerNorms act as RMSNorms; the original's do not."""
    model = perturbed(testing.tiny_opt()).double()
    rot, report = rotated(model)
    assert report.centered
    before = model(IDS, output_hidden_states=True).hidden_states[:-1]  # the last one is after the final norm
    after = rot(IDS, output_hidden_states=True).hidden_states[:-1]
    assert all(h.mean(-1).abs().max() > 1e-3 for h in before)
    assert all(h.mean(-1).abs().max() < 1e-12 for h in after)


@pytest.mark.parametrize("arch", ["llama-gqa", "opt-layernorm-tied"])
def test_random_kind_is_exact_too_and_seeds_give_different_models(arch):
    model = perturbed(BUILDERS[arch]()).double()
    a, _ = rotated(model, Rotation("random", seed=1))
    b, _ = rotated(model, Rotation("random", seed=2))
    torch.testing.assert_close(a(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)
    assert not torch.allclose(a.lm_head.weight, b.lm_head.weight)


def test_norms_are_reset_and_the_hadamard_is_fused():
    """After folding, every norm scale is 1, and the embedding is ``E Q``: ``Q``, recovered by least squares from
    ``E Q = E'`` (``E [256, 96]`` has full column rank), has the randomised Hadamard's entries ``±1/sqrt(n)``."""
    model = perturbed(testing.tiny_llama()).double()
    rot, report = rotated(model)
    for name in report.folded_norms:
        assert torch.equal(rot.get_submodule(name).weight, torch.ones(96, dtype=torch.float64)), name
    e, e_rot = model.model.embed_tokens.weight.detach(), rot.model.embed_tokens.weight.detach()
    q = torch.linalg.lstsq(e, e_rot).solution  # E Q = E' -> Q [96, 96]
    torch.testing.assert_close(q.abs(), torch.full_like(q, 96**-0.5), rtol=0, atol=1e-9)


def test_tied_head_is_untied_with_a_warning_and_reloads_untied(tmp_path):
    model = perturbed(testing.tiny_llama(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rot = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"lm_head was tied to model.embed_tokens: .* the head is untied"):
        report = rotate_model(rot, Rotation())
    assert report.untied and rot.config.tie_word_embeddings is False
    assert rot.lm_head.weight is not rot.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, model.lm_head.weight)  # the original is untouched
    rot.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert back.lm_head.weight is not back.model.embed_tokens.weight
    assert torch.equal(back(IDS).logits, rot(IDS).logits)


# ---- what the rotation is for -----------------------------------------------------------------------------------
def _max_to_rms(w):
    return (w.abs().max() / w.pow(2).mean().sqrt()).item()


def _kurtosis(w):
    w = w.flatten() - w.mean()
    return (w.pow(4).mean() / w.pow(2).mean() ** 2).item()


def test_rotation_spreads_outlier_features_in_the_readers_weights():
    """With two outlier features (norm scale 20), the readers' effective weights ``W diag(γ)`` have two outlier
    columns; rotated (``W diag(γ) Q``) they are spread over all 96: max-abs / rms and kurtosis drop."""
    model = perturbed(testing.tiny_llama(), outliers=(3, 50))
    rot, _ = rotated(model)
    for i in range(2):
        for norm, reader in (("input_layernorm", "self_attn.q_proj"), ("post_attention_layernorm", "mlp.up_proj")):
            block, block_rot = model.model.layers[i], rot.model.layers[i]
            folded = block.get_submodule(reader).weight.detach() * block.get_submodule(norm).weight.detach()
            w_rot = block_rot.get_submodule(reader).weight.detach()
            assert _max_to_rms(w_rot) < 0.5 * _max_to_rms(folded), (i, reader)
            assert _kurtosis(w_rot) < 0.5 * _kurtosis(folded), (i, reader)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("arch", ["llama-tied", "opt-layernorm-tied"])
def test_rotated_w8_model_stays_close_to_the_float_model(arch, method):
    """8-bit per-channel quantization of the rotated model: its logits stay close to the *original* float model's
    (a rotation that were not exact would move them by far more than 8-bit rounding)."""
    model = perturbed(BUILDERS[arch]())
    ref, logits = reference_logits(model, HELD), model(HELD).logits
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quantize_model(q, QuantSpec(8, -1), method, calibration=CALIB if method == "gptq" else None, rotation=Rotation())
    assert kl_to_reference(q, ref, HELD) < 1e-4
    torch.testing.assert_close(q(HELD).logits, logits, rtol=0, atol=0.02 * logits.abs().max().item())


@pytest.mark.parametrize("method,config", [("awq", None), ("awq+gptq", GPTQConfig())])
def test_rotation_composes_with_awq(method, config):
    from lightning_quant.algorithms.awq import AWQConfig

    model = perturbed(testing.tiny_llama())
    ref = reference_logits(model, HELD)
    cfg = AWQConfig(n_grid=4, clip_grid=4) if method == "awq" else GPTQConfig(awq=AWQConfig(n_grid=4, clip_grid=4))
    q = copy.deepcopy(model)
    result = quantize_model(q, QuantSpec(8, -1), method, calibration=CALIB, config=cfg, rotation=Rotation())
    assert len(result) == 14 and kl_to_reference(q, ref, HELD) < 1e-4


def _rotated_gptq_tied_llama():
    model = perturbed(testing.tiny_llama(tie_word_embeddings=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quantize_model(model, QuantSpec(4, 32, symmetric=False), "gptq", calibration=CALIB, rotation=Rotation())
    return model


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "awq"])
def test_rotation_plus_gptq_exports_and_reloads_with_identical_logits(tmp_path, fmt):
    model = _rotated_gptq_tied_llama()
    ref = model(IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        export.save(model, tmp_path / "m", fmt)
        loaded = export.load(tmp_path / "m")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded(IDS).logits, ref)


def test_rotation_plus_gptq_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = _rotated_gptq_tied_llama()
    ref = model(IDS).logits
    export.save(model, tmp_path / "m", "onnx")
    torch.testing.assert_close(export.load(tmp_path / "m")(IDS).logits, ref, rtol=0, atol=1e-5)


# ---- peft ------------------------------------------------------------------------------------------------------
def _peft(model):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    return pm.eval()


def test_peft_model_found_by_structure_adapters_refused_unless_merged():
    pytest.importorskip("peft")
    pm = _peft(perturbed(testing.tiny_llama()))
    ref = pm(input_ids=IDS).logits
    with pytest.raises(ValueError, match=r"carry peft adapters .* merge_adapters=True\), or quantize_model / the PTQ "
                                         r"callbacks with lora='merged'"):
        rotate_model(pm, Rotation())
    report = rotate_model(pm, Rotation(), merge_adapters=True)
    assert "base_model.model.lm_head" in report.rotated
    torch.testing.assert_close(pm(input_ids=IDS).logits, ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def test_quantize_model_merges_adapters_before_rotating_or_refuses_them_when_separate():
    pytest.importorskip("peft")
    pm = _peft(perturbed(testing.tiny_llama()))
    ref = reference_logits(pm, HELD)
    with pytest.raises(ValueError, match="carry peft adapters"):
        quantize_model(copy.deepcopy(pm), QuantSpec(8, -1), "rtn", lora="separate", rotation=Rotation())
    quantize_model(pm, QuantSpec(8, -1), "rtn", rotation=Rotation())  # lora="merged" (the default)
    assert kl_to_reference(pm, ref, HELD) < 1e-4


# ---- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "dct"}, r"Rotation\(kind='dct'\) is not supported; use one of \('hadamard', 'random'\)"),
    ({"seed": -1}, r"Rotation\(seed=-1\) must be a non-negative int"),
    ({"seed": True}, r"Rotation\(seed=True\) must be a non-negative int"),
    ({"seed": 1.5}, r"Rotation\(seed=1.5\) must be a non-negative int"),
])
def test_bad_rotation_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rotation(**kwargs)


def test_architecture_without_a_layout_raises_naming_the_table():
    with pytest.raises(ValueError, match=r"No rotation layout for model_type='gpt2' in lightning_quant.methods."
                                         r"rotation_layouts.ROTATION_LAYOUTS .* register_rotation_layout\('gpt2'"):
        rotate_model(testing.tiny_gpt2(), Rotation())
    with pytest.raises(ValueError, match="No rotation layout for model_type='gpt2'"):
        quantize_model(testing.tiny_gpt2(), QuantSpec(4, 32), "rtn", rotation=Rotation())
    with pytest.raises(ValueError, match=r"Found no transformers model \(a module with its own .config.model_type\)"):
        rotate_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), Rotation())


def test_a_layout_naming_a_missing_module_raises(monkeypatch):
    bad = RotationLayout(embeddings=("model.embed_tokens",), blocks="model.layers",
                         norms=ROTATION_LAYOUTS["llama"].norms, writers=("self_attn.out_proj",),
                         final_norm="model.norm", head="lm_head")
    monkeypatch.setitem(ROTATION_LAYOUTS, "llama", bad)
    with pytest.raises(ValueError, match=r"names residual writer 'model.layers.0.self_attn.out_proj', which "
                                         r"LlamaForCausalLM does not have; fix its ROTATION_LAYOUTS entry"):
        rotate_model(testing.tiny_llama(), Rotation())
    with pytest.raises(TypeError, match="layout must be a RotationLayout, got dict"):
        register_rotation_layout("llama", {})
    with pytest.raises(ValueError, match=r"RotationLayout\(norm='group'\) is not supported"):
        RotationLayout(("e",), "b", bad.norms, ("w",), "n", "h", norm="group")


@pytest.mark.parametrize("kw,match", [
    ({"do_layer_norm_before": False}, r"needs config.do_layer_norm_before=True .* got False"),
    ({"word_embed_proj_dim": 48}, r"model.decoder.project_in is present .* this model cannot be rotated"),
])
def test_opt_variants_the_layout_does_not_handle_raise(kw, match):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=testing.TINY_VOCAB, hidden_size=96, ffn_dim=160, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=64, **kw)
    with pytest.raises(ValueError, match=match):
        rotate_model(OPTForCausalLM(cfg).eval(), Rotation())


def test_hidden_size_without_a_hadamard_raises_naming_random_which_works():
    model = perturbed(testing.tiny_llama(hidden=92, head_dim=24))
    with pytest.raises(ValueError, match=r"No Hadamard matrix of order 92 .* Use Rotation\(kind='random'\)"):
        rotate_model(copy.deepcopy(model), Rotation())
    rot, _ = rotated(model, Rotation("random"))
    torch.testing.assert_close(rot(IDS).logits, model(IDS).logits, rtol=0, atol=2e-5 * model(IDS).logits.abs().max().item())


def test_int8_and_non_rotation_values_are_refused():
    with pytest.raises(ValueError, match=r"method='int8' does not take rotation=: LLM.int8\(\) keeps the few outlier "
                                         r"input features in float.*use rtn, gptq, awq or awq\+gptq with a rotation"):
        quantize_model(testing.tiny_llama(), None, "int8", rotation=Rotation())
    with pytest.raises(TypeError, match=r"rotation must be a lightning_quant.methods.rotation.Rotation, e.g. Rotation"):
        quantize_model(testing.tiny_llama(), QuantSpec(4, 32), "rtn", rotation="hadamard")
    with pytest.raises(TypeError, match=r"rotation must be a Rotation, e.g. Rotation\(kind='hadamard', seed=0\); got str"):
        rotate_model(testing.tiny_llama(), "hadamard")


def test_bad_filters_fail_before_the_model_is_rotated():
    model = testing.tiny_llama()
    before = model.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match="include pattern 'nope' matched no linear layer"):
        quantize_model(model, QuantSpec(4, 32), "rtn", include=["nope"], rotation=Rotation())
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_fsdp_sharded_model_is_refused(tmp_path):
    """A real FSDP2 model (one gloo process): the rotation refuses it, naming what to do instead."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = testing.tiny_llama()
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with pytest.raises(ValueError, match=r"this model is sharded \(FSDP / DTensor\). Rotate before sharding"):
            rotate_model(model, Rotation())
    finally:
        dist.destroy_process_group()
