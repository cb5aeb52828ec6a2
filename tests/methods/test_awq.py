import copy

import pytest
import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.algorithms.awq import (
    AWQConfig,
    AWQStats,
    ScaleTie,
    awq_quantize_group,
    awq_scales,
    search_clip,
    search_scales,
)
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.methods.awq import awq_method, awq_summary, fold_awq_scales
from lightning_quant.targets import linear_weight, select_linears
from lightning_quant.testing import TINY_VOCAB

SPEC = QuantSpec(4, 32)
#: the tests of explicit input scales (groups that fold nowhere keep their searched scales)
EXPLICIT = AWQConfig(n_grid=2, clip_grid=0, unfoldable="explicit")


def _ids(n=8, t=48, seed=0):
    return torch.randint(0, TINY_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _group_inputs(model, ids):
    """Real captured inputs of every target linear ([tokens, in]) from one float forward."""
    targets = select_linears(model)
    xs = {}

    def hook(name):
        def fn(mod, args):
            xs.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))  # returns None: args unchanged
        return fn

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return targets, xs


def _out_err(x, w, wq_over_s, s):
    """Mean per-token squared output error, computed directly on the inputs (no Gram matrix)."""
    return float(((x @ w.t() - (x / s) @ (wq_over_s * s).t()) ** 2).sum() / x.shape[0])


def test_awq_not_worse_than_rtn_on_real_activations_every_group(tiny_model):
    ids = _ids()
    targets, xs = _group_inputs(tiny_model, ids)
    # groups: layers reading the same input tensor (discovered on the first block)
    block_groups = {}
    for n in targets:
        block_groups.setdefault(xs[n].data_ptr(), []).append(n)  # inputs are held alive: pointers are unique
    assert len(block_groups) >= 6
    for group in block_groups.values():
        x = xs[group[0]].float()
        weights = {n: linear_weight(targets[n]).detach().float() for n in group}
        res = awq_quantize_group(AWQStats.from_inputs(x), weights, SPEC, AWQConfig())
        err_awq = sum(_out_err(x, w, res.qweights[n].dequantize() / res.scales, res.scales) for n, w in weights.items())
        err_rtn = sum(_out_err(x, w, rtn_quantize(w, SPEC).dequantize(), torch.ones(w.shape[1]))
                      for w in weights.values())
        assert err_awq <= err_rtn * (1 + 1e-5), (group, err_awq, err_rtn)
        assert res.error == pytest.approx(err_awq, rel=1e-3)  # tr(D H D^T)/2 with H = 2 X^T X / N
        assert res.rtn_error == pytest.approx(err_rtn, rel=1e-3)


def test_best_grid_point_never_worse_than_unit_scale():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.1, 8, 64)  # a few salient channels
    w = torch.randn(48, 64)
    st = AWQStats.from_inputs(x)
    s, ratio, errs = search_scales(st, {"w": w}, SPEC, n_grid=20)
    assert len(errs) == 20
    assert min(errs) == errs[round(ratio * 20)] and min(errs) <= errs[0]
    assert torch.equal(awq_scales(st.mean_abs(), 0.0), torch.ones(64))
    h = st.hessian()
    plain = rtn_quantize(w, SPEC).dequantize()
    assert errs[0] == pytest.approx(float(((w - plain) @ h * (w - plain)).sum() / 2), rel=1e-6)
    assert ratio > 0  # salient channels: scaling helps here
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 32, symmetric=False), QuantSpec(3, -1),
                                  QuantSpec(4, 64, symmetric=False, scale_dtype="bfloat16")], ids=str)
def test_search_fake_quant_equals_primitives_bit_for_bit(spec):
    """The searches' padded [out, G, gs] fake quant == primitives.compute_qparams + fake_quantize (partial group)."""
    from lightning_quant import primitives as P
    from lightning_quant.algorithms.awq import _fake_rtn

    torch.manual_seed(0)
    w = torch.randn(40, 80) * 3
    for clip in (1.0, 0.8, torch.rand(40, spec.num_groups(80)) * 0.5 + 0.5):
        scale, zero = P.compute_qparams(w, spec, clip=clip)
        assert torch.equal(_fake_rtn(w, spec, clip), P.fake_quantize(w, scale, zero, spec))


