"""ONNX generation graph: the KV-cache decoder run step by step through onnxruntime, and greedy generation
through onnxruntime-genai, against the in-memory packed model.

Tolerance ``ATOL = 1e-4`` on logits (their magnitude is ~1-10 here): at ``accuracy_level=0`` MatMulNBits
dequantizes exactly our float32 ``(q - z)·s`` and attention runs in float32, so only the summation order
differs from torch (observed <= 1e-6). A wrong cache row, position or mask moves logits by more than
100·ATOL, which :func:`test_a_wrong_position_is_caught` checks, so the tolerance does not hide such bugs.
"""

from __future__ import annotations

import json

import pytest
import torch

from lightning_quant import export
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.testing import byte_tokenizer, tiny_gpt2, tiny_llama
from tests.export.conftest import quantize_packed

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ATOL = 1e-4
EOS = 255

#: id -> (spec, hidden, head_dim, tied embeddings, act-order); hidden 96 with g64 / 192 with g128 and
#: intermediate 160 give partial last groups; 4 query heads over 2 key/value heads (grouped-query)
CASES = {
    "w4g64-asym-actorder": (QuantSpec(4, 64, symmetric=False), 96, 32, False, True),
    "w4g32-sym-tied": (QuantSpec(4, 32, symmetric=True), 96, 32, True, False),
    "w4g128-sym-h192": (QuantSpec(4, 128, symmetric=True), 192, 48, False, False),
    "w4g128-asym-h576-tied": (QuantSpec(4, 128, symmetric=False), 576, 64, True, False),  # SmolLM2's width: 4.5 groups
    "w8-per-channel": (QuantSpec(8, -1, symmetric=True), 96, 32, False, False),
    "w4g32-head24": (QuantSpec(4, 32, symmetric=False), 96, 24, False, False),  # plain-op attention (24 % 16 != 0)
}