def test_clip_search_grid_and_no_shrink():
    torch.manual_seed(0)
    w, x = torch.randn(16, 96), torch.randn(256, 96)
    h = AWQStats.from_inputs(x).hessian()
    clip = search_clip(w, h, SPEC, clip_grid=10, max_shrink=0.5)
    assert clip.shape == (16, 3)  # 96 / 32 groups, per output row
    allowed = torch.tensor([1 - 0.5 * i / 10 for i in range(10)])
    assert torch.isin(clip, allowed).all()
    assert torch.equal(search_clip(w, h, SPEC, clip_grid=10, max_shrink=0.0), torch.ones(16, 3))


def test_partial_last_group_and_per_channel():
    torch.manual_seed(0)
    x, w = torch.randn(128, 80), torch.randn(8, 80)
    for spec in (QuantSpec(4, 32), QuantSpec(3, -1, symmetric=False)):
        res = awq_quantize_group(AWQStats.from_inputs(x), {"w": w}, spec)
        assert res.qweights["w"].scales.shape == (8, spec.num_groups(80))
        assert res.error <= res.rtn_error + 1e-9


def test_folds_leave_float_model_unchanged(tiny_model):
    """Exactness: applying every fold to the float model changes logits by < 1e-5 (relative L2)."""
    ids = _ids()
    weights = awq_method(tiny_model, select_linears(tiny_model), SPEC, ids, AWQConfig(n_grid=4, clip_grid=2))
    folded = copy.deepcopy(tiny_model)
    fold_awq_scales(folded, weights)
    with torch.no_grad():
        a, b = tiny_model(ids).logits, folded(ids).logits
    assert float((a - b).norm() / a.norm()) < 1e-5
    summary = awq_summary(weights)
    assert summary["folded"], summary
    n_layers = sum(len(g.split(", ")) for part in summary.values() for g in part)
    assert n_layers == len(weights)  # every layer is reported, none skipped


def test_discovery_per_architecture(tiny_model):
    weights = awq_method(tiny_model, select_linears(tiny_model), SPEC, _ids(2), EXPLICIT)
    summary = awq_summary(weights)
    kind = tiny_model.config.model_type
    if kind == "llama":  # GQA: v has 48 outputs, o reads 96 -> tied scales fold into v
        assert not summary["explicit"] and len(summary["folded"]) == 8
        o_plan = weights.layers["model.layers.0.self_attn.o_proj"].plan
        assert o_plan.producer == "model.layers.0.self_attn.v_proj" and o_plan.tie == ScaleTie(kv_heads=2, repeats=2, head_dim=24)
        assert "grouped-query attention" in summary["folded"]["model.layers.0.self_attn.o_proj"]
    elif kind == "gpt2":  # fused c_attn, GELU before mlp.c_proj
        assert sorted(summary["explicit"]) == [f"transformer.h.{i}.{m}.c_proj" for i in (0, 1) for m in ("attn", "mlp")]
    else:  # OPT: everything folds (ReLU between fc1 and fc2 is positively homogeneous)
        assert not summary["explicit"] and len(summary["folded"]) == 8


def test_mha_llama_folds_o_into_v():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = _ids(2)
    weights = quantize_model(model, SPEC, "awq", calibration=ids, config=AWQConfig(n_grid=4, clip_grid=2))
    info = weights.layers["model.layers.0.self_attn.o_proj"]
    assert info.plan.producer == "model.layers.0.self_attn.v_proj" and info.plan.kind == "linear"
    assert weights.layers["model.layers.0.self_attn.v_proj"].row_scale is not None
    assert model.model.layers[0].self_attn.o_proj.input_scale is None