def _sharpen(model: torch.nn.Module, factor: float = 5.0) -> torch.nn.Module:
    """Scale every non-norm weight so a random tiny model's greedy path varies instead of repeating one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(factor)
    return model


def _model(case: str) -> torch.nn.Module:
    spec, hidden, hd, tied, act_order = CASES[case]
    model = quantize_packed(_sharpen(tiny_llama(hidden=hidden, head_dim=hd, tie_word_embeddings=tied)), spec, act_order)
    model.config.eos_token_id = model.generation_config.eos_token_id = EOS  # genai_config reads generation_config first
    return model


def _ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, EOS, (batch, n), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("attention", ["auto", "plain"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kv_cache_steps_match_packed_model(tmp_path, case, attention):
    model = _model(case)
    export.save(model, tmp_path / "m", "onnx", options={"attention": attention})
    runner = export.load(tmp_path / "m")
    ids = _ids(2, 10)
    ref = _reference(model, ids)
    torch.testing.assert_close(runner(ids).logits, ref, rtol=0, atol=ATOL)  # whole sequence, empty cache
    logits, past = runner.step(ids[:, :6], torch.ones(2, 6), torch.arange(6).expand(2, 6), runner.empty_cache(2))
    torch.testing.assert_close(logits, ref[:, :6], rtol=0, atol=ATOL)
    for t in range(6, 10):  # one token at a time, cache grows
        logits, past = runner.step(ids[:, t:t + 1], torch.ones(2, t + 1), torch.full((2, 1), t), past)
        torch.testing.assert_close(logits[:, 0], ref[:, t], rtol=0, atol=ATOL)
    assert past["past_key_values.0.key"].shape == (2, 2, 10, CASES[case][2])
    # a chunk of several tokens on top of a cache (onnxruntime's fused attention takes it at batch 1)
    logits, past = runner.step(ids[:1, :4], torch.ones(1, 4), torch.arange(4)[None], runner.empty_cache(1))
    logits, past = runner.step(ids[:1, 4:9], torch.ones(1, 9), torch.arange(4, 9)[None], past)
    torch.testing.assert_close(logits, ref[:1, 4:9], rtol=0, atol=ATOL)


def test_graph_keeps_packed_weights_and_uses_fused_attention(tmp_path):
    model = _model("w4g32-sym-tied")
    export.save(model, tmp_path / "m", "onnx", options={"accuracy_level": 4})
    graph = onnx.load(str(tmp_path / "m" / "model.onnx")).graph
    mm = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(mm) == sum(isinstance(m, PackedLinear) for m in model.modules())
    assert all(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 4 for n in mm)
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == model.config.num_hidden_layers
    float_tables = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                    and ".scales" not in i.name and not i.name.startswith(("cos_cache", "sin_cache"))]
    assert [tuple(i.dims) for i in float_tables] == [(96, 256)]  # tied: one table for lookup and head
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    genai = json.loads((tmp_path / "m" / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    assert (genai["model"]["type"], dec["head_size"], dec["num_key_value_heads"], dec["num_attention_heads"]) == \
        ("llama", 32, 2, 4)
    assert genai["model"]["eos_token_id"] == EOS and genai["model"]["context_length"] == 256


def test_accuracy_level_4_is_close(tmp_path):
    """int8 activations per block: each input block is rounded to steps of absmax/127, a relative error of a
    few 1e-3 per matmul, compounding over the 7 matmuls of each of 2 blocks; 2 % relative L2 on the logits
    bounds that with margin (on the unsharpened model; ~0.5 % measured)."""
    spec, hidden, hd, _, act_order = CASES["w4g64-asym-actorder"]
    model = quantize_packed(tiny_llama(hidden=hidden, head_dim=hd), spec, act_order)
    export.save(model, tmp_path / "m", "onnx", options={"accuracy_level": 4})
    ids = _ids(1, 12)
    ref = _reference(model, ids)
    rel = ((export.load(tmp_path / "m")(ids).logits - ref).norm() / ref.norm()).item()
    assert 10 * ATOL / ref.abs().max().item() < rel < 0.02, rel  # int8 compute really happened, and stays close


def test_a_wrong_position_is_caught(tmp_path):
    model = _model("w4g32-sym-tied")
    export.save(model, tmp_path / "m", "onnx")
    runner = export.load(tmp_path / "m")
    ids = _ids(1, 6)
    ref = _reference(model, ids)
    _, past = runner.step(ids[:, :5], torch.ones(1, 5), torch.arange(5)[None], runner.empty_cache(1))
    wrong, _ = runner.step(ids[:, 5:], torch.ones(1, 6), torch.tensor([[4]]), past)
    assert (wrong[:, 0] - ref[:, 5]).abs().max() > 100 * ATOL


def test_qwen2_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=EOS)
    model = Qwen2ForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.bias"):
                p.normal_()  # transformers initializes biases to zero: make them matter
    model = quantize_packed(model, QuantSpec(4, 32, symmetric=False))
    export.save(model, tmp_path / "m", "onnx")
    ids = _ids(2, 9)
    torch.testing.assert_close(export.load(tmp_path / "m")(ids).logits, _reference(model, ids), rtol=0, atol=ATOL)


def _greedy(model, ids: torch.Tensor, n: int):
    """Greedy tokens and the logits each was chosen from, recomputing the whole prefix (no cache)."""
    seq, steps = ids, []
    for _ in range(n):
        logits = _reference(model, seq)[0, -1]
        steps.append(logits)
        seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
    return seq[0, ids.shape[1]:].tolist(), torch.stack(steps)


@pytest.mark.parametrize("case", ["w4g64-asym-actorder", "w4g32-sym-tied"])
def test_onnxruntime_genai_generates_our_greedy_tokens(tmp_path, case):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is an optional test dependency "
                                                          "(pip install onnxruntime-genai)")
    model, tok = _model(case), byte_tokenizer()
    export.save(model, tmp_path / "m", "onnx", tokenizer=tok)
    prompt = "def generate(model, ids):\n"
    hf_ids = tok(prompt).input_ids
    expected, ref_steps = _greedy(model, torch.tensor([hf_ids]), 16)
    top2 = ref_steps.topk(2, -1).values
    assert ((top2[:, 0] - top2[:, 1]) > 10 * ATOL).all(), "ill-posed: a near tie in the reference"
    assert EOS not in expected and len(set(expected)) > 4  # generation runs 16 steps and does not just repeat

    og_model = og.Model(str(tmp_path / "m"))
    og_tok = og.Tokenizer(og_model)
    ids = og_tok.encode(prompt)
    assert list(ids) == hf_ids
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(hf_ids) + 16, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(ids)
    steps = []
    while not gen.is_done():
        gen.generate_next_token()  # runs the model on the last token (lazily) and picks the next one
        steps.append(torch.from_numpy(gen.get_output("logits")).reshape(-1, 256)[-1])  # what it picked from
    got = [int(t) for t in gen.get_sequence(0)][len(hf_ids):]
    assert got == expected
    torch.testing.assert_close(torch.stack(steps), ref_steps, rtol=0, atol=ATOL)
    assert og_tok.decode(ids) == tok.decode(hf_ids) == prompt  # (random bytes generated need not be valid UTF-8)


def test_bad_input_names_what_is_supported(tmp_path):
    gpt2 = quantize_packed(tiny_gpt2(), QuantSpec(4, 32, symmetric=True))
    with pytest.raises(ValueError, match=r"supports model types \['llama', 'mistral', 'qwen2'\].*'gpt2'.*'logits'"):
        export.save(gpt2, tmp_path / "a", "onnx")
    model = _model("w4g32-head24")
    with pytest.raises(ValueError, match="GroupQueryAttention needs a head size that is a multiple of 16.*head_dim=24"):
        export.save(model, tmp_path / "b", "onnx", options={"attention": "gqa"})
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['accuracy'\].*\['graph', 'accuracy_level'"):
        export.save(model, tmp_path / "c", "onnx", options={"accuracy": 4})
    with pytest.raises(ValueError, match=r"accuracy_level=5 .*use one of \(0, 1, 2, 3, 4\)"):
        export.save(model, tmp_path / "d", "onnx", options={"accuracy_level": 5})
    with pytest.raises(ValueError, match=r"graph='text' .*\('generation', 'logits'\)"):
        export.save(model, tmp_path / "e", "onnx", options={"graph": "text"})
    with pytest.raises(ValueError, match="takes no options"):
        export.save(model, tmp_path / "f", "gptq", options={"accuracy_level": 4})
    layer = model.model.layers[0].mlp.up_proj
    layer.act_spec = ActivationSpec(bits=8)
    with pytest.raises(ValueError, match="quantizes activations.*options=\\{'graph': 'logits'\\}"):
        export.save(model, tmp_path / "g", "onnx")
    assert not any((tmp_path / n).exists() for n in "abcdefg")


def test_half_model_keeps_half_tables_and_computes_in_float32(tmp_path):
    import copy

    model = _model("w4g32-sym-tied")
    torch.nn.Module.half(model)  # embeddings, norms in float16 (the base-class cast keeps PackedLinear buffers)
    export.save(model, tmp_path / "m", "onnx")
    graph = onnx.load(str(tmp_path / "m" / "model.onnx")).graph
    assert [i.data_type for i in graph.initializer if "embed_tokens" in i.name] == [onnx.TensorProto.FLOAT16]
    ref_model = torch.nn.Module.float(copy.deepcopy(model))  # the same float16 values, computed in float32
    ids = _ids(1, 8)
    torch.testing.assert_close(export.load(tmp_path / "m")(ids).logits, _reference(ref_model, ids), rtol=0, atol=ATOL)


def test_plain_attention_takes_left_padding(tmp_path):
    model = _model("w4g32-head24")
    export.save(model, tmp_path / "m", "onnx")
    runner = export.load(tmp_path / "m")
    short, long = _ids(1, 5, seed=1), _ids(1, 8, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])  # row 0 left-padded
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], 1), torch.ones(1, 8)])
    pos = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(5)[None]], 1), torch.arange(8)[None]])
    logits, past = runner.step(batch, mask, pos, runner.empty_cache(2))
    torch.testing.assert_close(logits[0, 3:], _reference(model, short)[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(logits[1], _reference(model, long)[0], rtol=0, atol=ATOL)
    nxt = torch.tensor([[7], [9]])
    logits, _ = runner.step(nxt, torch.cat([mask, torch.ones(2, 1)], 1), torch.tensor([[5], [8]]), past)
    torch.testing.assert_close(logits[0, 0], _reference(model, torch.cat([short, nxt[:1]], 1))[0, -1], rtol=0, atol=ATOL)
    torch.testing.assert_close(logits[1, 0], _reference(model, torch.cat([long, nxt[1:]], 1))[0, -1], rtol=0, atol=ATOL)