def test_gqa_scales_are_tied_across_query_heads_and_fold_into_v():
    """tiny Llama: 4 query heads share 2 kv heads (head_dim 24). o_proj's scales repeat each kv block
    twice (repeat_kv order), v_proj's rows carry one copy, nothing is explicit, logits are unchanged by
    the folds, and the group error is no worse than RTN."""
    from lightning_quant.algorithms.awq import tie_expand
    from lightning_quant.testing import tiny_llama

    model, ids = tiny_llama(), _ids()
    weights = awq_method(model, select_linears(model), SPEC, ids, AWQConfig(n_grid=10, clip_grid=0))
    o = weights.layers["model.layers.0.self_attn.o_proj"]
    v = weights.layers["model.layers.0.self_attn.v_proj"]
    fo = weights.figures["model.layers.0.self_attn.o_proj"]
    assert fo["awq_ratio"] > 0  # a real scaling was chosen, not the identity
    share = o.plan.producer_scales(o.scales)
    assert share.shape == (48,) and torch.equal(tie_expand(share, o.plan.tie), o.scales)
    assert torch.equal(o.scales.view(2, 2, 24)[:, 0], o.scales.view(2, 2, 24)[:, 1])
    assert torch.equal(v.row_scale, share)
    assert fo["awq_error"] <= fo["awq_rtn_error"]
    folded = copy.deepcopy(model)
    fold_awq_scales(folded, weights)
    with torch.no_grad():
        a, b = model(ids).logits, folded(ids).logits
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_gqa_tie_needs_the_head_size(monkeypatch):
    from torch import nn

    from lightning_quant.methods import awq_mapping
    from lightning_quant.testing import tiny_llama

    model = tiny_llama()
    block = model.model.layers[0]
    assert awq_mapping._gqa_tie(block, "self_attn.v_proj", 48, 96) == ScaleTie(kv_heads=2, repeats=2, head_dim=24)
    assert awq_mapping._gqa_tie(block, "self_attn.v_proj", 48, 100) is None  # not whole repeats
    assert awq_mapping._gqa_tie(nn.Sequential(nn.Linear(4, 48)), "0", 48, 96) is None  # no head_dim anywhere
    monkeypatch.setattr(awq_mapping, "_gqa_tie", lambda *a: None)
    weights = awq_method(model, select_linears(model), SPEC, _ids(2), EXPLICIT)
    reason = awq_summary(weights)["explicit"]["model.layers.0.self_attn.o_proj"]
    assert "no head_dim tells how they repeat" in reason


def test_unfoldable_groups_default_to_unscaled():
    """GPT-2's c_proj layers fold nowhere: by default they get s = 1 (clip search only, never worse than RTN)
    and no input scale, so the gptq/awq/compressed-tensors exports hold them."""
    from lightning_quant.testing import tiny_gpt2

    model = tiny_gpt2()
    weights = quantize_model(model, SPEC, "awq", calibration=_ids(2), config=AWQConfig(n_grid=2, clip_grid=4))
    summary = awq_summary(weights)
    unscaled = [f"transformer.h.{i}.{m}.c_proj" for i in (0, 1) for m in ("attn", "mlp")]
    assert sorted(summary["unscaled"]) == unscaled and not summary["explicit"] and len(summary["folded"]) == 4
    for n in unscaled:
        assert model.get_submodule(n).input_scale is None
        assert torch.equal(weights.layers[n].scales, torch.ones_like(weights.layers[n].scales))
        assert weights.figures[n]["awq_error"] <= weights.figures[n]["awq_rtn_error"] * (1 + 1e-6)


def test_unverifiable_fold_falls_back_to_explicit(monkeypatch):
    """A wrong pair in the data mapping (GELU between GPT-2's c_fc and c_proj) is caught numerically."""
    from lightning_quant.methods import awq_mapping
    from lightning_quant.testing import tiny_gpt2

    tiny_model = tiny_gpt2()
    monkeypatch.setitem(awq_mapping.INDIRECT_FOLDS, "gpt2", (("mlp.c_fc", "mlp.c_proj"),))
    weights = awq_method(tiny_model, select_linears(tiny_model), SPEC, _ids(2), EXPLICIT)
    reason = awq_summary(weights)["explicit"]["transformer.h.0.mlp.c_proj"]
    assert "failed the numerical check" in reason


def test_quantize_model_awq_swaps_packed_layers_with_explicit_scales(tiny_model):
    """The swapped model == the float model with every fold applied and each layer's weight replaced
    by its dequantized codes (explicit groups: codes / scales on the columns)."""
    ids = _ids()
    with torch.no_grad():
        ref = tiny_model(ids).logits
    oracle = copy.deepcopy(tiny_model)
    weights = quantize_model(tiny_model, SPEC, "awq", calibration=ids, config=AWQConfig(n_grid=10, clip_grid=5,
                                                                                        unfoldable="explicit"))
    fold_awq_scales(oracle, weights)
    with torch.no_grad():
        for n, qw in weights.items():
            info, w = weights.layers[n], linear_weight(oracle.get_submodule(n))
            w.copy_(qw.dequantize() / (info.scales if info.plan.producer is None else 1.0))
        expected = oracle(ids).logits
    for n, qw in weights.items():
        layer = tiny_model.get_submodule(n)
        assert isinstance(layer, PackedLinear)
        info = weights.layers[n]
        if info.plan.producer is None:
            assert torch.equal(layer.input_scale, info.scales.to(layer.input_scale.dtype))
        else:
            assert layer.input_scale is None
    with torch.no_grad():
        out = tiny_model(ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert float((out - ref).norm() / ref.norm()) < 0.25  # W4 g32 on random tiny weights


def test_peft_wrapped_model(tiny_llama):
    peft = pytest.importorskip("peft")
    ids = _ids()
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama, cfg).eval()
    with torch.no_grad():
        ref = model(ids).logits
    targets = select_linears(model)  # logical names: the hosts' paths; adapters are never targets
    assert not any("lora_" in n for n in targets)
    weights = awq_method(model, targets, SPEC, ids, AWQConfig(n_grid=4, clip_grid=2))
    assert set(weights) == set(targets)
    qkv = weights.layers["base_model.model.model.layers.0.self_attn.q_proj"].plan
    assert qkv.kind == "norm" and any(c.endswith("q_proj.lora_A.default") for c in qkv.companions)
    folded = copy.deepcopy(model)
    fold_awq_scales(folded, weights)
    with torch.no_grad():
        assert float((folded(ids).logits - ref).norm() / ref.norm()) < 1e-5


def test_bad_inputs():
    x = torch.randn(16, 32)
    with pytest.raises(ValueError, match=r"must all be \[out, 32\].*'b' disagrees"):
        awq_quantize_group(AWQStats.from_inputs(x), {"a": torch.randn(4, 32), "b": torch.randn(4, 31)}, SPEC)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        AWQStats.from_inputs(x)
    with pytest.raises(ValueError, match=r"AWQConfig.n_grid=0 must be an int >= 1"):
        AWQConfig(n_grid=0)
    with pytest.raises(ValueError, match=r"AWQConfig.max_shrink=1.0 must be in \[0, 1\)"):
        AWQConfig(max_shrink=1.0)
    with pytest.raises(ValueError, match="unfoldable='bogus' is not supported; use one of"):
        AWQConfig(unfoldable="bogus")


def test_method_needs_calibration_and_finite_activations(tiny_llama):
    with pytest.raises(ValueError, match="method='awq' needs calibration data"):
        quantize_model(tiny_llama, SPEC, "awq")
    with torch.no_grad():
        tiny_llama.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_model(tiny_llama, SPEC, "awq", calibration=_ids(2))


@pytest.mark.slow
def test_smollm2_awq_w4g64_perplexity_below_rtn(smollm2, smollm2_tokenizer, heldout_windows):
    """W4 g64 on the linears of the first 8 of 30 blocks (RTN and AWQ on the same layers), with a
    cheaper search than the defaults (10 grid points, 4 clip factors, 8 x 256 calibration tokens)
    to stay inside the test budget. The whole model with the defaults (RTN 30.07 -> AWQ 22.52,
    float 18.96) is measured by benchmarks/ptq_quality.py / docs/awq.md."""
    from lightning_quant.data import stdlib_text, token_windows
    from lightning_quant.evaluation import perplexity

    spec = QuantSpec(4, 64)
    ids = smollm2_tokenizer(stdlib_text(200_000, split="train"), return_tensors="pt").input_ids
    calib = token_windows(ids, 256, 8)
    windows = heldout_windows[:4]
    rtn = copy.deepcopy(smollm2)
    include = [r"re:^model\.layers\.[0-7]\."]
    quantize_model(rtn, spec, "rtn", include=include)
    ppl_rtn = perplexity(rtn, windows)
    del rtn
    awq = copy.deepcopy(smollm2)
    weights = quantize_model(awq, spec, "awq", include=include, calibration=calib,
                             config=AWQConfig(n_grid=10, clip_grid=4))
    assert len(weights) == 8 * 7
    ppl_awq = perplexity(awq, windows)
    print(f"SmolLM2 W4 g64 held-out ppl: RTN={ppl_rtn:.4f} AWQ={ppl_awq:.4f}")
    assert ppl_awq < ppl_rtn


def _dump(weights):
    return {n: (q.codes, q.scales, weights.layers[n].scales) for n, q in weights.items()}


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lightning_quant.calibration import shard
    from lightning_quant.testing import random_token_batches, tiny_opt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_opt()
        mine = shard(random_token_batches(4, 32, 2), rank, world)
        torch.save(_dump(awq_method(model, select_linears(model), SPEC, mine, DDP_CFG)), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


DDP_CFG = AWQConfig(n_grid=10, clip_grid=4)


def test_ddp_two_ranks_equal_single_process(tmp_path):
    """2 gloo ranks, each on half the batches, == one process on all of them (statistics are float64
    sums all-reduced before solving; we require identical codes and scales equal to 1e-6 relative)."""
    import torch.multiprocessing as mp

    from lightning_quant.testing import random_token_batches, tiny_opt

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = tiny_opt()
    single = _dump(awq_method(model, select_linears(model), SPEC, random_token_batches(4, 32, 2), DDP_CFG))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert set(ranks[0]) == set(single) == set(ranks[1])
    for name, (codes, scales, awq_s) in single.items():
        for got in ranks:
            assert torch.equal(got[name][0], codes), name
            torch.testing.assert_close(got[name][1], scales, rtol=1e-6, atol=0)
            torch.testing.assert_close(got[name][2], awq_s, rtol=1e-6, atol=0)


def test_search_is_split_by_fold_chain_across_ranks(tiny_llama):
    """A group whose scales fold into another group's linear is searched before it, by the same rank:
    Llama's MLP chain (down -> gate/up) and attention chain (o -> qkv) go to different ranks."""
    from lightning_quant.calibration import run_sequential
    from lightning_quant.methods.awq import _chain_owners
    from lightning_quant.methods.awq_mapping import discover_groups, model_type

    owners = []

    def first_block(ctx):
        if ctx.index == 0:
            lin = ctx.linears(select_linears(tiny_llama))
            order = list(reversed(discover_groups(ctx.block, ctx.name, lin, ctx.inputs[0], model_type(tiny_llama))))
            owners.extend([_chain_owners(order, 2), _chain_owners(order, 1)])

    run_sequential(tiny_llama, torch.randint(0, TINY_VOCAB, (2, 8)), first_block)
    two, one = owners
    by_layer = {n.split(".")[-1]: r for g, r in two.items() for n in g}
    assert by_layer == {"down_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "q_proj": 1, "k_proj": 1,
                        "v_proj": 1}
    assert set(one.values()) == {0}


def test_cli_format_roundtrips_explicit_input_scales(tiny_llama, tmp_path, monkeypatch):
    from lightning_quant.cli import load_quantized, save_quantized
    from lightning_quant.methods import awq_mapping

    monkeypatch.setitem(awq_mapping.INDIRECT_FOLDS, "llama", ())  # no v -> o / up -> down folds: explicit scales
    ids = _ids(2)
    quantize_model(tiny_llama, SPEC, "awq", calibration=ids, config=EXPLICIT)
    save_quantized(tiny_llama, "awq", tmp_path)
    back = load_quantized(tmp_path)
    assert back.model.layers[0].self_attn.o_proj.input_scale is not None
    with torch.no_grad():
        assert torch.equal(back(ids).logits, tiny_llama(ids).logits)


def test_scale_tie_expands_reduces_and_validates():
    tie = ScaleTie(kv_heads=2, repeats=3, head_dim=4)
    s = torch.arange(8, dtype=torch.float32)  # [kv·hd]
    full = tie.expand(s)  # head h reads kv head h // 3
    assert full.shape == (24,) and torch.equal(full.view(2, 3, 4)[:, 1], s.view(2, 4))
    assert torch.equal(tie.producer_share(full), s) and torch.equal(tie.reduce(full), s)
    assert tie.producer_width == 8
    with pytest.raises(ValueError, match="ScaleTie.repeats must be a positive int"):
        ScaleTie(kv_heads=2, repeats=0, head_dim=4)
